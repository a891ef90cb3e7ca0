"""``SamplingParams``: how one request picks its tokens and when it stops (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastinfer.validation import (check_bool, check_choice, check_float, check_int, check_int_list,
                                  check_seed, check_str_list)

# Below this temperature sampling is numerically greedy (logits / T overflow): treat as greedy.
GREEDY_EPS = 1e-5
# Upper bounds, as OpenAI's API and vLLM set them: n completions per request, and top
# logprobs per token.
MAX_N = 128
MAX_LOGPROBS = 20
# What each streamed output holds (vLLM's names): everything so far, only what is new, or
# nothing until the final output.
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping settings.

    ``temperature=0`` means greedy. ``top_k=0`` (or -1) disables top-k. ``stop`` strings are
    matched across token boundaries and cut from the returned text. ``logprobs=k`` returns,
    per generated token, the log-probabilities of the sampled token and of the ``k`` most
    likely tokens (from the model's raw distribution). ``seed`` (any signed 64-bit int, all
    of whose bits count) makes sampling reproducible whatever else runs in the batch.

    ``output_kind`` says what the outputs of a request carry while it runs: ``"cumulative"``
    (everything so far, the default), ``"delta"`` (only the text, token ids and logprobs new
    since the previous output, so a long stream costs linear time) or ``"final_only"`` (one
    output, at the end). Streamed text that a stop string may still cut is held back until it
    is safe; a final output always carries everything (its delta, for ``"delta"``).

    Every field checks its type and range: a bad value raises ``InvalidArgumentError`` (a
    ``ValueError``) naming the field, a wrong type ``ArgumentTypeError`` (also a
    ``TypeError``). Floats must be finite. Limits: ``n <= 128``, ``logprobs <= 20``.
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
    output_kind: str = "cumulative"
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.n = check_int("n", self.n, lo=1, hi=MAX_N)
        self.max_tokens = check_int("max_tokens", self.max_tokens, lo=1)
        self.temperature = check_float("temperature", self.temperature, lo=0)
        self.top_p = check_float("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        self.top_k = check_int("top_k", self.top_k, lo=-1)
        self.min_p = check_float("min_p", self.min_p, lo=0, hi=1)
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty, lo=0, lo_open=True)
        self.presence_penalty = check_float("presence_penalty", self.presence_penalty, lo=-2, hi=2)
        self.frequency_penalty = check_float("frequency_penalty", self.frequency_penalty, lo=-2, hi=2)
        self.stop_list = check_str_list("stop", self.stop)
        self.stop_token_ids = check_int_list("stop_token_ids", self.stop_token_ids, lo=0)
        self.ignore_eos = check_bool("ignore_eos", self.ignore_eos)
        if self.seed is not None:
            self.seed = check_seed("seed", self.seed)
        if self.logprobs is not None:
            self.logprobs = check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        self.output_kind = check_choice("output_kind", self.output_kind, OUTPUT_KINDS)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_EPS
