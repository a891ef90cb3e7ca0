"""CUDA graphs of decode steps, as vLLM and gpt-fast do.

A decode step of ``B`` sequences launches a few hundred small kernels; replaying a captured
graph launches them all at once. At start-up the runner captures the model's forward (up to the
final norm; the LM head runs after) for batch sizes 1, 2, 4, 8 and then every 8 up to
``max_num_seqs``, over static input buffers: token ids, positions, slot mapping, block tables
(as wide as ``max_model_len``) and context lengths. A step of ``B`` sequences is copied into
the buffers (one host-to-device copy), padded to the next captured size with rows that have
no context and no cache slot (the kernels skip them), and replayed.

The captured kernels read only the buffers' contents, never host values, which is why the
attention kernels size their grids from static shapes alone. The runner captures only when the
decode path's ops take a backend that can be captured (``ModelRunner._capturable``); what is
captured is the forward callable it hands in, ``forward(ids, positions, meta) -> hidden``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastinfer.common.metadata import AttentionMetadata

if TYPE_CHECKING:
    from fastinfer.model.runner import HostBatch, StepInput

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
"""``forward(token_ids [B], positions [B], meta) -> hidden [B, H]``: the model over its cache."""

_log = logging.getLogger("fastinfer.engine")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_num_seqs`` (which is always the last)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """The captured graphs of one model's forward and their static buffers."""

    def __init__(self, forward: Forward, device: torch.device, block_size: int, max_num_seqs: int,
                 max_model_len: int, emulate: bool = False) -> None:
        """The static buffers for every captured size (``capture`` then records the graphs).
        ``emulate`` (for tests on a CPU) captures nothing: a "replay" runs ``forward`` eagerly
        on the static buffers, padding included, which checks everything but the capture."""
        self.forward, self.device, self.emulate = forward, device, emulate
        self.sizes, self.width = capture_sizes(max_num_seqs), -(-max_model_len // block_size)
        dev, bmax, width = device, self.sizes[-1], self.width
        self.ids = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.slots = torch.full((bmax,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.arange(bmax + 1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(bmax, width, dtype=torch.int64, device=dev)
        # Host staging for a step's inputs (pinned: the copy does not block the host); the event
        # marks when the last copy out of it finished.
        self._host = torch.empty(bmax * (4 + width), dtype=torch.int64, pin_memory=dev.type == "cuda")
        self._staging = torch.empty_like(self._host, device=dev)
        self._copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def meta(self, b: int) -> AttentionMetadata:
        # The host lists are placeholders: no captured kernel reads them.
        return AttentionMetadata(self.slots[:b], list(range(b + 1)), [1] * b, self.tables[:b], 1,
                                 self.query_start_loc[:b + 1], self.context_lens[:b])

    def capture(self) -> None:
        """Captures ``forward`` at every size (nothing when emulating)."""
        if self.emulate:
            return
        forward, device = self.forward, self.device
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # the largest first: later graphs reuse its memory
                meta = self.meta(b)
                forward(self.ids[:b], self.positions[:b], meta)  # warm-up (compiles kernels)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[b] = forward(self.ids[:b], self.positions[:b], meta)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        _log.info("captured %d CUDA graphs of decode steps (batch sizes %d..%d) in %.1f s", len(self.sizes),
                  self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def takes(self, inp: StepInput) -> bool:
        """True for a decode step (one token per sequence, each sampled) that a graph covers."""
        return (inp.num_spec is None and len(inp.token_ids) <= self.sizes[-1]
                and all(len(t) == 1 for t in inp.token_ids)
                and (inp.needs_logits is None or all(inp.needs_logits)))

    def run(self, hb: HostBatch, feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Replays the graph for this decode step; returns its hidden states ``[B, hidden]``
        (a view of the graph's output, valid until the next replay). ``feed``: token ids on the
        device that replace the host's at the given rows (see ``ModelRunner.execute``)."""
        B = len(hb.context_lens)
        b = next(s for s in self.sizes if s >= B)
        W = hb.tables.shape[1]
        if W > self.width:
            raise ValueError(f"a block table of {W} blocks is wider than max_model_len allows ({self.width})")
        n = 4 * b + b * W
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy out of the staging buffer is done
        host = self._host[:n].numpy()
        host[: 4 * b] = np.repeat(np.array([0, 0, -1, 0], dtype=np.int64), b)  # padding rows
        host[0:B] = hb.token_ids
        host[b:b + B] = hb.positions
        host[2 * b:2 * b + B] = hb.slots
        host[3 * b:3 * b + B] = hb.context_lens
        host[4 * b:4 * b + B * W] = hb.tables.reshape(-1)
        host[4 * b + B * W:n] = 0
        staging = self._staging[:n]
        staging.copy_(self._host[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))
        self.ids[:b].copy_(staging[0:b])
        if feed is not None:
            self.ids.index_copy_(0, *feed)
        self.positions[:b].copy_(staging[b:2 * b])
        self.slots[:b].copy_(staging[2 * b:3 * b])
        self.context_lens[:b].copy_(staging[3 * b:4 * b])
        self.tables[:b, :W].copy_(staging[4 * b:n].view(b, W))
        if self.emulate:
            return self.forward(self.ids[:b], self.positions[:b], self.meta(b))[:B]
        self.graphs[b].replay()
        return self.outputs[b][:B]


__all__ = ["DecodeGraphs", "capture_sizes"]
