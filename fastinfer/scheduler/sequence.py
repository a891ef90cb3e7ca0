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

    ``arrival`` orders sequences: lower arrives first and is preempted last. ``stop_at``: the
    length at which it ends by length (prompt + max_tokens, at most max_model_len).
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    arrival: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    stop_at: int = 2**62

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
