"""Pure-torch reference implementations of every op.

They compute in float32 (casting back to the input dtype) and are the fallback when no faster
backend applies. Every other backend is tested against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinfer.common import kv_format as kv
from fastinfer.common.metadata import AttentionMetadata
from fastinfer.common.packed import PackedWeight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T + bias[N]`` -> ``[..., N]`` in x's dtype."""
    return F.linear(x, weight, bias)


def quantized_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequantize(weight).T + bias[N]`` -> ``[..., N]`` in x's dtype, computed in
    float32 on the dequantized matrix."""
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), weight.dequantize(), b).to(x.dtype)


def quantized_embedding(token_ids: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """Rows of a quantized table ``[V, H]`` for ``token_ids [T]``, dequantized -> float32 ``[T, H]``
    (only the rows asked for are ever dequantized)."""
    return weight.dequantize(rows=token_ids)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's first maximum ``[M, V]`` -> ``[M]`` int64 (NaN counts as the greatest)."""
    return x.argmax(-1)


def embedding(token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight [V, H]`` for ``token_ids [T]`` (int64) -> ``[T, H]``."""
    return F.embedding(token_ids, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 like Hugging Face Llama: ``[T, H]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (in x's dtype), then ``(rms_norm(r), r)``: a pre-norm block's
    residual add and the next norm in one op."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` -> ``[..., d]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies rotary embeddings (rotate-half, "neox" layout) to ``q [T, H, D]`` and
    ``k [T, Hkv, D]`` at ``positions [T]``; ``cos_sin [max_pos, D]`` holds cos then sin halves
    (float32). Returns the rotated tensors in the input dtype (other backends may rotate
    ``q`` and ``k`` in place and return them)."""
    cs = cos_sin.index_select(0, positions)
    half = cs.shape[-1] // 2
    cos = cs[:, :half].unsqueeze(1)
    sin = cs[:, half:].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Writes ``key/value [T, Hkv, D]`` into the paged caches ``[num_blocks, block_size, Hkv, D]``
    at flat slots ``slot_mapping [T]`` (int64, ``block * block_size + offset``). A quantized
    cache (int8 or float8_e4m3fn, with ``k_scale/v_scale [num_blocks, block_size, Hkv]``
    float32) gets each (token, head) row quantized as :func:`fastinfer.common.kv_format.quantize` says."""
    nb, bs, hkv, d = k_cache.shape
    for x, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if kv.is_quantized(cache.dtype):
            codes, s = kv.quantize(x, cache.dtype)
            # (as bytes: index_copy_ has no float8 kernel)
            cache.view(torch.uint8).view(nb * bs, hkv, d).index_copy_(0, slot_mapping, codes.view(torch.uint8))
            scales.view(nb * bs, hkv).index_copy_(0, slot_mapping, s)
        else:
            cache.view(nb * bs, hkv, d).index_copy_(0, slot_mapping, x.to(cache.dtype))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``q [T, H, D]`` over the paged cache.

    Sequence ``i`` owns queries ``q[query_start_loc[i]:query_start_loc[i+1]]``, which are the
    last tokens of its ``context_lens[i]`` cached tokens, stored in the blocks
    ``block_tables[i]``. Each sequence is computed on its own, so a sequence's result never
    depends on the rest of the batch. A quantized cache is read as ``float(code) * scale``
    (``k_scale/v_scale [num_blocks, block_size, Hkv]``). Returns ``[T, H, D]`` in q's dtype.
    """
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    starts = meta.query_start_loc
    for i, n in enumerate(meta.context_lens):
        s, e = starts[i], starts[i + 1]
        blocks = meta.block_tables[i][: (n + bs - 1) // bs]
        k, v = (_gather(cache, sc, blocks, n) for cache, sc in ((k_cache, k_scale), (v_cache, v_scale)))
        out[s:e] = _attend(q[s:e], k, v, scale)
    return out


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` cached rows ``[n, Hkv, D]`` of a sequence's blocks (dequantized to
    float32 for a quantized cache)."""
    rows = cache.index_select(0, blocks).flatten(0, 1)[:n]
    if kv.is_quantized(cache.dtype):
        return kv.dequantize(rows, scales.index_select(0, blocks).flatten(0, 1)[:n])
    return rows


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [L, H, D]`` (the last L of n positions) over ``k, v [n, Hkv, D]``."""
    L, n = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if L == 1:
        mask, causal = None, False
    elif L == n:
        mask, causal = None, True
    else:
        mask = torch.ones(L, n, dtype=torch.bool, device=q.device).tril(diagonal=n - L)
        causal = False
    o = F.scaled_dot_product_attention(
        qh, kh.to(q.dtype), vh.to(q.dtype), attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=qh.shape[0] != kh.shape[0],
    )
    return o.transpose(0, 1)


def decoder_layers(layers, plan, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                   kv_caches: list, meta: AttentionMetadata):
    """Runs ``layers`` (decoder layers taking and returning ``(h, residual)``) one after the
    other, each through its own modules and ops; ``plan`` is for the fused backends and unused
    here. Returns the last layer's ``(h, residual)``."""
    for layer, kv_layer in zip(layers, kv_caches):
        h, residual = layer(positions, h, residual, kv_layer, meta)
    return h, residual


def decoder_model(model, plan, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                  meta: AttentionMetadata) -> torch.Tensor:
    """``model.forward_parts``: the embedding, the layers (:func:`decoder_layers`' dispatch) and
    the final norm, each through its own op; ``plan`` is for the fused backends. -> ``[T, hidden]``."""
    return model.forward_parts(token_ids, positions, kv_caches, meta)
