"""Token embedding through ``ops.embedding``."""
from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops


class Embedding(nn.Module):
    """``weight [vocab, hidden]`` looked up by token id."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(token_ids, self.weight)
