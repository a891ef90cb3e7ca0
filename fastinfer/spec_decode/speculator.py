"""``Speculator``: what the engine asks for drafts each step. It holds the proposer, decides
when to draft (the backoff) and how many tokens, and counts what verification accepted.

Backoff: no drafts in a step with more running sequences than ``disable_by_batch_size``;
a sequence drafts ``1 + round(recent accepted drafts)`` tokens (at most
``num_speculative_tokens``), so a sequence whose drafts are mostly wrong wastes little; one
whose acceptance rate (a moving average) falls below ``min_acceptance_rate`` stops drafting for
8 steps, then 16, up to 256, and tries again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastinfer.spec_decode.config import SpeculativeConfig
from fastinfer.spec_decode.ngram import NgramProposer

_DECAY = 0.7  # weight of the past in the moving averages
_FIRST_PAUSE, _LONGEST_PAUSE = 8, 256


@dataclass(slots=True)
class _Track:
    """One sequence's recent acceptance."""

    rate: float = 1.0       # accepted / drafted, moving average
    accepted: float = 0.0   # accepted drafts per verification, moving average
    verified: int = 0       # verifications so far
    paused: int = 0         # steps left without drafts
    pause: int = _FIRST_PAUSE  # the next pause's length


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        if config.method != "ngram":
            raise NotImplementedError(f"speculative method {config.method!r} has no proposer yet")
        self.config = config
        self.k = config.num_speculative_tokens
        self.proposer = NgramProposer(self.k, config.prompt_lookup_min, config.prompt_lookup_max)
        self._tracks: dict[int, _Track] = {}
        self.num_drafts = 0           # verifications of at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_at = [0] * self.k  # per draft position: how often it was accepted

    def active(self, num_running: int) -> bool:
        """Whether a step with ``num_running`` sequences drafts at all."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running <= limit

    def draft(self, running: list, grammar_of: Callable[[int], object | None]) -> None:
        """Sets ``spec_token_ids`` of each running sequence (the scheduler's ``Sequence``s): the
        drafts its next step verifies, none where it is not decoding (a prefill to finish, a
        token still in flight) or the step backs off. ``grammar_of(seq_id)``: the sequence's
        grammar matcher (structured outputs), which keeps the drafts it allows."""
        if not self.active(len(running)):
            for seq in running:
                seq.spec_token_ids = []
            return
        for seq in running:
            limit = seq.stop_at - seq.num_tokens - 1  # the verification gives one token more
            if seq.num_computed != seq.num_tokens - 1 or limit <= 0:
                seq.spec_token_ids = []
                continue
            drafts = self.propose(seq.seq_id, seq.token_ids, limit)
            grammar = grammar_of(seq.seq_id) if drafts else None
            seq.spec_token_ids = grammar.valid_prefix(drafts) if grammar is not None else drafts

    def propose(self, seq_id: int, token_ids: list[int], limit: int) -> list[int]:
        """Draft tokens for a sequence whose tokens are ``token_ids`` (at most ``limit``)."""
        track = self._tracks.get(seq_id)
        if track is None:
            track = self._tracks[seq_id] = _Track()
        if track.paused:
            track.paused -= 1
            return []
        want = min(limit, self.k if track.verified == 0 else 1 + round(track.accepted))
        if want <= 0:
            return []
        return self.proposer.propose(token_ids)[:want]

    def record(self, seq_id: int, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` drafts accepted the first ``accepted`` of them."""
        if drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_at[j] += 1
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
        }
