"""``ModelRunner``: the one bridge between scheduled sequences and tensors.

It flattens a step's sequences into one packed batch (no padding), builds the attention
metadata once for all layers, runs the model and returns the logits of each sequence's last
scheduled position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastinfer._native import native
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.ops.kv import CacheLayer
from fastinfer.ops.metadata import AttentionMetadata


@dataclass(frozen=True, slots=True)
class StepInput:
    """Per sequence: the token ids to compute, the position of the first one, and the
    sequence's block table (covering every position up to the last). ``needs_logits`` marks
    the sequences whose last position is sampled (None: all; a prefill chunk that does not
    reach the end of its prompt needs none)."""

    token_ids: list[list[int]]
    start_positions: list[int]
    block_tables: list[list[int]]
    needs_logits: list[bool] | None = None


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """Tensors of one packed step."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_index: torch.Tensor


class ModelRunner:
    """Runs ``model`` over a paged KV cache: ``kv_layers`` holds each layer's
    :class:`~fastinfer.ops.kv.CacheLayer` (keys, values and, quantized, their scales)."""

    def __init__(self, model: LlamaForCausalLM, kv_layers: list[CacheLayer],
                 block_size: int, device: torch.device) -> None:
        self.model, self.kv_layers, self.block_size, self.device = model, kv_layers, block_size, device

    def prepare(self, inp: StepInput) -> PreparedBatch:
        """Packs the batch: ids, positions, slot mapping, block tables, lengths."""
        lens = [len(t) for t in inp.token_ids]
        ends = [s + n for s, n in zip(inp.start_positions, lens)]
        starts_loc = [0]
        for n in lens:
            starts_loc.append(starts_loc[-1] + n)
        flat = [t for ids in inp.token_ids for t in ids]
        positions = torch.cat([torch.arange(s, e) for s, e in zip(inp.start_positions, ends)])
        slots = native.slot_mapping(inp.block_tables, inp.start_positions, ends, self.block_size)
        tables = native.pack_block_tables(inp.block_tables, 0)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(self.device),
            query_start_loc=starts_loc,
            context_lens=ends,
            block_tables=torch.from_numpy(tables).long().to(self.device),
            max_query_len=max(lens),
            query_start_loc_tensor=torch.tensor(starts_loc, dtype=torch.int64),
            context_lens_tensor=torch.tensor(ends, dtype=torch.int64),
        )
        wanted = inp.needs_logits or [True] * len(lens)
        return PreparedBatch(
            token_ids=torch.tensor(flat, dtype=torch.long, device=self.device),
            positions=positions.to(self.device),
            meta=meta,
            last_index=torch.tensor([e - 1 for e, w in zip(starts_loc[1:], wanted) if w],
                                    dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def execute(self, inp: StepInput, all_logits: bool = False) -> torch.Tensor:
        """Runs one step. Returns float32 logits ``[B', vocab]`` of the last position of each
        sequence that ``needs_logits`` (``[T, vocab]`` for every position when ``all_logits``)."""
        batch = self.prepare(inp)
        hidden = self.model(batch.token_ids, batch.positions, self.kv_layers, batch.meta)
        if not all_logits:
            hidden = hidden.index_select(0, batch.last_index)
        return self.model.compute_logits(hidden)
