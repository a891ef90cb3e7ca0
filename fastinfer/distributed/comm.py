"""The collectives a tensor-parallel model calls, behind one small interface: ``all_reduce_``
(a sum, in place, after each row-parallel projection and the vocab-parallel embedding) and
``gather_last`` (the vocab-parallel LM head's logits, concatenated in rank order).
``SINGLE`` is the one-rank communicator (no copies, no collective); a ``torch.distributed``
process group (gloo, NCCL) plugs in as another ``Communicator``."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    """One rank's view of its tensor-parallel group. Subclasses implement the collectives; every
    rank must call them in the same order with tensors of the same shape (``gather_last``: the
    same shape but the last dimension)."""

    rank: int = 0
    size: int = 1

    @abstractmethod
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the ranks, in place; returns ``t``."""

    @abstractmethod
    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along the last dimension, in rank order."""


class _Single(Communicator):
    """One rank: the collectives are the identity."""

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        return t


SINGLE: Communicator = _Single()
