"""Token embedding through ``ops.embedding``."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.layers.linear import TracksWeights


class Embedding(TracksWeights, nn.Module):
    """``weight [vocab, hidden]`` (a float parameter or a quantized ``PackedWeight``) looked up
    by token id; rows come out in the model's dtype. Replacing, moving or casting the weight
    tells the model (the native decoder's plan holds the table)."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = ops.embedding(token_ids, self.weight)
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)
