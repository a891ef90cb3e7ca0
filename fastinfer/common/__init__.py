"""The types every level shares, below ``ops``, ``kernels``, ``quant`` and ``layers`` (a leaf:
it imports nothing of fastinfer): the step's attention metadata (``metadata``), the packed
quantized-weight layout (``packed``) and the paged KV cache's element formats (``kv_format``)."""
