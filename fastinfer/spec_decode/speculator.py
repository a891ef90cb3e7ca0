"""``Speculator``: what the engine asks for drafts each step. It holds the proposer, decides
when to draft (the backoff) and how many tokens, and counts what verification accepted.

Backoff: a step drafts only when its expected tokens per second beat plain decoding's: the
speculator learns what a forward pass of the target (and of a draft model) costs by its number
of tokens (``LinearCost``), and expects each sequence's drafts to be accepted at its recent rate
(a large batch, or drafts mostly wrong, make the step plain). ``disable_by_batch_size``, if set,
turns drafting off above that many running sequences whatever the costs. A draft model that
does not pay stays off for 8 steps, then 16, up to 1,024 (each try first catches the draft
up on the tokens it missed), and for good once a pass of it costs as much as a step of the
target (no acceptance rate could pay for it then); n-gram drafts are weighed at every step.

A sequence drafts ``1 + round(recent accepted drafts)`` tokens (at most
``num_speculative_tokens``), so a sequence whose drafts are mostly wrong wastes little; one
whose acceptance rate (a moving average) falls below ``min_acceptance_rate`` stops drafting for
8 steps, then 16, up to 256, and tries again.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastinfer.spec_decode.config import SpeculativeConfig
from fastinfer.spec_decode.cost import LinearCost
from fastinfer.spec_decode.draft import DraftModel
from fastinfer.spec_decode.ngram import NgramProposer

_log = logging.getLogger("fastinfer.engine")
_DECAY = 0.7  # weight of the past in the moving averages
_PRIOR_RATE = 0.5  # the acceptance rate expected of the first drafts
_FIRST_PAUSE, _LONGEST_PAUSE = 8, 256
_LONGEST_COOLDOWN = 1024


@dataclass(slots=True)
class _Track:
    """One sequence's recent acceptance."""

    rate: float = 1.0       # accepted / drafted, moving average
    accepted: float = 0.0   # accepted drafts per verification, moving average
    verified: int = 0       # verifications so far
    paused: int = 0         # steps left without drafts
    pause: int = _FIRST_PAUSE  # the next pause's length


DRAFT_SLOT = -2
"""Stands in a sequence's ``spec_token_ids`` for a draft that a draft model decodes once the
step is scheduled (the scheduler reserves its slot)."""


class Speculator:
    """Drafts with n-gram lookup, or with ``draft_model`` (a ``DraftModel``) for the
    ``draft_model`` method."""

    def __init__(self, config: SpeculativeConfig, draft_model: DraftModel | None = None) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.draft_model = draft_model
        if config.method == "ngram":
            self.proposer = NgramProposer(self.k, config.prompt_lookup_min, config.prompt_lookup_max)
        elif draft_model is None:
            raise ValueError("speculative method 'draft_model' needs its DraftModel")
        self._tracks: dict[int, _Track] = {}
        self.target_cost = LinearCost()  # one step of the target, by the tokens it computes
        self.num_backoffs = 0  # steps whose drafts the cost model dropped
        self.disabled = False  # a draft model found to cost as much as the target
        self._cooldown, self._next_cooldown = 0, _FIRST_PAUSE  # a draft model's steps off after a backoff
        self._draft_seen = 0.0
        self.num_drafts = 0           # verifications of at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def active(self, num_running: int) -> bool:
        """Whether a step with ``num_running`` sequences drafts at all."""
        limit = self.config.disable_by_batch_size
        return not self.disabled and (limit is None or num_running <= limit)

    def draft(self, running: list, request_of: Callable[[int], tuple[object, object | None]]) -> None:
        """Sets ``spec_token_ids`` of each running sequence (the scheduler's ``Sequence``s): the
        drafts its next step verifies, none where it is not decoding (a prefill to finish, a
        token still in flight) or the step backs off. ``request_of(seq_id)``: the sequence's
        ``SamplingParams`` and grammar matcher (structured outputs; it keeps the drafts it
        allows). A seeded random request never drafts: its tokens stay those of plain sampling,
        whatever the timings that steer the backoff; nor does a random request with a grammar
        under a draft model (a draft the grammar refuses would bias the verification)."""
        if not self.active(len(running)) or self._cooldown:
            self._cooldown = max(0, self._cooldown - 1)
            for seq in running:
                seq.spec_token_ids = []
            return
        decoding = []
        for seq in running:
            limit = seq.stop_at - seq.num_tokens - 1  # the verification gives one token more
            if seq.num_computed != seq.num_tokens - 1 or limit <= 0:
                seq.spec_token_ids = []
                continue
            decoding.append(seq)
            params, grammar = request_of(seq.seq_id)
            if not params.greedy and (params.seed is not None or (grammar is not None and self.draft_model)):
                seq.spec_token_ids = []
                continue
            want = self._want(seq.seq_id, limit)
            if self.draft_model is not None:  # decoded by ``fill`` once scheduled
                seq.spec_token_ids = [DRAFT_SLOT] * want
                continue
            drafts = self.proposer.propose(seq.token_ids)[:want] if want else []
            seq.spec_token_ids = grammar.valid_prefix(drafts) if grammar is not None and drafts else drafts
        if decoding and not self._pays(decoding):
            self.num_backoffs += 1
            for seq in decoding:
                seq.spec_token_ids = []
            if self.draft_model is not None:  # its next try must catch up on all it missed
                self._cooldown, self._next_cooldown = self._next_cooldown, min(2 * self._next_cooldown, _LONGEST_COOLDOWN)
        elif decoding and self.draft_model is not None:
            self._next_cooldown = _FIRST_PAUSE

    def _pays(self, decoding: list) -> bool:
        """Whether drafting these sequences' ``spec_token_ids`` is expected to give more tokens
        per second than decoding them plainly; while the cost of a step with or without the
        drafts is not known lately, the unknown one is tried (drafts first)."""
        drafted = sum(len(seq.spec_token_ids) for seq in decoding)
        if drafted == 0:
            return True
        expected = sum(len(seq.spec_token_ids) * self._rate(seq.seq_id) for seq in decoding)
        return self._worth(len(decoding), drafted, expected, max(len(seq.spec_token_ids) for seq in decoding))

    def _worth(self, batch: int, drafted: int, expected: float, passes: int) -> bool:
        """Whether ``batch`` decoding sequences with ``drafted`` drafts (a draft model decoding
        them in ``passes`` passes), ``expected`` of them accepted, beat plain decoding."""
        plain, spec = self.target_cost.predict(batch), self.target_cost.predict(batch + drafted)
        if plain is None or spec is None:  # explore the side not known lately
            return spec is None
        if self.draft_model is not None:
            per_pass = self.draft_model.cost.predict(batch, flat=True)
            if per_pass is None:
                return True
            if batch == 1 and per_pass >= plain:  # no acceptance can pay for it: off for good
                _log.warning("the draft model's pass (%.1f ms) costs as much as the target's step (%.1f ms): "
                             "speculative decoding is off", per_pass * 1e3, plain * 1e3)
                self.disabled = True
                return False
            spec += passes * per_pass
        return (batch + expected) * plain >= batch * spec

    def may_draft(self, num_running: int) -> bool:
        """Whether drafting is expected to pay with ``num_running`` sequences, judged before any
        draft is proposed (each drafting ``num_speculative_tokens``, accepted at the rate so
        far): whether to settle a step in flight for drafts (asynchronous scheduling), and
        whether a draft model reads prompts as they are prefilled."""
        if not self.active(num_running) or self._cooldown or num_running == 0:
            return False
        drafted = num_running * self.k
        return self._worth(num_running, drafted, drafted * self._rate(-1), self.k)

    def _rate(self, seq_id: int) -> float:
        """A sequence's recent acceptance rate; for one not verified yet, every sequence's so far
        (half before any)."""
        track = self._tracks.get(seq_id)
        if track is not None and track.verified:
            return track.rate
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else _PRIOR_RATE

    def observe_step(self, scheduled: list, seconds: float) -> None:
        """A step ran ``scheduled`` (the scheduler's ``ScheduledSeq``s) in ``seconds``; what a
        draft model spent in it is its own cost, the rest the target's. Only steps that decode
        (or verify) every row are kept: a prefill's cost per token is another curve."""
        if self.draft_model is not None:
            seconds -= self.draft_model.seconds - self._draft_seen
            self._draft_seen = self.draft_model.seconds
        if all(s.num_tokens == 1 for s in scheduled):
            self.target_cost.observe(sum(1 + len(s.spec) for s in scheduled), seconds)

    def fill(self, scheduled: list, block_table: Callable[[int], list[int]], row_of: Callable[[int], object],
             grammar_of: Callable[[int], object | None]) -> dict[int, torch.Tensor]:
        """The draft model decodes the drafts of ``scheduled`` (the scheduler's ``ScheduledSeq``s
        with reserved slots in ``spec``), which replace the slots (fewer where a grammar refuses
        one). Returns the distributions random rows' drafts were drawn from, by sequence id."""
        seqs = [s.seq for s in scheduled]
        drafts, probs = self.draft_model.propose(seqs, [len(s.spec) for s in scheduled],
                                                 [block_table(q.seq_id) for q in seqs],
                                                 [row_of(q.seq_id) for q in seqs])
        out = {}
        for s, d, q in zip(scheduled, drafts, probs):
            grammar = grammar_of(s.seq.seq_id)
            s.spec = grammar.valid_prefix(d) if grammar is not None else d
            if q is not None:
                out[s.seq.seq_id] = q[:len(s.spec)]
        return out

    def _want(self, seq_id: int, limit: int) -> int:
        """How many tokens a sequence drafts now (at most ``limit``): none while paused, else
        one more than it has recently had accepted (``k`` at first)."""
        track = self._tracks.get(seq_id)
        if track is None:
            track = self._tracks[seq_id] = _Track()
        if track.paused:
            track.paused -= 1
            return 0
        return max(0, min(limit, self.k, 1 + round(track.accepted) if track.verified else self.k))

    def record(self, seq_id: int, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` drafts accepted the first ``accepted`` of them."""
        if drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        track = self._tracks.setdefault(seq_id, _Track())
        track.verified += 1
        track.rate = _DECAY * track.rate + (1 - _DECAY) * accepted / drafted
        track.accepted = _DECAY * track.accepted + (1 - _DECAY) * accepted if track.verified > 1 else accepted
        if track.rate < self.config.min_acceptance_rate:
            track.paused, track.pause = track.pause, min(2 * track.pause, _LONGEST_PAUSE)
            track.rate = 1.0  # the next try starts afresh
        elif accepted:
            track.pause = _FIRST_PAUSE

    def forget(self, seq_id: int) -> None:
        self._tracks.pop(seq_id, None)

    def stats(self) -> dict[str, float | int]:
        """Cumulative counts; ``spec_acceptance_rate``: accepted drafts over drafts;
        ``spec_mean_accepted_length``: tokens a verification gives (accepted drafts + 1)."""
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            "spec_mean_accepted_length": 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0,
            "spec_backoff_steps": self.num_backoffs,
        }
