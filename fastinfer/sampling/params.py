"""``SamplingParams``: how one request picks its tokens and when it stops (vLLM's names)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastinfer.errors import ArgumentTypeError, InvalidArgumentError
from fastinfer.validation import (check_bool, check_choice, check_float, check_int, check_int_list,
                                  check_seed, check_str, check_str_list, fail)

# Below this temperature sampling is numerically greedy (logits / T overflow): treat as greedy.
GREEDY_EPS = 1e-5
# Upper bounds, as OpenAI's API and vLLM set them: n completions per request, and top
# logprobs per token.
MAX_N = 128
MAX_LOGPROBS = 20
# What each streamed output holds (vLLM's names): everything so far, only what is new, or
# nothing until the final output.
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# OpenAI's range for a logit bias.
LOGIT_BIAS_LIMIT = 100.0
# The forms of a structured output (vLLM's ``structured_outputs`` fields).
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's ``StructuredOutputsParams``): exactly one of

    - ``json``: a JSON schema (a dict, or its JSON text);
    - ``regex``: a regular expression the whole output matches;
    - ``choice``: one of these strings, exactly;
    - ``grammar``: a context-free grammar in Lark syntax (llguidance's dialect; a GBNF grammar,
      recognised by its ``::=`` rules, is converted);
    - ``json_object``: ``True`` for any JSON object (OpenAI's ``{"type": "json_object"}``).

    ``whitespace_flexible``: whether JSON may hold whitespace between its tokens (any run of
    spaces, tabs and newlines, as OpenAI allows). False, the default, asks for compact JSON: a
    small model otherwise may write whitespace until ``max_tokens``.
    A request whose grammar completes ends with ``finish_reason="stop"`` (the model's EOS is
    then the only token allowed); one cut by ``max_tokens`` first ends with ``"length"``.
    Invalid schemas, regexes and grammars are refused when the request is submitted.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_flexible: bool = False
    kind: str = field(init=False, repr=False, compare=False, default="")
    _key: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"structured_outputs must set exactly one of {list(STRUCTURED_KINDS)}, got "
                f"{given or 'none'}", "structured_outputs")
        name = "structured_outputs." + given[0]
        value = getattr(self, given[0])
        if given[0] == "json":
            object.__setattr__(self, "json", _json_schema(name, value))
        elif given[0] == "choice":
            if not isinstance(value, (list, tuple)) or not value:
                fail(name, "a non-empty list of strings", value, wrong_type=not isinstance(value, (list, tuple)))
            object.__setattr__(self, "choice", [check_str(f"{name}[{i}]", c) for i, c in enumerate(value)])
        elif given[0] == "json_object":
            check_bool(name, value)
        else:
            check_str(name, value)
        check_bool("structured_outputs.whitespace_flexible", self.whitespace_flexible)
        object.__setattr__(self, "kind", given[0])  # which form this is: one of STRUCTURED_KINDS
        value = getattr(self, given[0])
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        object.__setattr__(self, "_key", (given[0], text, self.whitespace_flexible))

    def key(self) -> tuple[str, str, bool]:
        """A hashable key that names the same grammar for equal specs (the compile cache's);
        computed once, at construction."""
        return self._key

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """None, a ``StructuredOutputsParams``, or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            fail("structured_outputs", "a StructuredOutputsParams or a dict of its fields", value, wrong_type=True)
        unknown = sorted(set(value) - set(STRUCTURED_KINDS) - {"whitespace_flexible"})
        if unknown:
            raise ArgumentTypeError(f"structured_outputs has unknown fields {unknown}; expected "
                                    f"{list(STRUCTURED_KINDS)} and whitespace_flexible", "structured_outputs")
        return cls(**value)


def _json_schema(name: str, value: Any) -> dict[str, Any]:
    """A JSON schema given as a dict or as JSON text -> a dict (a boolean schema is refused)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{name} is not valid JSON: {exc}", name) from exc
    if not isinstance(value, Mapping):
        fail(name, "a JSON schema (an object)", value, wrong_type=True)
    return dict(value)


def check_logit_bias(value: Any) -> dict[int, float] | None:
    """None, or ``{token id: bias}`` with ids >= 0 (ints, or their decimal strings as OpenAI's
    JSON keys are) and biases in [-100, 100] -> a dict of ints to floats."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        fail("logit_bias", "a dict of token id to bias", value, wrong_type=True)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if isinstance(key, str) and not key.isdecimal():
            fail("logit_bias", "keyed by token ids (ints >= 0, or their decimal strings)", key)
        token = check_int(f"logit_bias[{key!r}]", int(key) if isinstance(key, str) else key, lo=0)
        out[token] = check_float(f"logit_bias[{key!r}]", bias, lo=-LOGIT_BIAS_LIMIT, hi=LOGIT_BIAS_LIMIT)
    return out or None


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping settings.

    ``temperature=0`` means greedy. ``top_k=0`` (or -1) disables top-k. ``stop`` strings are
    matched across token boundaries and cut from the returned text. ``logprobs=k`` returns,
    per generated token, the log-probabilities of the sampled token and of the ``k`` most
    likely tokens (from the model's raw distribution). ``seed`` (any signed 64-bit int, all
    of whose bits count) makes sampling reproducible whatever else runs in the batch.

    ``structured_outputs`` (a ``StructuredOutputsParams`` or a dict of its fields) constrains
    every sample's text to a JSON schema, a regex, a choice or a grammar. ``logit_bias``
    (``{token id: bias in [-100, 100]}``) is added to the logits before everything else
    (logprobs included); -100 in effect bans a token.

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
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None
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
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self.logit_bias = check_logit_bias(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_EPS
