"""The OpenAI request bodies the server accepts (pydantic): unknown fields and out-of-range
values are refused with 400 before anything reaches an engine. Ranges follow OpenAI's API
(and fastinfer's ``SamplingParams`` limits)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from fastinfer.sampling.params import MAX_LOGPROBS, MAX_N

# OpenAI's seed is any int64; temperature in [0, 2]; stops: up to 4 strings.
_Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
# Stop strings are matched on every step, so each is capped (as are their number).
_StopStr = Annotated[StrictStr, Field(max_length=256)]
_Stop = _StopStr | Annotated[list[_StopStr], Field(max_length=4)] | None
_TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
# vLLM's request priority: lower is served first; the range is Engine.add_request's.
_Priority = Annotated[StrictInt, Field(ge=-(2**62), le=2**62)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=256)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    stop: _Stop = None
    seed: _Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] = 0.0
    user: StrictStr | None = Field(default=None, max_length=256)
    # vLLM's extensions, which OpenAI clients send through extra_body.
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1.0
    ignore_eos: StrictBool = False
    priority: _Priority = 0

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a list of either
    (a batch: choice ``i * n + j`` is sample ``j`` of prompt ``i``). ``logprobs``: the top
    alternatives per token (0 gives only the sampled token's)."""

    prompt: (Annotated[StrictStr, Field(min_length=1)] | _TokenIds
             | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=64)]
             | Annotated[list[_TokenIds], Field(min_length=1, max_length=64)])
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Literal[False] = False
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | Annotated[list[ContentPart], Field(min_length=1)]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the model's chat template turns ``messages`` into the
    prompt. ``logprobs=true`` returns the sampled tokens' log-probabilities, ``top_logprobs``
    as many alternatives each."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


# ---------------------------------------------------------------------------- admin
class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr = Field(min_length=1, max_length=64)


class LoadBody(VersionBody):
    source: StrictStr = Field(min_length=1, max_length=4096)


class TrafficBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[StrictStr, Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]] = Field(min_length=1)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: StrictStr = Field(default="manual", max_length=256)
