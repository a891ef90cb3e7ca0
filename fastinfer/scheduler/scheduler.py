"""Continuous batching: each step picks one packed batch of prefills and decodes under a
token budget and a sequence cap, in ``(priority, arrival)`` order, and preempts the last
running sequence in that order when blocks run out (by recomputing it later, or by swapping
its blocks to the host tier). With chunked prefill, a prompt larger than what is left of the
budget is computed in pieces over several steps, so decodes keep flowing while long prompts are
read. A sequence being admitted starts after its longest cached prefix; the ``n`` samples of a
request share the prompt's blocks (copy-on-write).

The scheduler deals in sequences and block tables only (no tensors, no devices); the block
copies a step needs travel in its output, for the runner to carry out first.
"""
from __future__ import annotations

import bisect
import operator
from collections import deque
from dataclasses import dataclass, field

from fastinfer.kv_cache.block_manager import BlockManager, BlockOps
from fastinfer.scheduler.sequence import Sequence, SeqStatus


_NO_DRAFTS: tuple[int, ...] = ()


@dataclass(slots=True)
class ScheduledSeq:
    """``seq`` computes its tokens at positions ``[start, start + num_tokens)`` this step, then
    the draft tokens ``spec`` after them, to be verified (speculative decoding; not frozen: one is
    built per sequence per step, and a frozen dataclass builds slower)."""

    seq: Sequence
    start: int
    num_tokens: int
    spec: list[int] | tuple[int, ...] = _NO_DRAFTS

    @property
    def completes(self) -> bool:
        """True when this step reaches the sequence's last token, so it samples a new one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """This step's batch, in order, and the block copies to carry out before it."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_ops: BlockOps = field(default_factory=BlockOps)


PREEMPTION_MODES = ("recompute", "swap", "auto")


class Scheduler:
    """Continuous batching by priority, FCFS within one, with preemption by recompute or swap.

    ``preemption_mode``: ``"recompute"`` frees a preempted sequence's blocks (it is computed
    again, from its cached prefix, when readmitted); ``"swap"`` moves them to the host tier and
    back, so it resumes where it stopped, evicting the tier's cached prefixes for room if need
    be (and recomputes only when swapped-out sequences fill the tier); ``"auto"`` weighs the
    two costs: it swaps into host blocks that hold nothing, and recomputes rather than evict
    cached prefixes that other requests may hit (a copy costs far less than a recompute, but a
    lost prefix costs a recompute to every request that would have hit it).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True, preemption_mode: str = "recompute") -> None:
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        self.blocks = block_manager
        self.chunked_prefill = chunked_prefill
        self.preemption_mode = preemption_mode
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.key
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swap_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence (its size was validated at submission)."""
        seq.status = SeqStatus.WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Builds one step: running sequences first (in service order), then waiting ones. A
        step that had to preempt admits nobody: memory is short, and re-admitting the sequence
        it just preempted (or another) would only thrash; unless a waiting sequence of a better
        priority than running ones does not fit: those are preempted for it first."""
        out = SchedulerOutput()
        self._make_room_for_priority()
        preemptions = self.num_preemptions
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if self.num_preemptions == preemptions:
            self._schedule_waiting(out, budget)
        out.block_ops = self.blocks.take_ops()
        return out

    def _make_room_for_priority(self) -> None:
        """Preempts running sequences of a worse priority (a higher value), worst first, while
        the first waiting sequence has no room (blocks for its first chunk, or a sequence slot)."""
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        first = head.num_tokens - head.num_computed
        need = self.blocks.blocks_for(min(first, self.max_num_batched_tokens) if self.chunked_prefill else first)
        while self.running and (len(self.running) >= self.max_num_seqs or self.blocks.num_free < need):
            worst = max(self.running, key=_key)
            if worst.priority <= head.priority:
                return
            self.running.remove(worst)
            self._preempt(worst)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        self.running.sort(key=_key)
        queue = deque(self.running)
        kept: list[Sequence] = []
        grow, scheduled, running = self.blocks.grow, out.scheduled, SeqStatus.RUNNING
        while queue:
            seq = queue.popleft()
            start = seq.num_computed
            num_tokens = len(seq.token_ids)
            need = num_tokens - start
            if need == 1 and num_tokens >= seq.stop_at:
                # Its last token, still in flight (async scheduling), ends it by length: computing
                # that token would only give one past its end.
                kept.append(seq)
                continue
            n = need if need <= budget else self._chunk(need, budget)
            if n == 0:
                kept.append(seq)  # stays running, waits for the next step
                continue
            drafts = self._drafts(seq, need, budget)
            while not grow(seq, start, start + n + len(drafts)):
                if drafts:  # no room for the drafts: plain decoding first, before preempting
                    drafts = _NO_DRAFTS
                    continue
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is running:
                scheduled.append(ScheduledSeq(seq, start, n, drafts))
                kept.append(seq)
                budget -= n + len(drafts)
        self.running = kept
        return budget

    @staticmethod
    def _drafts(seq: Sequence, need: int, budget: int) -> list[int] | tuple[int, ...]:
        """The draft tokens ``seq`` verifies this step: those proposed, when it decodes (one
        token to compute), as many as the token budget leaves room for."""
        drafts = seq.spec_token_ids
        if not drafts or need != 1:
            return _NO_DRAFTS
        return drafts if len(drafts) < budget else drafts[:budget - 1]

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.fork_of is not None:
                start, n = self._admit_fork(seq, budget)
            elif self.blocks.is_swapped(seq.seq_id):
                start, n = self._admit_swapped(seq, budget)
            else:
                start, n = self._admit(seq, budget)
            if n == 0:
                break
            del self.waiting[0]
            seq.status = SeqStatus.RUNNING
            seq.num_computed = start
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, start, n))
            budget -= n

    def _admit(self, seq: Sequence, budget: int) -> tuple[int, int]:
        """Admits ``seq`` after its longest cached prefix: (first position to compute, tokens
        this step), or (0, 0) when it does not fit."""
        prefix = self.blocks.cached_prefix(seq)
        start = prefix.num_tokens
        n = self._chunk(seq.num_tokens - start, budget)
        if n == 0 or not self.blocks.allocate(seq, prefix, start + n):
            return 0, 0
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = start
        return start, n

    def _admit_fork(self, seq: Sequence, budget: int) -> tuple[int, int]:
        """A sample that shares the prompt of ``seq.fork_of``: once that one has computed its
        prompt, takes its blocks and computes only the last prompt token (for its own first
        token); waits while it has not; admitted alone if it can no longer share."""
        parent, prompt = seq.fork_of, seq.num_prompt_tokens
        if parent.status is SeqStatus.RUNNING and parent.num_computed >= prompt and self.blocks.holds(parent.seq_id):
            if self.blocks.num_free < 1:  # the copy of the block it shares and writes
                return 0, 0
            self.blocks.fork(parent, seq, prompt)
            self.blocks.grow(seq, prompt - 1, prompt)
            seq.fork_of = None
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = parent.num_cached_tokens or 0
            return prompt - 1, 1
        if parent.status is not SeqStatus.FINISHED:
            return 0, 0  # its prompt is still to be computed (or loaded back): wait for it
        seq.fork_of = None
        return self._admit(seq, budget)

    def _admit_swapped(self, seq: Sequence, budget: int) -> tuple[int, int]:
        """Loads a swapped-out sequence back and goes on where it stopped."""
        start = seq.num_computed
        n = self._chunk(seq.num_tokens - start, budget)
        if n == 0 or not self.blocks.swap_in(seq, start, start + n):
            return 0, 0
        return start, n

    def _chunk(self, need: int, budget: int) -> int:
        """Tokens of ``need`` to compute this step: a piece when chunking, else all or none."""
        if self.chunked_prefill:
            return min(need, budget)
        return need if need <= budget else 0

    def _preempt(self, seq: Sequence) -> None:
        """Swaps ``seq`` out to the host tier (it resumes where it stopped) or frees its blocks
        (it is computed again, from its cached prefix, when readmitted)."""
        mode = self.preemption_mode
        if mode != "recompute" and self.blocks.swap_out(seq.seq_id, keep_cached=mode == "auto"):
            self.num_swap_preemptions += 1
        else:
            self.blocks.free(seq.seq_id, seq, seq.num_computed)
            seq.num_computed = 0
        seq.status = SeqStatus.PREEMPTED
        seq.fork_of = None
        seq.num_draft_computed = 0  # a draft model's cache is neither kept nor swapped
        self.num_preemptions += 1
        self._enqueue(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished (or aborted) sequence and frees its blocks at once."""
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq.seq_id, seq, seq.num_computed)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


_key = operator.attrgetter("priority", "arrival")  # Sequence.key, without a call per sequence
