"""Gated MLP (SwiGLU) with a fused gate/up projection."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.layers.linear import Linear


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; ``gate_up_proj`` holds gate rows then up rows."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
