"""Copies Hugging Face-named weights into the Llama-family modules, fusing QKV and gate/up.

A weight may be a float tensor or a quantized :class:`PackedWeight`; a packed one takes the
place of the float parameter (the layers hand either to ``ops``)."""
from __future__ import annotations

import re

import torch
from torch import nn

from fastinfer.common.packed import PackedWeight, concat_rows

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_DIRECT = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head_weight"}


def load_llama_weights(model: nn.Module, weights: dict[str, torch.Tensor | PackedWeight]) -> None:
    """Fills ``model`` (a ``LlamaForCausalLM``) from HF-named tensors or packed weights; checks
    every shape. A tied LM head shares the embedding's (maybe packed) weight."""
    params = dict(model.named_parameters(remove_duplicate=False))
    fused: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        target, part = _target(name)
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} (no parameter {target!r} in the model)")
        if part is None:
            _assign(model, target, params[target], tensor, name)
            loaded.add(target)
        else:
            fused.setdefault(target, {})[part] = tensor
    for target, parts in fused.items():
        _assign(model, target, params[target], _fuse([parts[i] for i in sorted(parts)]), target)
        loaded.add(target)
    if model.config.tie_word_embeddings and isinstance(model.embed_tokens.weight, PackedWeight):
        _replace(model, "lm_head_weight", model.embed_tokens.weight)
    missing = {n for n in params if n not in loaded}
    if model.config.tie_word_embeddings:
        missing.discard("lm_head_weight")
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:8]}")


def _target(name: str) -> tuple[str, int | None]:
    if name in _DIRECT:
        return _DIRECT[name], None
    m = _LAYER.match(name)
    if not m:
        return name, None
    idx, rest = m.groups()
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        fused_module, part = _FUSED[module]
        return f"layers.{idx}.{fused_module}.{kind}", part
    return f"layers.{idx}.{rest}", None


def _fuse(parts: list[torch.Tensor | PackedWeight]) -> torch.Tensor | PackedWeight:
    """Stacks the parts of a fused projection along the output dim (packed when all are)."""
    if all(isinstance(p, PackedWeight) for p in parts):
        return concat_rows(parts)
    return torch.cat([p.dequantize() if isinstance(p, PackedWeight) else p.float() for p in parts], dim=0)


def _assign(model: nn.Module, target: str, param: torch.Tensor, value: torch.Tensor | PackedWeight,
            name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    if isinstance(value, PackedWeight):
        _replace(model, target, value)
        return
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _replace(model: nn.Module, target: str, packed: PackedWeight) -> None:
    """Puts ``packed`` where the float parameter ``target`` was (its storage is released)."""
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    delattr(owner, attr)
    setattr(owner, attr, packed)
