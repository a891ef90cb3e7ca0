"""Rotary position embedding: a precomputed float32 cos/sin table and ``ops.rotary_embedding``."""
from __future__ import annotations

import math

import torch
from torch import nn

from fastinfer import ops


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies, with Llama-3 style ("llama3") or linear scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_scaling(inv, scaling).float()
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: one divisor per frequency
        factors = torch.tensor(scaling["factors"], dtype=torch.float64)
        if factors.numel() != inv.numel():
            raise ValueError(f"rope_freqs has {factors.numel()} factors, expected {inv.numel()}")
        return (inv / factors).float()
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, freq_factors)")


def _llama3_scaling(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    """Holds ``cos_sin [max_positions, head_dim]`` (cos half, then sin half) in float32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return ops.rotary_embedding(positions, q, k, self.cos_sin)
