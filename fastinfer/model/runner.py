"""``ModelRunner``: the one bridge between scheduled sequences and tensors.

It flattens a step's sequences into one packed batch (no padding), builds the attention
metadata once for all layers (device tensors, uploaded once per step), runs the model,
samples, and hands the engine a :class:`StepFuture` of the sampled tokens. Everything the
engine loop needs from a device goes through here: uploads, events, feeding tokens of a step
still in flight into the next one (asynchronous scheduling), and CUDA graphs.

On a GPU, decode steps (one new token per sequence) replay CUDA graphs captured at start-up
(:class:`~fastinfer.model.cuda_graphs.DecodeGraphs`) unless ``enforce_eager``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastinfer._native import native
from fastinfer.common.kv_format import CacheLayer
from fastinfer.common.metadata import AttentionMetadata, int64_tensor, upload
from fastinfer.kv_cache.block_manager import BlockOps
from fastinfer.model.cuda_graphs import DecodeGraphs
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.model.step import Feed, StepFuture
from fastinfer.ops import reference
from fastinfer.ops.dispatch import forcing, select

if TYPE_CHECKING:  # sampling sits above model/ (DESIGN.md): the engine hands its sampler in
    from fastinfer.sampling.grammar import TokenMasks
    from fastinfer.sampling.sampler import Sampler, SamplingRow

_log = logging.getLogger("fastinfer.engine")


@dataclass(frozen=True, slots=True)
class StepInput:
    """Per sequence: the token ids to compute, the position of the first one, and the
    sequence's block table (covering every position up to the last). ``needs_logits`` marks
    the sequences whose last position is sampled (None: all; a prefill chunk that does not
    reach the end of its prompt needs none). ``block_ops``: the block copies (swaps,
    copy-on-write) to carry out before the forward pass. ``num_spec`` (speculative decoding):
    per sequence, how many of its last token ids are drafts to verify; a sequence that needs
    logits then gets them for its last ``num_spec + 1`` positions (None: no drafts)."""

    token_ids: list[list[int]]
    start_positions: list[int]
    block_tables: list[list[int]]
    needs_logits: list[bool] | None = None
    block_ops: BlockOps | None = None
    num_spec: list[int] | None = None

    def drafts(self) -> list[list[int]]:
        """The draft tokens of each sequence that needs logits, in order."""
        wanted = self.needs_logits or [True] * len(self.token_ids)
        return [ids[len(ids) - k:] if k else [] for ids, k, w in zip(self.token_ids, self.num_spec, wanted) if w]


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """Tensors of one packed step (on the runner's device)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_index: torch.Tensor


@dataclass(frozen=True, slots=True)
class HostBatch:
    """One packed step as host arrays, before upload."""

    token_ids: np.ndarray        # [T] int64
    positions: np.ndarray        # [T] int64
    slots: np.ndarray            # [T] int64
    tables: np.ndarray           # [B, W] int64
    query_start_loc: list[int]
    context_lens: list[int]
    max_query_len: int
    last_index: np.ndarray       # [B'] int64
    query_start_loc_array: np.ndarray  # [B + 1] int64, query_start_loc's values
    context_lens_array: np.ndarray     # [B] int64, context_lens' values


class ModelRunner:
    """Runs ``model`` over a paged KV cache: ``kv_layers`` holds each layer's
    :class:`~fastinfer.common.kv_format.CacheLayer` (keys, values and, quantized, their scales).
    ``ops_backend`` forces a backend of ``fastinfer.ops`` during this runner's steps (None:
    the usual choice, or ``FASTINFER_OPS_BACKEND``). ``copy_blocks`` carries out a step's
    ``block_ops`` (``KVCache.apply``) before its forward pass."""

    def __init__(self, model: LlamaForCausalLM, kv_layers: list[CacheLayer], block_size: int,
                 device: torch.device, ops_backend: str | None = None, sampler: Sampler | None = None,
                 copy_blocks: Callable[[BlockOps], None] | None = None) -> None:
        self.model, self.kv_layers, self.block_size, self.device = model, kv_layers, block_size, device
        self.ops_backend = ops_backend
        self.num_slots = kv_layers[0].k.shape[0] * block_size if kv_layers else 0
        self.graphs: DecodeGraphs | None = None  # once captured
        self.sampler = sampler  # what ``launch`` samples with (None: the runner only executes)
        self.copy_blocks = copy_blocks

    def pack(self, inp: StepInput) -> HostBatch:
        """The step's host arrays: ids, positions, slot mapping, block tables, lengths."""
        # One native call (fastinfer._C.pack_step): its ~25 numpy and list operations in Python
        # took 60-120 us of every decode step.
        ids, pos, slots, tables, qsl, ctx, qsl_list, ctx_list, max_len, last = native.pack_step(
            inp.token_ids, inp.start_positions, inp.block_tables, inp.needs_logits or [], inp.num_spec or [],
            self.block_size, self.num_slots)
        return HostBatch(ids, pos, slots, tables, qsl_list, ctx_list, max_len, last, qsl, ctx)

    def prepare(self, inp: StepInput) -> PreparedBatch:
        """Packs the batch and uploads it (to a GPU: all of it in one host-to-device copy, which
        does not wait for the steps still running there)."""
        hb = self.pack(inp)
        parts = [hb.token_ids, hb.positions, hb.slots, hb.tables.reshape(-1), hb.query_start_loc_array,
                 hb.context_lens_array, hb.last_index]
        if self.device.type == "cpu":
            ids, pos, slots, tables, qsl, ctx, last = (torch.from_numpy(p) for p in parts)
        else:
            flat = upload(torch.from_numpy(np.concatenate(parts)), self.device)
            ids, pos, slots, tables, qsl, ctx, last = flat.split([len(p) for p in parts])
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=hb.query_start_loc, context_lens=hb.context_lens,
            block_tables=tables.view(hb.tables.shape), max_query_len=hb.max_query_len,
            query_start_loc_tensor=qsl, context_lens_tensor=ctx,
        )
        return PreparedBatch(ids, pos, meta, last)

    @torch.inference_mode()
    def execute(self, inp: StepInput, all_logits: bool = False,
                feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Runs one step. Returns float32 logits ``[B', vocab]`` of the last position of each
        sequence that ``needs_logits`` (``[T, vocab]`` for every position when ``all_logits``).
        ``feed``: (positions in the packed batch, token ids), device tensors whose ids replace
        the host's at those positions: tokens a step still in flight has sampled (asynchronous
        scheduling), read by this step on the device with no host sync."""
        if inp.block_ops:
            self.apply_block_ops(inp.block_ops)
        with forcing(self.ops_backend):
            if self.graphs is not None and not all_logits and self.graphs.takes(inp):
                hidden = self.graphs.run(self.pack(inp), feed)
            else:
                batch = self.prepare(inp)
                if feed is not None:
                    batch.token_ids.index_copy_(0, *feed)
                hidden = self.model(batch.token_ids, batch.positions, self.kv_layers, batch.meta)
                if not all_logits and batch.last_index.shape[0] != hidden.shape[0]:
                    # (as many last rows as rows: every row is one, in order, and the copy is skipped)
                    hidden = hidden.index_select(0, batch.last_index)
            return self.model.compute_logits(hidden)

    def apply_block_ops(self, ops: BlockOps) -> None:
        """Carries out block copies (swaps, copy-on-write) in the KV cache, in their order."""
        if self.copy_blocks is None:
            raise RuntimeError("internal error: block copies asked of a runner with no cache to copy in")
        self.copy_blocks(ops)

    def launch(self, inp: StepInput, rows: list[SamplingRow] | None = None, feed: Feed | None = None,
               masks: TokenMasks | None = None, draft_probs: list | None = None) -> StepFuture:
        """Runs one step and samples a token for each sequence that ``needs_logits``, in order:
        with ``rows`` (one per such sequence) on the host's terms (random draws, penalties,
        logprobs, grammar ``masks`` filled meanwhile, applied outside any CUDA graph), the
        future then done; without (every row passes ``Sampler.can_defer``) on
        the device, where the tokens stay until the host asks (:meth:`StepFuture.token_ids`),
        so the next step can be launched first and ``feed`` them on the device. A step with
        drafts (``inp.num_spec``) verifies them on the host's terms: each row's tokens are then
        a list, its accepted drafts and one token more (``Sampler.verify``, given the
        distributions ``draft_probs`` the drafts were drawn from)."""
        logits = self.execute(inp, feed=self._feed(feed))
        if logits.shape[0] == 0:
            return StepFuture.done([], [])
        if inp.num_spec is not None:
            out = self.sampler.verify(logits, rows, inp.drafts(), masks, draft_probs)
            return StepFuture.done(out.token_ids, out.logprobs)
        if rows is not None:
            out = self.sampler(logits, rows, masks)
            return StepFuture.done(out.token_ids, out.logprobs)
        return StepFuture.on_device(self.sampler.sample_on_device(logits))

    @staticmethod
    def _feed(feed: Feed | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``feed`` as device tensors: (positions in the packed batch, the token ids), gathered
        from the in-flight steps' tokens with one upload for both index lists."""
        if feed is None or not feed.positions:
            return None
        futures = feed.futures
        tokens = futures[0].tokens if len(futures) == 1 else torch.cat([f.tokens for f in futures])
        n = len(feed.positions)
        index = int64_tensor(feed.positions + feed.sources, tokens.device)
        return index[:n], tokens.index_select(0, index[n:])

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, emulate: bool = False) -> bool:
        """Captures CUDA graphs of decode steps (see :mod:`fastinfer.model.cuda_graphs`); False
        where they cannot be used (not a GPU, or an op of the decode path would take a backend
        that cannot be captured)."""
        if (self.device.type != "cuda" and not emulate) or not self.kv_layers:
            return False
        layers = self.kv_layers
        graphs = DecodeGraphs(lambda ids, pos, meta: self.model(ids, pos, layers, meta), self.device,
                              self.block_size, max_num_seqs, max_model_len, emulate)
        with forcing(self.ops_backend):
            if not self._capturable(graphs.meta(1)):
                _log.info("CUDA graphs off: an op of the decode path takes a backend that cannot be captured")
                return False
            graphs.capture()
        self.graphs = graphs
        return True

    def _capturable(self, meta: AttentionMetadata) -> bool:
        """True when the decode path's attention and cache write take a backend that can be
        captured for the graphs' metadata ``meta`` (block tables as wide as ``max_model_len``):
        not the reference, which loops over sequences in Python and cannot skip a padded slot."""
        layer, model = self.kv_layers[0], self.model
        attn = model.layers[0].self_attn
        q = torch.zeros(1, attn.num_heads, attn.head_dim, dtype=model.norm.weight.dtype, device=self.device)
        kv_row = torch.zeros(1, attn.num_kv_heads, attn.head_dim, dtype=q.dtype, device=q.device)
        cache_write = select("reshape_and_cache", kv_row, kv_row, layer.k, layer.v, meta.slot_mapping,
                             layer.k_scale, layer.v_scale)
        attention = select("paged_attention", q, layer.k, layer.v, meta, attn.scale, layer.k_scale, layer.v_scale)
        return cache_write is not reference.reshape_and_cache and attention is not reference.paged_attention
