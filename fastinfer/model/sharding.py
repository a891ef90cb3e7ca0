"""One tensor-parallel rank's share of a Llama-family checkpoint (issue 24): Hugging Face-named
weights (float tensors or :class:`PackedWeight`) cut as :mod:`fastinfer.distributed.layout`
plans, before they are fused and loaded into the rank's (smaller) model.

Column-parallel (output rows): ``q_proj`` / ``k_proj`` / ``v_proj`` (and their biases) by the
rank's query / KV heads, ``gate_proj`` / ``up_proj`` by its intermediate channels, the embedding
and the LM head by its vocabulary range. Row-parallel (inputs): ``o_proj`` by its query heads,
``down_proj`` by its intermediate channels. Norms are whole on every rank. A quantized weight
whose row-parallel split would cut one of its groups is refused with ``ConfigError`` naming the
layer."""
from __future__ import annotations

import re

import torch

from fastinfer.common.packed import PackedWeight, take_inputs, take_rows
from fastinfer.distributed.layout import TPLayout
from fastinfer.errors import ConfigError

Weight = torch.Tensor | PackedWeight
_NAME = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def shard_weights(weights: dict[str, Weight], layout: TPLayout, head_dim: int) -> dict[str, Weight]:
    """The weights rank ``layout.rank`` holds (every name kept; split ones cut to its share)."""
    return {name: _shard(name, w, layout, head_dim) for name, w in weights.items()}


def _shard(name: str, w: Weight, layout: TPLayout, head_dim: int) -> Weight:
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _rows(w, *layout.vocab)
    m = _NAME.match(name)
    if m is None:
        return w  # norms, rotary buffers: whole on every rank
    proj, kind = m.group(2), m.group(3)
    q = (layout.q_heads[0] * head_dim, layout.q_heads[1] * head_dim)
    kv = (layout.kv_heads[0] * head_dim, layout.kv_heads[1] * head_dim)
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": layout.intermediate, "up_proj": layout.intermediate}
    if proj in rows:
        return _rows(w, *rows[proj])
    inputs = {"o_proj": q, "down_proj": layout.intermediate}.get(proj)
    if inputs is None:
        return w
    if kind == "bias":  # a row-parallel bias is added once, by rank 0, after the all-reduce
        return w if layout.rank == 0 else torch.zeros_like(w)
    return _inputs(name, w, *inputs)


def _rows(w: Weight, start: int, stop: int) -> Weight:
    return take_rows(w, start, stop) if isinstance(w, PackedWeight) else w[start:stop].clone()


def _inputs(name: str, w: Weight, start: int, stop: int) -> Weight:
    if not isinstance(w, PackedWeight):
        return w[:, start:stop].clone()
    try:
        return take_inputs(w, start, stop)
    except ValueError as exc:
        raise ConfigError(f"tensor_parallel_size: {name} cannot be split for this rank: {exc}",
                          "tensor_parallel_size") from exc
