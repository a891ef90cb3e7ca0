"""Tool calls on the chat endpoint (OpenAI's ``tools``, ``tool_choice``,
``parallel_tool_calls``): how the tools reach the prompt, how ``required`` and a named
function are enforced, and how a reply is parsed back into ``tool_calls``.

- A chat template that takes ``tools`` gets them; for one that does not, the tools are
  described in a system message, as llama.cpp does, asking for Hermes-style calls
  (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``).
- ``tool_choice="required"`` and a named function constrain the reply with a JSON schema
  (structured outputs), so the call always parses and its arguments match the function's
  parameters: a named function's reply is its arguments object; ``required``'s an array of
  ``{"name", "arguments"}`` (one item at most without ``parallel_tool_calls``).
- ``"auto"`` parses the reply with the parser of the model's family: ``hermes``
  (``<tool_call>`` JSON, Qwen2.5 and the fallback), ``llama3_json`` (a bare JSON object, maybe
  after ``<|python_tag|>``, with ``parameters``) or ``mistral`` (``[TOOL_CALLS]`` then a JSON
  array). The parser comes from the template, or the server's ``--tool-call-parser``.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json", "mistral")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# What a reply starts with when it is a call (before it is complete, its text is held back).
_MARKERS = {"hermes": ("<tool_call>",), "llama3_json": ("<|python_tag|>", "{"), "mistral": ("[TOOL_CALLS]", "[")}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI's ``tool_calls`` item (with ``index`` in a stream's delta)."""
        item = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return item if index is None else {"index": index} | item


def new_call(name: str, arguments: Any) -> ToolCall:
    """A call with a fresh OpenAI-style id; ``arguments`` as JSON text (dicts are dumped)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text, "call_" + uuid.uuid4().hex[:24])


def detect_parser(template: str | None) -> str:
    """The parser of a chat template's model family (``hermes`` when nothing says otherwise)."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` variable."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system message that describes ``tools`` (OpenAI function dicts) to a model whose
    template does not take them (llama.cpp's generic format, with Hermes-style calls)."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call the following tools. Their parameters are JSON schemas.\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a tool, reply with one line per call, and nothing else:\n"
            '<tool_call>{"name": <tool name>, "arguments": <arguments as a JSON object>}</tool_call>\n'
            "Otherwise, answer the user directly.")


def hermes_text(calls: list[dict[str, Any]]) -> str:
    """An assistant message's ``tool_calls`` written as Hermes-style text (for templates that do
    not render calls themselves)."""
    return "\n".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                 "arguments": _json_or_text(c["function"]["arguments"])},
                                                ensure_ascii=False) + "</tool_call>" for c in calls)


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The schema of a named function's reply: its arguments object."""
    return tool["function"].get("parameters") or {"type": "object"}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The schema of a ``required`` reply: an array of calls to any of ``tools`` (one at most
    without ``parallel``). Each tool's parameters schema moves whole under the root's ``$defs``
    (as ``tool<i>``), its local references rewritten to point there: a reference resolves from
    the root of the whole schema, so ``#/$defs/X`` or ``#`` of a tool would otherwise miss."""
    defs = {f"tool{i}": _relocated(named_schema(t), f"#/$defs/tool{i}") for i, t in enumerate(tools)}
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": t["function"]["name"]}, "arguments": {"$ref": f"#/$defs/tool{i}"}}}
                for i, t in enumerate(tools)]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}, "$defs": defs}
    if not parallel:
        array["maxItems"] = 1
    return array


def _relocated(node: Any, base: str) -> Any:
    """``node`` with every local ``$ref`` (``#`` or ``#/...``) made relative to ``base``."""
    if isinstance(node, dict):
        return {k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _relocated(v, base)
                for k, v in node.items()}
    return [_relocated(v, base) for v in node] if isinstance(node, list) else node


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a ``required`` reply (constrained: it parses unless cut by ``max_tokens``)."""
    items = _json_value(text)
    return [new_call(i["name"], i["arguments"]) for i in items or () if isinstance(i, dict) and "name" in i]


def parse_auto(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """The content and the calls of a free reply; text that holds no valid call is content."""
    if parser == "hermes":
        found = _HERMES_CALL.findall(text)
        calls = [c for c in (_call_from_json(s) for s in found) if c is not None]
        if not calls:
            return text, []
        return text[:text.index("<tool_call>")].strip() or None, calls
    body = text.strip().removeprefix("<|python_tag|>" if parser == "llama3_json" else "[TOOL_CALLS]").strip()
    if parser == "llama3_json":
        calls = [_call_from_json(s) for s in re.split(r"\s*;\s*(?=\{)", body) if s.startswith("{")]
    else:
        items = _json_value(body)
        calls = [_call_from_json(json.dumps(i)) for i in items] if isinstance(items, list) else [None]
    if not calls or None in calls:
        return text, []
    return None, calls


def could_be_call(text: str, parser: str) -> bool:
    """Whether a reply's start is, or may grow into, a call (a stream then holds it back)."""
    start = text.lstrip()
    return any(start.startswith(m) or m.startswith(start) for m in _MARKERS[parser]) if start else True


def _call_from_json(text: str) -> ToolCall | None:
    value = _json_value(text)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return new_call(value["name"], args) if isinstance(args, (dict, str)) else None


_NOT_JSON = object()


def _json_value(text: str, default: Any = None) -> Any:
    """``text`` parsed as JSON, or ``default`` when it is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return default


def _json_or_text(value: Any) -> Any:
    """Arguments as a JSON value (OpenAI sends them as JSON text; text that is not JSON stays)."""
    if not isinstance(value, str):
        return value
    parsed = _json_value(value, _NOT_JSON)
    return value if parsed is _NOT_JSON else parsed


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request uses its tools: ``mode`` (``auto``, ``required`` or ``named``),
    the reply's parser (for ``auto``), for ``named`` the function, and whether several calls
    may come in one reply (``parallel_tool_calls``)."""

    mode: str
    parser: str = "hermes"
    name: str | None = None
    parallel: bool = True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished reply's content and calls."""
        if self.mode == "named":
            return (None, [new_call(self.name, text)]) if _json_value(text) is not None else (text, [])
        if self.mode == "required":
            calls = parse_required(text)
            return (None, calls) if calls else (text, [])
        content, calls = parse_auto(text, self.parser)
        return content, calls if self.parallel else calls[:1]

    def stream(self) -> ToolStream:
        """A streamed choice's splitter of content and calls."""
        return ToolStream(self)


class ToolStream:
    """One streamed choice, as OpenAI streams it: ``feed`` returns the content that may be sent
    now and the ``tool_calls`` deltas. A named function's call starts at once (its id, type and
    name, then its arguments as they are generated); otherwise text that is, or may become, a
    call is held back until ``finish`` parses it, and each call then goes out whole."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.sent_any = False
        self.calling = plan.mode != "auto"
        self._named: ToolCall | None = None  # the named function's call, once started

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Adds a text delta; returns (content to send now, tool_calls deltas)."""
        if self.plan.mode == "named":
            return "", self._named_delta(delta)
        buf = self.held + delta
        undecided = self.plan.parser != "hermes" and not self.sent_any and not buf.strip()
        if self.calling or undecided:
            self.held = buf
            return "", []
        cut = self._call_start(buf)
        if cut is not None:
            self.calling = True
        else:
            cut = len(buf) - _marker_prefix(buf, _MARKERS[self.plan.parser][:1])
        self.held, out = buf[cut:], buf[:cut]
        self.sent_any |= bool(out)
        return out, []

    def finish(self, complete: bool) -> tuple[str, list[dict[str, Any]], bool]:
        """At the choice's end (``complete``: it ended by itself, not cut by ``max_tokens`` or
        aborted): the held content, the calls' deltas, and whether the reply called tools."""
        held, self.held = self.held, ""
        if self.plan.mode == "named":
            return "", [], complete and self._named is not None and _json_value(self._named.arguments) is not None
        if not held or not complete or not self.calling:
            return held, [], False
        content, calls = self.plan.parse(held)
        return content or "", [c.openai(i) for i, c in enumerate(calls)], bool(calls)

    def _named_delta(self, delta: str) -> list[dict[str, Any]]:
        """The named call's delta: its header with the first arguments, then argument pieces."""
        if self._named is None:
            self._named = new_call(self.plan.name, delta)
            return [self._named.openai(0)]
        self._named = ToolCall(self._named.name, self._named.arguments + delta, self._named.id)
        return [{"index": 0, "function": {"arguments": delta}}] if delta else []

    def _call_start(self, buf: str) -> int | None:
        """Where a call starts in ``buf`` (None: nowhere yet). Hermes calls may follow content;
        the other formats' calls are the whole reply."""
        if self.plan.parser == "hermes":
            pos = buf.find("<tool_call>")
            return None if pos < 0 else pos
        if not self.sent_any and could_be_call(buf, self.plan.parser):
            return 0
        return None


def _marker_prefix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``markers`` (held back)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                best = max(best, k)
                break
    return best


def prompt_messages(body, template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A chat request's messages for the template, and the template's extra arguments. A template
    that takes tools gets them, the calls and the tool results as they are; for one that does not,
    the tools are described in a system message and calls and results written out as text."""
    takes = template_takes_tools(template)
    messages = [_template_message(m, takes) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tool_mode() else []
    if not tools:
        return messages, {}
    if takes:
        return messages, {"tools": tools}
    described = tools_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"] + "\n\n" + described
    else:
        messages.insert(0, {"role": "system", "content": described})
    return messages, {}


def _template_message(m, takes_tools: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = [c.model_dump() for c in m.tool_calls]
        if takes_tools:
            msg["tool_calls"] = [c | {"function": c["function"] | {"arguments": _json_or_text(c["function"]["arguments"])}}
                                 for c in calls]
        else:
            msg["content"] = "\n".join(filter(None, [msg["content"], hermes_text(calls)]))
    if m.role == "tool":
        if takes_tools:
            msg["tool_call_id"] = m.tool_call_id
        else:
            msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
    return msg
