"""Structured outputs, tool calls and logit_bias through the real ``openai`` client: 29 JSON
schemas at temperature 0.7 with seeds (whole and streamed, each output validated with
``jsonschema``), ``json_object``, vLLM's ``structured_outputs``, named and ``required`` tool
calls with schema-valid arguments (whole and streamed), tool results replayed in the history,
``logit_bias``, a slow-compiling schema refused alone, and the 400s of bad specs."""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jsonschema
import openai
import pytest

from fastinfer.bench.json_schemas import SCHEMAS, slow_schema
from fastinfer.server.protocol import ChatCompletionRequest
from fastinfer.server.tools import prompt_messages

from fastinfer import SamplingParams
from fastinfer.engine.async_engine import AsyncEngine

from ..conftest import make_engine
from .conftest import Backend, DEFAULT_BACKENDS, ServerSpec, start_server

ASK = [{"role": "user", "content": "Answer in JSON."}]
OBJECT_ASK = [{"role": "user", "content": 'Reply with a JSON object whose key "answer" holds the capital of France.'}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def api(bank, smollm):
    """chat@v1 and slow@v1 (a 0.05 s compile limit): the tiny random model; real@v1: the default
    model (smollm2-135m), whose outputs make sense."""
    backends = {**DEFAULT_BACKENDS, "slow": Backend(grammar_compile_timeout=0.05)}
    tiny = bank.factory(backends)

    def factory(name: str, version: str, source: str) -> AsyncEngine:
        if source == "real":
            return AsyncEngine.from_engine(make_engine(smollm, kv_cache_memory="96MiB", max_model_len=2048))
        return tiny(name, version, source)

    spec = ServerSpec(loads=[("chat", "v1", "v1"), ("slow", "v1", "slow"), ("real", "v1", "real")],
                      max_body_bytes=8 << 20)  # room for the slow schema (750 KB)
    bank_view = SimpleNamespace(factory=lambda _backends: factory)
    server = start_server(bank_view, spec)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return api.client()


def _format(named) -> dict:
    return {"type": "json_schema", "json_schema": {"name": named.name, "schema": named.schema, "strict": True}}


def _streamed_text(stream) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


def _every_schema(client, stream: bool) -> list[tuple[object, str, str | None]]:
    def one(i: int):
        named = SCHEMAS[i]
        # No max_tokens: the default, the rest of the context (512 tokens here).
        ask = [{"role": "user", "content": f"Give me a {named.name.replace('_', ' ')} as JSON."}]
        kw = dict(model="real", messages=ask, response_format=_format(named), temperature=0.7, seed=i)
        if stream:
            return (named, *_streamed_text(client.chat.completions.create(stream=True, **kw)))
        r = client.chat.completions.create(**kw)
        return named, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:  # concurrently: the engine batches them
        return list(pool.map(one, range(len(SCHEMAS))))


@pytest.mark.parametrize("stream", [False, True])
def test_every_schema_output_validates(client, stream):
    assert len(SCHEMAS) >= 20
    results = _every_schema(client, stream)
    for named, text, reason in results:
        assert reason == "stop", (named.name, text)
        jsonschema.validate(json.loads(text), named.schema,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_json_object_gives_an_object(client):
    r = client.chat.completions.create(model="real", messages=OBJECT_ASK, response_format={"type": "json_object"},
                                       temperature=0.8, seed=3, n=4, max_tokens=64)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        assert isinstance(json.loads(c.message.content), dict)


def test_response_format_text_is_no_constraint(client):
    r = client.chat.completions.create(model="chat", messages=ASK, response_format={"type": "text"}, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("spec, check", [
    ({"regex": "[A-Z]{2}-[0-9]{3}"}, lambda t: re.fullmatch("[A-Z]{2}-[0-9]{3}", t)),
    ({"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ({"grammar": 'start: "x" ("y" | "z")'}, lambda t: t in ("xy", "xz")),
    ({"json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
     lambda t: all(0 <= v <= 9 for v in json.loads(t))),
])
def test_vllm_structured_outputs(client, spec, check):
    r = client.completions.create(model="chat", prompt="Go:", max_tokens=64, temperature=0.7, seed=2, n=2,
                                  extra_body={"structured_outputs": spec})
    for c in r.choices:
        assert c.finish_reason == "stop" and check(c.text), (spec, c.text)


# --------------------------------------------------------------------------- tools
def test_named_tool_call_has_schema_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="real", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=[WEATHER, TIME], tool_choice=choice, temperature=0.7, seed=3,
                                       max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_parse_and_validate(client, parallel):
    r = client.chat.completions.create(model="real", messages=[{"role": "user", "content": "Weather and time?"}],
                                       tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel,
                                       temperature=0.7, seed=4, max_tokens=200, n=3)
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls and (parallel or len(c.message.tool_calls) == 1)
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None, str, list]:
    """The calls a client builds from a stream's tool-call deltas, its finish reason, its
    content, and the chunks' choices."""
    calls: dict[int, dict] = {}
    reason, content, seen = None, "", []
    for chunk in stream:
        for c in chunk.choices:
            seen.append(c)
            content += c.delta.content or ""
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": d.id, "type": d.type, "name": "", "arguments": "", "deltas": 0})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
                entry["deltas"] += 1
    return calls, reason, content, seen


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_streamed_tool_call_deltas_accumulate(client, choice):
    stream = client.chat.completions.create(model="real", messages=[{"role": "user", "content": "Time in Tokyo?"}],
                                            tools=[WEATHER, TIME], tool_choice=choice, temperature=0.7, seed=5,
                                            max_tokens=200, stream=True)
    calls, reason, content, seen = _streamed_calls(stream)
    assert reason == "tool_calls" and content == "" and calls
    for entry in calls.values():
        assert entry["id"].startswith("call_") and entry["type"] == "function"
        jsonschema.validate(json.loads(entry["arguments"]), PARAMS[entry["name"]])
    last = seen[-1]  # OpenAI's shape: the finish reason comes alone, after the last delta
    assert last.finish_reason == "tool_calls" and not last.delta.tool_calls and not last.delta.content
    if isinstance(choice, dict):  # a named call's arguments stream as they are generated
        assert calls[0]["name"] == "get_time" and calls[0]["deltas"] > 2


def test_required_tool_with_defs(client):
    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["seat"],
        "properties": {"seat": {"$ref": "#/$defs/Seat"}},
        "$defs": {"Seat": {"type": "object", "additionalProperties": False, "required": ["row", "letter"],
                           "properties": {"row": {"type": "integer", "minimum": 1, "maximum": 40},
                                          "letter": {"enum": ["A", "B", "C"]}}}}}}}
    r = client.chat.completions.create(model="real", messages=[{"role": "user", "content": "Book me a seat."}],
                                       tools=[tool, WEATHER], tool_choice="required", temperature=0.7, seed=6,
                                       max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    for call in c.message.tool_calls:
        params = tool["function"]["parameters"] if call.function.name == "book" else PARAMS["get_weather"]
        jsonschema.validate(json.loads(call.function.arguments), params)


HISTORY = [{"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"}]


def test_tool_results_in_the_history_render(client, api):
    r = client.chat.completions.create(model="chat", messages=HISTORY, tools=[WEATHER], max_tokens=4,
                                       temperature=0)
    tok = api.engine().get_tokenizer()
    body = ChatCompletionRequest.model_validate({"model": "chat", "messages": HISTORY, "tools": [WEATHER]})
    messages, extra = prompt_messages(body, tok.chat_template)
    text = tok.apply_chat_template(messages, **extra)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>' in text
    assert "<tool_response>\n4 degrees, rain\n</tool_response>" in text
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tools, described in the system message
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_tool_choice_none_leaves_the_tools_out(api):
    tok = api.engine().get_tokenizer()
    body = ChatCompletionRequest.model_validate({"model": "chat", "messages": HISTORY, "tools": [WEATHER],
                                                 "tool_choice": "none"})
    messages, extra = prompt_messages(body, tok.chat_template)
    assert not extra and "get_time" not in json.dumps(messages) and "You can call" not in json.dumps(messages)


def test_template_with_tools_gets_them():
    template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}{% endfor %}"
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, "tools": [WEATHER]})
    messages, extra = prompt_messages(body, template)
    assert extra == {"tools": [WEATHER]}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "celsius"}
    assert messages[2] == {"role": "tool", "content": "4 degrees, rain", "tool_call_id": "call_1"}


# --------------------------------------------------------------------------- logit_bias and errors
def test_logit_bias_removes_the_greedy_token(client, smollm):
    prompt = "The capital of France is"
    offline = make_engine(smollm, kv_cache_memory="16MiB")
    rid = offline.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    (token,) = offline.drain([rid])[rid].outputs[0].token_ids
    kw = dict(model="real", prompt=prompt, max_tokens=1, temperature=0)
    first = client.completions.create(**kw).choices[0].text
    assert first == offline.tokenizer.decode([token])
    banned = client.completions.create(logit_bias={str(token): -100}, **kw).choices[0].text
    assert banned != first


def test_slow_compiling_schema_times_out_alone(client):
    results: list[tuple[dict, float]] = []

    def refused(variant: int):
        fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": slow_schema(variant)}}
        try:
            client.chat.completions.create(model="slow", messages=ASK, max_tokens=4, response_format=fmt)
        except openai.BadRequestError as exc:
            results.append((exc.body, time.monotonic()))

    start = time.monotonic()
    # Two distinct slow schemas, one of them sent twice (both wait for the same compile).
    threads = [threading.Thread(target=refused, args=(v,)) for v in (0, 1, 0)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # both slow compiles hold a compile thread now
    free = client.chat.completions.create(model="slow", messages=ASK, max_tokens=4, temperature=0)
    constrained = client.chat.completions.create(model="slow", messages=ASK, temperature=0, max_tokens=40,
                                                 response_format=_format(SCHEMAS[0]))
    for t in threads:
        t.join(30)
    assert len(results) == 3
    for body, slow_done in results:
        assert body["param"] == "response_format"
        assert body["message"].startswith("response_format.json_schema.schema did not compile within 0.05 s")
    assert free.choices[0].finish_reason in ("length", "stop")
    assert constrained.choices[0].message.content.startswith("{")  # its own compile was not held up
    assert max(done for _, done in results) - start < 5  # refused at the limit, not when the compiles end


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "response_format.json_schema.schema is invalid: "),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs",
     "structured_outputs.grammar is invalid: "),
    ({"structured_outputs": {"grammar": "hello"}}, "structured_outputs", "structured_outputs.grammar is invalid: "),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {"type": "strin"}}}],
      "tool_choice": {"type": "function", "function": {"name": "bad"}}}, "tools",
     "tools[1].function.parameters is invalid: "),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needed"),
    ({"response_format": {"type": "xml"}}, "response_format.type", None),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", None),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"tools": [WEATHER], "structured_outputs": {"regex": "([a-z"}}, "structured_outputs",
     "structured_outputs.regex is invalid: "),  # tool_choice auto: the spec is the client's structured_outputs
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": [1], "properties": {"a": {"$ref": "#/$defs/Missing"}}, "required": ["a"]}}}],
      "tool_choice": "required"}, "tools", "tools is invalid: "),
    ({"response_format": {"type": "json_object"}, "logit_bias": {"99999999": 1}}, "logit_bias",
     "outside the vocabulary"),
    ({"structured_outputs": {"json": {}}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "send one of them"),
])
def test_bad_specs_are_400_naming_the_field(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=ASK, max_tokens=4, extra_body=extra)
    body = info.value.body
    assert body["param"] == param, body
    if words and words.endswith(": "):  # the start of the message, naming the field as sent
        assert body["message"].startswith(words), body
    elif words:
        assert words in body["message"], body


def test_tool_message_needs_its_call_id(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", max_tokens=2,
                                       messages=[{"role": "tool", "content": "4 degrees"}])
    assert info.value.body["param"] == "messages.0.tool_call_id"


def test_a_grammar_error_is_a_500_that_says_so(client, api, monkeypatch):
    """A sample whose grammar fails (here: the masks switched off, so the model writes what the
    grammar refuses) is no truncated 200 nor a retryable 503: a 500 with code grammar_error."""
    engine = api.engine("chat").engine
    monkeypatch.setattr(engine.structured, "start_masks", lambda matchers: None)
    spec = {"structured_outputs": {"choice": ["zzzz qqqq"]}}
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="chat", prompt="Go:", max_tokens=8, temperature=0, extra_body=spec)
    assert info.value.body["code"] == "grammar_error"
    stream = client.completions.create(model="chat", prompt="Go:", max_tokens=8, temperature=0, stream=True,
                                       extra_body=spec)
    with pytest.raises(openai.APIError) as streamed:
        list(stream)
    assert "grammar failed" in str(streamed.value)
