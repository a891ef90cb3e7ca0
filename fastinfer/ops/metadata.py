"""Per-step attention metadata: built once by the ModelRunner, read by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each sequence of a packed batch lives in the paged KV cache.

    - ``slot_mapping [T]`` int64: flat cache slot of each scheduled token.
    - ``query_start_loc``: B+1 offsets of each sequence's queries in the packed batch.
    - ``context_lens``: B ints, cached tokens of each sequence after this step's writes.
    - ``block_tables [B, W]`` int64: block ids of each sequence, padded (with 0).
    - ``max_query_len``: longest query run in the batch (1 for a pure decode step).
    - ``query_start_loc_tensor``, ``context_lens_tensor``: optionally, the same two lists as
      int64 CPU tensors, built once per step for the kernels that take tensors.
    """

    slot_mapping: torch.Tensor
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    max_query_len: int
    query_start_loc_tensor: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None
