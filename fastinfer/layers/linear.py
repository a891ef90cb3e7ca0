"""Linear layer: every matmul goes through ``ops.linear``, with a dense weight or a quantized
``PackedWeight`` (the loader puts one in place of ``weight``)."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops

_generation = [0]


def weights_generation() -> int:
    """A number that changes whenever a :class:`Linear`'s or an :class:`~fastinfer.layers.norm.RMSNorm`'s
    weight or bias is replaced (set or deleted), so that a model can tell when what it derived
    from its weights (the native decoder plan) is stale. In-place updates keep the tensors and
    need no signal."""
    return _generation[0]


class TracksWeights:
    """Mixin for modules whose ``weight`` / ``bias`` attributes others cache (see :func:`weights_generation`)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("weight", "bias"):
            _generation[0] += 1

    def __delattr__(self, name):
        super().__delattr__(name)
        if name in ("weight", "bias"):
            _generation[0] += 1


class Linear(TracksWeights, nn.Module):
    """``y = x @ weight.T + bias`` with ``weight [out_features, in_features]``, dense or packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
