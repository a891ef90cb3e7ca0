"""Continuous batching: each step picks one packed batch of prefills and decodes under a
token budget and a sequence cap; preempts the newest running sequence when blocks run out.
With chunked prefill, a prompt larger than what is left of the budget is computed in pieces
over several steps, so decodes keep flowing while long prompts are read.

The scheduler deals in sequences and block counts only (no tensors, no devices).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastinfer.kv_cache.block_manager import BlockManager
from fastinfer.scheduler.sequence import Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """``seq`` computes its tokens at positions ``[start, start + num_tokens)`` this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this step reaches the sequence's last token, so it samples a new one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """This step's batch, in order."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)


class Scheduler:
    """FCFS continuous batching with recompute preemption (newest first)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True) -> None:
        self.blocks = block_manager
        self.chunked_prefill = chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence (its size was validated at submission)."""
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Builds one step: running sequences first (oldest first), then waiting ones. A step
        that had to preempt admits nobody: memory is short, and re-admitting the sequence it
        just preempted (or another) would only thrash."""
        out = SchedulerOutput()
        preemptions = self.num_preemptions
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if self.num_preemptions == preemptions:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        queue = deque(sorted(self.running, key=lambda s: s.arrival))
        kept: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            need = seq.num_tokens - seq.num_computed
            if need == 1 and seq.num_tokens >= seq.stop_at:
                # Its last token, still in flight (async scheduling), ends it by length: computing
                # that token would only give one past its end.
                kept.append(seq)
                continue
            n = self._chunk(need, budget)
            if n == 0:
                kept.append(seq)  # stays running, waits for the next step
                continue
            target = seq.num_computed + n
            while not self.blocks.can_grow(seq.seq_id, target):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.grow(seq.seq_id, target)
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
                kept.append(seq)
                budget -= n
        self.running = kept
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._chunk(seq.num_tokens, budget)  # a (re)started sequence computes all its tokens
            if n == 0 or not self.blocks.can_grow(seq.seq_id, n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.seq_id, n)
            seq.status, seq.num_computed = SeqStatus.RUNNING, 0
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, 0, n))
            budget -= n

    def _chunk(self, need: int, budget: int) -> int:
        """Tokens of ``need`` to compute this step: a piece when chunking, else all or none."""
        if self.chunked_prefill:
            return min(need, budget)
        return need if need <= budget else 0

    def _preempt(self, seq: Sequence) -> None:
        """Frees the blocks of ``seq``; it is recomputed from scratch when readmitted."""
        self.blocks.free(seq.seq_id)
        seq.status, seq.num_computed = SeqStatus.PREEMPTED, 0
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished (or aborted) sequence and frees its blocks at once."""
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
