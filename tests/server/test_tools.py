"""The tool-call parsers of each model family (Hermes, Llama-3 JSON, Mistral), the choice of
parser from a template, and the streamed splitter that holds back a call's text."""
from __future__ import annotations

import json

import pytest

from fastinfer.server.tools import ToolPlan, detect_parser, parse_auto, required_schema, template_takes_tools


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, text, content, calls", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
     "Let me check.", [("f", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": '
     '{"y": "z"}}</tool_call>', None, [("f", {}), ("g", {"y": "z"})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}}', None, [("f", {"x": 1})]),  # EOS before the close
    ("hermes", "No tools needed: 4.", "No tools needed: 4.", []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}', None, [("f", {"x": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"a": [1]}}',
     None, [("f", {}), ("g", {"a": [1]})]),
    ("llama3_json", "The answer is {x}.", "The answer is {x}.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]', None,
     [("f", {"x": 1}), ("g", {})]),
    ("mistral", "[1, 2, 3]", "[1, 2, 3]", []),
])
def test_parsers(parser, text, content, calls):
    got_content, got_calls = parse_auto(text, parser)
    assert got_content == content and _calls(got_calls) == calls
    assert all(c.id.startswith("call_") for c in got_calls)


@pytest.mark.parametrize("template, parser, takes", [
    ("{{ '[TOOL_CALLS]' }}{% if tools %}{% endif %}", "mistral", True),
    ("{% if tools %}<|python_tag|>{% endif %}", "llama3_json", True),
    ("{% for tool in tools %}<tool_call>{% endfor %}", "hermes", True),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes", False),
    (None, "hermes", False),
])
def test_parser_and_tools_from_the_template(template, parser, takes):
    assert detect_parser(template) == parser and template_takes_tools(template) == takes


def _stream(plan: ToolPlan, pieces: list[str], complete: bool = True) -> tuple[str, list, bool]:
    splitter = plan.stream()
    text, deltas = "", []
    for p in pieces:
        out, more = splitter.feed(p)
        text, deltas = text + out, deltas + more
    rest, more, called = splitter.finish(complete)
    return text + rest, deltas + more, called


def _accumulated(deltas: list[dict]) -> list[tuple[str, dict]]:
    """The calls a client (the openai SDK) builds from the deltas: by index, names and arguments
    concatenated, the id from the first."""
    calls: dict[int, dict] = {}
    for d in deltas:
        entry = calls.setdefault(d["index"], {"id": d.get("id"), "name": "", "arguments": ""})
        assert "id" not in d or d["type"] == "function"
        entry["name"] += d.get("function", {}).get("name", "")
        entry["arguments"] += d.get("function", {}).get("arguments", "")
    assert all(c["id"].startswith("call_") for c in calls.values())
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_stream_sends_content_and_holds_the_call():
    splitter = ToolPlan("auto", "hermes").stream()
    assert splitter.feed("Checking <tool") == ("Checking ", [])  # a marker may be starting: held
    assert splitter.feed("_call>{\"name\": \"f\", ") == ("", [])
    assert splitter.feed('"arguments": {"x": 1}}</tool_call>') == ("", [])
    rest, deltas, called = splitter.finish(True)
    assert rest == "" and called and _accumulated(deltas) == [("f", {"x": 1})]


@pytest.mark.parametrize("plan, pieces, text, calls", [
    (ToolPlan("auto", "hermes"), ["Just ", "<b>text</b>", " <tool"], "Just <b>text</b> <tool", []),
    (ToolPlan("auto", "llama3_json"), ["  ", '{"name": "f", ', '"parameters": {}}'], "", [("f", {})]),
    (ToolPlan("auto", "llama3_json"), ["Hello ", '{"name": "f"}'], 'Hello {"name": "f"}', []),
    (ToolPlan("auto", "mistral"), ["[TOOL_CALLS]", ' [{"name": "g", "arguments": {"a": 1}}]'], "", [("g", {"a": 1})]),
    (ToolPlan("named", name="f"), ['{"x"', ": 2}"], "", [("f", {"x": 2})]),
    (ToolPlan("required"), ['[{"name": "f", "arguments": {}}', "]"], "", [("f", {})]),
    (ToolPlan("auto", "hermes", parallel=False),
     ['<tool_call>{"name": "f", "arguments": {}}</tool_call>', '<tool_call>{"name": "g", "arguments": {}}'],
     "", [("f", {})]),
])
def test_stream_splits_like_the_whole_parse(plan, pieces, text, calls):
    got_text, deltas, called = _stream(plan, pieces)
    assert got_text == text and called == bool(calls)
    assert (_accumulated(deltas) if deltas else []) == calls
    whole_content, whole_calls = plan.parse("".join(pieces))
    assert _calls(whole_calls) == calls and (whole_content or "") == (text if not calls else "")


def test_named_call_streams_its_arguments_as_they_come():
    splitter = ToolPlan("named", name="f").stream()
    (first,) = splitter.feed('{"x"')[1]
    assert first["id"].startswith("call_") and first["function"] == {"name": "f", "arguments": '{"x"'}
    assert splitter.feed(": 2}") == ("", [{"index": 0, "function": {"arguments": ": 2}"}}])
    assert splitter.finish(True) == ("", [], True)
    cut = ToolPlan("named", name="f").stream()
    cut.feed('{"x": ')
    assert cut.finish(False)[2] is False  # cut by max_tokens: no call, finish_reason "length"


def test_a_cut_reply_is_content():
    assert _stream(ToolPlan("auto", "hermes"), ["<tool_call>{\"name\": "], complete=False) == \
        ('<tool_call>{"name": ', [], False)


def test_required_schema_limits_parallel_calls():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [v["properties"]["name"]["const"] for v in schema["items"]["anyOf"]]
    assert names == ["f", "g"] and "maxItems" not in required_schema(tools, parallel=True)


def test_required_schema_moves_each_tool_under_defs():
    loc = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    params = {"type": "object", "required": ["at"], "$defs": {"Loc": loc},
              "properties": {"at": {"$ref": "#/$defs/Loc"}, "next": {"$ref": "#"}, "same": {"$ref": "#/properties/at"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    schema = required_schema([tool, tool], parallel=True)
    assert [v["properties"]["arguments"] for v in schema["items"]["anyOf"]] == \
        [{"$ref": "#/$defs/tool0"}, {"$ref": "#/$defs/tool1"}]
    moved = schema["$defs"]["tool1"]["properties"]
    assert moved == {"at": {"$ref": "#/$defs/tool1/$defs/Loc"}, "next": {"$ref": "#/$defs/tool1"},
                     "same": {"$ref": "#/$defs/tool1/properties/at"}}
    assert schema["$defs"]["tool1"]["$defs"] == {"Loc": loc} and params["properties"]["at"] == {"$ref": "#/$defs/Loc"}
