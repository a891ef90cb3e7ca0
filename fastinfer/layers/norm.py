"""RMSNorm through ``ops.rms_norm``."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.layers.linear import TracksWeights


class RMSNorm(TracksWeights, nn.Module):
    """Root-mean-square norm over the last dim, computed in float32."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``r = x + residual`` and ``(norm(r), r)`` (one fused op)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
