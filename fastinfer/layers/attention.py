"""Self-attention over the paged KV cache."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.layers.linear import Linear
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.common.kv_format import CacheLayer
from fastinfer.common.metadata import AttentionMetadata


class Attention(nn.Module):
    """Fused QKV projection, rotary embedding, cache write, paged attention, output projection."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, qkv_bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, hidden, bias=False, dtype=dtype)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: CacheLayer,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache, k_scale, v_scale = kv_cache
        ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        o = ops.paged_attention(q, k_cache, v_cache, meta, self.scale, k_scale, v_scale)
        return self.o_proj(o.reshape(T, self.q_size))
