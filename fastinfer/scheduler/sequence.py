"""``Sequence``: one token stream the scheduler manages (a request with ``n > 1`` has n)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING <-> PREEMPTED -> FINISHED."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token ids (prompt then output) and how many of them are in the KV cache.

    Sequences are served in ``(priority, arrival)`` order: a lower priority value first, then
    the earlier arrival; the last in that order is preempted first. ``stop_at``: the length at
    which it ends by length (prompt + max_tokens, at most max_model_len). ``fork_of``: the
    sample whose prompt blocks this one shares once that sample has computed them (the ``n``
    samples of one request), instead of computing its own. ``block_hashes`` and
    ``cache_salt`` belong to the prefix cache (``fastinfer.kv_cache``); ``num_cached_tokens``
    is how many prompt tokens its first admission found cached. ``spec_token_ids``: draft
    tokens proposed for its next step (speculative decoding), verified after its last token;
    ``num_draft_computed``: the positions whose keys and values a draft model holds in its own
    cache (0 again when preempted).
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    arrival: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    stop_at: int = 2**62
    priority: int = 0
    cache_salt: str | None = None
    fork_of: Sequence | None = None
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_computed: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """Service order: lower first."""
        return (self.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    def append(self, token_id: int) -> None:
        """Adds a generated token."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
