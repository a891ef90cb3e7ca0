"""What a refused request body did wrong, in words: ``describe(errors)`` turns pydantic's
validation errors into one message and its ``param``, the request field (``messages.0.role``)
and the rule it broke (``must be >= 1, got 0``), without the validator's own vocabulary (its
type names, union branches or URLs)."""
from __future__ import annotations

import json
from typing import Any

from fastinfer.server.protocol import BRANCH_TAGS

# pydantic's error type -> the rule broken, formatted with the error's ctx.
_RULES = {
    "missing": "is required",
    "extra_forbidden": "is not a field of this request",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "none_required": "is not supported (leave it out or send null)",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} characters long",
    "literal_error": "must be {expected}",
}
_NO_VALUE = {"missing", "extra_forbidden"}  # the value is absent, or is the field name itself


def describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The message and ``param`` of a request body's validation errors (the first named, the
    rest counted)."""
    if not errors:
        return "the request body is invalid", None
    param, message = _one(errors[0])
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""), param


def _one(error: dict[str, Any]) -> tuple[str | None, str]:
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "json_invalid":  # its loc holds the character where parsing failed
        where = error.get("loc", ())[-1]
        return None, f"the request body is not valid JSON: {ctx.get('error', 'cannot parse it')} at character {where}"
    if kind == "invalid_combination":  # a rule across fields: its message names them
        where = [_param(error.get("loc", ())), ctx.get("param")]  # the object's path, then its field
        return ".".join(p for p in where if p) or None, error.get("msg", "")
    param = _param(error.get("loc", ()))
    rule = _RULES[kind].format(**_plain(ctx)) if kind in _RULES else _rule_of(error.get("msg", "is invalid"))
    subject = param if param is not None else "the request body"
    if kind in _NO_VALUE:
        return param, f"{subject} {rule}"
    return param, f"{subject} {rule}, got {_json(error.get('input'))}"


def _param(loc: tuple) -> str | None:
    """The field's path (``messages.0.content``): the body's own name and the tags of a union's
    branches left out."""
    parts = [str(p) for p in loc if p != "body" and p not in BRANCH_TAGS]
    return ".".join(parts) or None


def _rule_of(msg: str) -> str:
    """A message of a rule not in ``_RULES`` (a custom error's, already a rule: 'must be ...')."""
    text = msg.removeprefix("Value error, ")
    return text if text.startswith(("must", "is ")) else f"is invalid: {text}"


def _plain(ctx: dict[str, Any]) -> dict[str, Any]:
    """The error's context with whole floats written as integers (``<= 2``, not ``<= 2.0``)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}


def _json(value: Any, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
