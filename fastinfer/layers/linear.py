"""Linear layer: every matmul goes through ``ops.linear``, with a dense weight or a quantized
``PackedWeight`` (the loader puts one in place of ``weight``)."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.common.packed import share_version, weights_changed


class TracksWeights:
    """Mixin for modules whose ``weight`` / ``bias`` a model derives state from: replacing,
    deleting, moving or casting them bumps the model's
    :class:`~fastinfer.common.packed.WeightsVersion`, which the model shares with the module
    (and, when one is put in place, with a packed weight)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("weight", "bias"):
            version = self.__dict__.get("_weights_version")
            if version is not None:
                share_version(self, version)  # a packed weight put in place reports to it too
            weights_changed(self)

    def __delattr__(self, name):
        super().__delattr__(name)
        if name in ("weight", "bias"):
            weights_changed(self)

    def _apply(self, fn, recurse=True):
        weights_changed(self)
        return super()._apply(fn, recurse)


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
