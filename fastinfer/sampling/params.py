"""``SamplingParams``: how one request picks its tokens and when it stops (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, field

# Below this temperature sampling is numerically greedy (logits / T overflow): treat as greedy.
GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping settings.

    ``temperature=0`` means greedy. ``top_k=0`` (or -1) disables top-k. ``stop`` strings are
    matched across token boundaries and cut from the returned text. ``logprobs=k`` returns,
    per generated token, the log-probabilities of the sampled token and of the ``k`` most
    likely tokens (from the model's raw distribution). ``seed`` makes sampling reproducible
    whatever else runs in the batch. Invalid values raise ``ValueError`` naming the field.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1,
               f"top_k must be an int >= 0 (or -1 to disable), got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                     and -(2**63) <= self.seed < 2**63),
               f"seed must be an int in [-2**63, 2**63) or None, got {self.seed!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")
        self.stop_list = self._stop_strings()
        ids = self.stop_token_ids or []
        _check(all(isinstance(t, int) and t >= 0 for t in ids),
               f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        if self.top_k == -1:
            self.top_k = 0

    def _stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops),
               f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        return stops

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_EPS


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
