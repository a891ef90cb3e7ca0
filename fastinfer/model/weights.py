"""Copies Hugging Face-named weights into the Llama-family modules, fusing QKV and gate/up."""
from __future__ import annotations

import re

import torch
from torch import nn

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_DIRECT = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head_weight"}


def load_llama_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Fills ``model`` (a ``LlamaForCausalLM``) from HF-named tensors; checks every shape."""
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
            _copy(params[target], tensor, name)
            loaded.add(target)
        else:
            fused.setdefault(target, {})[part] = tensor
    for target, parts in fused.items():
        _copy(params[target], torch.cat([parts[i] for i in sorted(parts)], dim=0), target)
        loaded.add(target)
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


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))
