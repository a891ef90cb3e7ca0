"""A draft model: a smaller model with the target's tokenizer (or the target's own quantized
copy) proposes ``k`` tokens per sequence by decoding them itself.

Its KV cache has as many blocks as the target's and is addressed through the target's block
tables, so a sequence's blocks hold both models' keys and values for the same positions; the
scheduler reserves the draft positions' slots when it schedules the drafts. A sequence's
``num_draft_computed`` counts the positions whose draft keys and values are valid: the draft
reads each prefill chunk in the step the target does (``catch_up``), and the first pass of each
proposal catches up from there (the tokens the last verification accepted, or all that a step
without speculation left), the next ``k - 1`` passes decode one token each. Preemption resets
it (the scheduler); a verification that rejected drafts leaves it at the target's computed
tokens at most.

Greedy rows draft the draft model's argmax; random rows draw from its distribution under the
request's temperature, top-k, top-p and min-p with the request's own generator, and hand that
distribution to the verification (``Sampler.verify``), which then keeps the target's exactly.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fastinfer import ops
from fastinfer.model.runner import ModelRunner, StepInput
from fastinfer.sampling.rejection import draw_one
from fastinfer.sampling.sampler import Sampler, SamplingRow
from fastinfer.spec_decode.cost import LinearCost


class DraftModel:
    """Proposes with ``runner`` (the draft model over its own KV cache)."""

    def __init__(self, runner: ModelRunner, cache: object = None) -> None:
        self.runner, self.cache = runner, cache  # the cache: kept alive with its runner's views
        self.sampler = Sampler()
        self.cost = LinearCost()  # one pass, by its tokens
        self.seconds = 0.0  # spent in passes so far (the engine takes it out of the target's step time)

    def catch_up(self, seqs: Sequence, ends: list[int], tables: list[list[int]]) -> None:
        """Computes the draft's keys and values of each sequence up to position ``ends[i]`` (a
        prefill chunk the target computes in the same step), so its first drafts do not wait
        for the draft to read the whole prompt."""
        todo = [i for i, seq in enumerate(seqs) if min(seq.num_draft_computed, seq.num_computed) < ends[i]]
        if not todo:
            return
        starts = [min(seqs[i].num_draft_computed, seqs[i].num_computed) for i in todo]
        inp = StepInput([seqs[i].token_ids[s:ends[i]] for i, s in zip(todo, starts)], starts,
                        [tables[i] for i in todo], needs_logits=[False] * len(todo))
        self._execute(inp, observe=False)  # a prefill's cost per token is another curve
        for i in todo:
            seqs[i].num_draft_computed = ends[i]

    def propose(self, seqs: Sequence, ks: list[int], tables: list[list[int]],
                rows: list[SamplingRow]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to ``ks[i]`` drafts for each sequence (scheduler ``Sequence``s, decoding: every
        token but the last computed by the target), with its block table and sampling row;
        and per sequence the draft distributions ``[k, V]`` it drew from (None: greedy)."""
        catch_up = []
        for seq in seqs:
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed)
            catch_up.append(seq.num_draft_computed)
        inp = StepInput([seq.token_ids[start:] for seq, start in zip(seqs, catch_up)], catch_up, tables)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))
        while live:
            # a first pass that catches up on many tokens is a prefill's cost: not a decode pass's
            self._take(self._execute(inp, observe=sum(map(len, inp.token_ids)) <= 2 * len(live)), live, rows,
                       drafts, probs)
            for i in live:
                seqs[i].num_draft_computed = len(seqs[i].token_ids) + len(drafts[i]) - 1
            live = [i for i in live if len(drafts[i]) < ks[i]]
            inp = StepInput([[drafts[i][-1]] for i in live], [len(seqs[i].token_ids) + len(drafts[i]) - 1 for i in live],
                            [tables[i] for i in live])
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _execute(self, inp: StepInput, observe: bool = True) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.runner.execute(inp)
        seconds = time.perf_counter() - start
        if observe:
            self.cost.observe(sum(len(t) for t in inp.token_ids), seconds)
        self.seconds += seconds
        return logits

    def _take(self, logits: torch.Tensor, live: list[int], rows: list[SamplingRow], drafts: list[list[int]],
              probs: list[list[torch.Tensor]]) -> None:
        """Appends one draft to each live sequence: the argmax, or a draw from the distribution."""
        mine = [rows[i] for i in live]
        q = self.sampler.target_probs(logits, mine)
        argmax = ops.argmax(logits).tolist()
        for j, i in enumerate(live):
            if rows[i].params.greedy:
                drafts[i].append(argmax[j])
            else:
                drafts[i].append(draw_one(q[j], rows[i].generator))
                probs[i].append(q[j].clone())
