"""The OpenAI request bodies the server accepts (pydantic): unknown fields, wrong JSON types and
out-of-range values are refused with 400 before anything reaches an engine. Ranges follow
OpenAI's API (and fastinfer's ``SamplingParams`` limits).

Every field is strict: a number sent as a string is refused, as is a boolean for a number (an
integer is a valid float, as in JSON). A field of several shapes (``prompt``, ``stop``, a
message's ``content``) is validated against the one shape that matches the input's JSON type, so
that an error names that shape's rule, not every shape's; the shapes' tags (``BRANCH_TAGS``)
are left out of an error's location."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictFloat, StrictInt, StrictStr, Tag,
                      model_validator)
from pydantic_core import PydanticCustomError

from fastinfer.sampling.params import MAX_LOGPROBS, MAX_N

BRANCH_TAGS = frozenset({"a string", "an array", "token ids", "strings", "token-id arrays"})


def _float(**bounds: float) -> Any:
    """A strict, finite JSON number within ``bounds`` (``ge``, ``gt``, ``le``)."""
    return Annotated[StrictFloat, Field(allow_inf_nan=False, **bounds)]


def _json_type(value: Any) -> str | None:
    """The union branch of a string-or-array field for ``value`` (None: neither)."""
    return "a string" if isinstance(value, str) else "an array" if isinstance(value, list) else None


def _string_or_array(text: Any, array: Any, rule: str) -> Any:
    """A field that is a string or an array, validated by the shape of the input's JSON type;
    any other type is refused with ``rule``."""
    return Annotated[Union[Annotated[text, Tag("a string")], Annotated[array, Tag("an array")]],
                     Discriminator(_json_type, custom_error_type="wrong_type", custom_error_message=rule)]


def _combination(param: str, message: str) -> PydanticCustomError:
    """A refused combination of fields, reported on ``param``."""
    return PydanticCustomError("invalid_combination", message, {"param": param})


# OpenAI's seed is any int64; temperature in [0, 2]; stops: up to 4 strings.
_Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
# Stop strings are matched on every step, so each is capped (as are their number).
_StopStr = Annotated[StrictStr, Field(max_length=256)]
_Stop = _string_or_array(_StopStr, Annotated[list[_StopStr], Field(max_length=4)],
                         "must be a string or an array of up to 4 strings") | None
# Token ids are checked against the model's vocabulary (>= 0 and < its size) once it is routed.
_TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


def _prompt_array_shape(value: list) -> str:
    """Which array shape a prompt array is, by its first item (token ids when empty)."""
    first = value[0] if value else None
    return "strings" if isinstance(first, str) else "token-id arrays" if isinstance(first, list) else "token ids"


_PromptArray = Annotated[
    Union[Annotated[_TokenIds, Tag("token ids")],
          Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=64), Tag("strings")],
          Annotated[list[_TokenIds], Field(min_length=1, max_length=64), Tag("token-id arrays")]],
    Discriminator(_prompt_array_shape)]
_Prompt = _string_or_array(Annotated[StrictStr, Field(min_length=1)], _PromptArray,
                           "must be a string, an array of token ids, or an array of strings or of token-id arrays")
# vLLM's request priority: lower is served first; the range is Engine.add_request's.
_Priority = Annotated[StrictInt, Field(ge=-(2**62), le=2**62)]


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the reply must match."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: StrictStr | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or
    ``json_schema`` (which then needs ``json_schema``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _combination("json_schema", "response_format.json_schema is needed with "
                               "type 'json_schema', and allowed only with it")
        return self


class StructuredOutputsBody(BaseModel):
    """vLLM's ``structured_outputs`` (sent through the OpenAI client's ``extra_body``): exactly
    one of ``json`` (a schema), ``regex``, ``choice``, ``grammar`` (Lark or GBNF) or
    ``json_object``; see ``fastinfer.sampling.params.StructuredOutputsParams``."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = Field(default=None, max_length=16384)
    choice: Annotated[list[StrictStr], Field(min_length=1, max_length=1024)] | None = None
    grammar: StrictStr | None = Field(default=None, max_length=262144)
    json_object: StrictBool | None = None
    whitespace_flexible: StrictBool = False

    def fields(self) -> dict[str, Any]:
        """The fields given, by ``StructuredOutputsParams``' names."""
        return self.model_dump(by_alias=True, exclude_none=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=256)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: _float(ge=0, le=2) = 1.0
    top_p: _float(gt=0, le=1) = 1.0
    stop: _Stop = None
    seed: _Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: _float(ge=-2, le=2) = 0.0
    frequency_penalty: _float(ge=-2, le=2) = 0.0
    user: StrictStr | None = Field(default=None, max_length=256)
    # vLLM's extensions, which OpenAI clients send through extra_body.
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0
    min_p: _float(ge=0, le=1) = 0.0
    repetition_penalty: _float(gt=0, le=10) = 1.0
    ignore_eos: StrictBool = False
    priority: _Priority = 0
    # {token id (as a string, JSON's keys are): bias in [-100, 100]}, as OpenAI's.
    logit_bias: Annotated[dict[StrictStr, _float(ge=-100, le=100)], Field(max_length=1024)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @model_validator(mode="after")
    def _field_combinations(self):
        if self.stream_options is not None and not self.stream:
            raise _combination("stream_options", "stream_options is only allowed when stream is true")
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise _combination("structured_outputs", "structured_outputs and response_format each constrain the "
                               "output: send one of them")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a list of either
    (a batch: choice ``i * n + j`` is sample ``j`` of prompt ``i``). ``logprobs``: the top
    alternatives per token (0 gives only the sampled token's). ``echo``: each choice's text
    starts with its prompt's."""

    prompt: _Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
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


_FunctionName = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: _FunctionName
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCallItem(BaseModel):
    """A call in a replayed assistant message's ``tool_calls``."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """A message of the conversation. An assistant message may carry ``tool_calls`` (its
    ``content`` may then be null); a ``tool`` message answers the call ``tool_call_id``."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: _string_or_array(StrictStr, Annotated[list[ContentPart], Field(min_length=1)],
                              "must be a string or an array of content parts") | None = None
    name: StrictStr | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(min_length=1, max_length=128)] | None = None
    tool_call_id: StrictStr | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _roles_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise _combination("tool_calls", "only an assistant message may carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise _combination("tool_call_id", "a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and self.tool_calls is None:
            raise _combination("content", "content is required (it may be null only beside tool_calls)")
        return self

    def text(self) -> str:
        """The message's text; content parts are joined with a newline, as vLLM does."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: _FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(BaseModel):
    """One of ``tools``: a function the model may call."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: _FunctionName


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function the model must call."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the model's chat template turns ``messages`` into the
    prompt. ``logprobs=true`` returns the sampled tokens' log-probabilities, ``top_logprobs``
    as many alternatives each."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _combination("top_logprobs", "top_logprobs needs logprobs=true")
        self._check_tool_choice()
        return self

    def _check_tool_choice(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise _combination("tools", "tools must have distinct function names")
        choice = self.tool_choice
        if choice in (None, "none", "auto"):
            return
        if not names:
            raise _combination("tool_choice", "tool_choice 'required' or a named function needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise _combination("tool_choice", f"tool_choice names function {choice.function.name!r}, which is "
                               f"not among tools ({', '.join(names)})")
        if self.response_format is not None and self.response_format.type != "text" or self.structured_outputs:
            raise _combination("tool_choice", "tool_choice 'required' or a named function constrains the output: "
                               "it cannot be combined with response_format or structured_outputs")

    def tool_mode(self) -> str | None:
        """How tools are used: None (no tools, or ``tool_choice="none"``), ``"auto"``,
        ``"required"`` or ``"named"``."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self.tool_choice in (None, "auto"):
            return "auto"
        return "required" if self.tool_choice == "required" else "named"


# ---------------------------------------------------------------------------- admin
class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr = Field(min_length=1, max_length=64)


class LoadBody(VersionBody):
    source: StrictStr = Field(min_length=1, max_length=4096)


class TrafficBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[StrictStr, _float(ge=0, le=100)] = Field(min_length=1)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: StrictStr = Field(default="manual", max_length=256)
