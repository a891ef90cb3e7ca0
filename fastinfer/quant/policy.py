"""Quantizes a model's float weights (Hugging Face names) into packed weights at load.

The one place that decides which tensors a scheme quantizes and how:

- every linear projection (q/k/v/o, gate/up/down) with the scheme itself;
- the token embedding and the LM head with the scheme too, except under int4, where they are
  int8 in groups of the same size (as llama.cpp keeps them at 6-8 bits: the LM head is the layer
  most sensitive to quantization, and a GGUF file's Q8_0 embedding stays exact that way), and
  under fp8, where they are int8 per channel (the same bytes; e4m3's 3-bit mantissa there cost
  the default model +4.4% perplexity, int8 +1.8% for the whole fp8 model);
- norms, biases and rotary tables stay in float.
"""
from __future__ import annotations

import re

import torch

from fastinfer.errors import InvalidArgumentError
from fastinfer.common.packed import PackedWeight
from fastinfer.quant.pack import pack
from fastinfer.quant.rtn import quantize_fp8, quantize_int4, quantize_int8, resolve_group_size

SCHEMES = ("int8", "int4", "fp8")
_PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
_TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def quantize_weights(weights: dict[str, torch.Tensor | PackedWeight], scheme: str,
                     group_size: int | str = 32) -> dict[str, torch.Tensor | PackedWeight]:
    """``weights`` with every projection, the embedding and the LM head replaced by packed
    weights of ``scheme`` (``"int8"``, ``"int4"`` or ``"fp8"``); other tensors are kept."""
    if scheme not in SCHEMES:
        raise InvalidArgumentError(f"quantization scheme must be one of {list(SCHEMES)}, got {scheme!r}",
                                   "quantization")
    out: dict[str, torch.Tensor | PackedWeight] = {}
    for name, w in weights.items():
        is_table = name in _TABLES
        if isinstance(w, PackedWeight) or w.dim() != 2 or not (is_table or _PROJECTION.search(name)):
            out[name] = w
            continue
        out[name] = quantize_matrix(w, scheme, group_size, name, table=is_table)
    return out


def quantize_matrix(w: torch.Tensor, scheme: str, group_size: int | str, name: str,
                    table: bool = False) -> PackedWeight:
    """One matrix ``[N, K]`` under ``scheme``; a group size that does not fit K names ``name``."""
    k = w.shape[1]
    if scheme == "int8":
        return pack(quantize_int8(w))
    if scheme == "fp8":
        return pack(quantize_int8(w) if table else quantize_fp8(w))
    try:
        g = resolve_group_size(group_size, k)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{exc} (weight {name!r} has {k} inputs)", "quant_group_size") from exc
    return pack(quantize_int8(w, g) if table else quantize_int4(w, g))


def set_input_quantization(model: torch.nn.Module, enabled: bool) -> None:
    """Lets the kernels quantize the inputs of every packed weight of ``model`` to int8 per
    block of 32 (``enabled``, the default: exact int8 dot products, llama.cpp's way) or keeps
    them in float (closer to the dequantized model, slower)."""
    for module in model.modules():
        if isinstance(module, PackedWeight):
            module.quantize_inputs = enabled
