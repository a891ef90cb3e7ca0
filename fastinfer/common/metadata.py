"""Per-step attention metadata: built once by the ModelRunner, read by every layer."""
from __future__ import annotations

import array
from dataclasses import dataclass

import torch


def int64_tensor(values: list[int], device: torch.device | None = None) -> torch.Tensor:
    """A list of ints as an int64 tensor on ``device`` (through ``array``: ~1 us on the CPU,
    where ``torch.tensor`` takes ~3 us). To a GPU it goes through pinned memory, so the copy
    never waits for the work already queued on the device."""
    t = torch.frombuffer(array.array("q", values), dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)
    return t if device is None or device.type == "cpu" else upload(t, device)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to the GPU ``device`` without a host sync: staged in pinned memory
    (PyTorch's caching host allocator keeps the block until the copy is done)."""
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each sequence of a packed batch lives in the paged KV cache.

    Device tensors (on the device of ``block_tables``; the kernels read only these, so a
    CUDA graph captured over fixed tensors replays with new contents):

    - ``slot_mapping [T]`` int64: flat cache slot of each scheduled token (-1: a padded token,
      not stored).
    - ``block_tables [B, W]`` int64: block ids of each sequence, padded (with 0).
    - ``query_start_loc_tensor [B+1]``, ``context_lens_tensor [B]`` int64: the two lists below.
      Left out, they are built from the lists at construction (once per step, not per layer).

    Host copies, for the code that loops in Python (the reference) and for launch shapes:

    - ``query_start_loc``: B+1 offsets of each sequence's queries in the packed batch.
    - ``context_lens``: B ints, cached tokens of each sequence after this step's writes.
    - ``max_query_len``: longest query run in the batch (1 for a pure decode step).
    """

    slot_mapping: torch.Tensor
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    max_query_len: int
    query_start_loc_tensor: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        dev = self.block_tables.device
        if self.query_start_loc_tensor is None:
            object.__setattr__(self, "query_start_loc_tensor",
                               int64_tensor(self.query_start_loc, dev))
        if self.context_lens_tensor is None:
            object.__setattr__(self, "context_lens_tensor",
                               int64_tensor(self.context_lens, dev))

    @classmethod
    def one_sequence(cls, start: int, end: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """The metadata of one sequence stored contiguously in block 0 (a block as long as the
        sequence), computing positions ``start..end-1``: slot ``p`` holds position ``p``. For
        loops that run the model outside the engine (calibration, a plain decode baseline)."""
        slots = torch.arange(start, end, device=device)
        return cls(slots, [0, end - start], [end], torch.zeros(1, 1, dtype=torch.long, device=device), end - start)
