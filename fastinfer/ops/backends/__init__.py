"""The backends behind ``fastinfer.ops``, one module each: ``cpu_native`` (the C++ CPU
extension), ``cuda_native`` (the CUDA C++ extension) and ``triton`` (the Triton kernels of
``fastinfer.kernels.triton``). Each has ``register_ops(register)``, which adds what this
machine can run to the dispatch point; the pure-torch reference is ``ops/reference.py``."""
