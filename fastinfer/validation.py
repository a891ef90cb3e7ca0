"""The validation layer: each rule about a value that a public entry takes, in one place.

``SamplingParams``, ``EngineConfig``, ``LLM``, ``Engine.add_request``, the CLI (and the server)
call these checks. Each returns the value normalised (numpy scalars to Python ones, a single
stop string to a list) or raises ``InvalidArgumentError`` naming the argument and what was
expected; a value of the wrong type raises ``ArgumentTypeError`` (also a ``TypeError``).
Rules that need the loaded model (vocabulary size, context length, cache size) live in the
engine, which owns those facts.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, NoReturn

import numpy as np

from fastinfer.errors import (ArgumentTypeError, ConfigError, InvalidArgumentError, InvalidRequestError,
                              RequestTypeError)

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the sampler computes in float32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")  # OpenAI's roles

Prompt = str | list[int]
Message = dict[str, str]


def short_repr(value: Any, limit: int = 60) -> str:
    """The value's repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(value: Any) -> str:
    """``type value`` for error messages about a wrong type (``dict {'prompt': 'Hello'}``)."""
    return f"{type(value).__name__} {short_repr(value)}"


def fail(argument: str, expected: str, value: Any, error: type[InvalidArgumentError] = InvalidArgumentError,
         *, wrong_type: bool = False) -> NoReturn:
    """Raises ``error`` (its type-error form when ``wrong_type``): ``<argument> must be
    <expected>, got <value>``."""
    if wrong_type:
        error = RequestTypeError if issubclass(error, InvalidRequestError) else ArgumentTypeError
    got = describe(value) if wrong_type else short_repr(value)
    raise error(f"{argument} must be {expected}, got {got}", argument)


# ----------------------------------------------------------------------------- scalars
def check_int(argument: str, value: Any, *, lo: int | None = None, hi: int | None = None,
              error: type[InvalidArgumentError] = InvalidArgumentError) -> int:
    """An int (numpy integers too, never a bool) within ``[lo, hi]``."""
    expected = "an int" + _bounds(lo, hi, False, False)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        fail(argument, expected, value, error, wrong_type=True)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(argument, expected, value, error)
    return value


def check_float(argument: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False,
                error: type[InvalidArgumentError] = InvalidArgumentError) -> float:
    """A finite real number (int or float, never a bool) within the bounds. Finite means within
    float32's range too: the sampler computes in float32, where 1e300 is already infinity."""
    expected = "a number" + _bounds(lo, hi, lo_open, hi_open)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        fail(argument, expected, value, error, wrong_type=True)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        fail(argument, f"a finite number (at most {FLOAT32_MAX:.3g} in magnitude)", value, error)
    too_low = lo is not None and (number <= lo if lo_open else number < lo)
    too_high = hi is not None and (number >= hi if hi_open else number > hi)
    if too_low or too_high:
        fail(argument, expected, value, error)
    return number


def check_bool(argument: str, value: Any) -> bool:
    """Only ``True`` or ``False`` (``"no"`` and ``1`` are refused, not coerced)."""
    if not isinstance(value, (bool, np.bool_)):
        fail(argument, "a bool (True or False)", value, wrong_type=True)
    return bool(value)


def check_str(argument: str, value: Any, *, allow_empty: bool = False,
              error: type[InvalidArgumentError] = InvalidArgumentError) -> str:
    """A string of valid Unicode (no lone surrogates), non-empty unless ``allow_empty``."""
    if not isinstance(value, str):
        fail(argument, "a string", value, error, wrong_type=True)
    if not value and not allow_empty:
        raise error(f"{argument} is empty", argument)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise error(f"{argument} is not valid Unicode: lone surrogate {bad!r} at index {exc.start}",
                    argument) from exc
    return str(value)  # a str subclass (numpy's str_) becomes a plain str


def check_seed(argument: str, value: Any) -> int:
    """A seed: any signed 64-bit int (every bit of it counts)."""
    return check_int(argument, value, lo=INT64_MIN, hi=INT64_MAX)


def check_choice(argument: str, value: Any, choices: Sequence[str | None],
                 error: type[InvalidArgumentError] = InvalidArgumentError) -> str | None:
    """One of ``choices`` (strings, and None where None is one of them)."""
    if not isinstance(value, str) and not (value is None and None in choices):
        fail(argument, f"one of {list(choices)}", value, error, wrong_type=True)
    if value not in choices:
        fail(argument, f"one of {list(choices)}", value, error)
    return value


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


# ----------------------------------------------------------------------------- lists
def check_str_list(argument: str, value: Any) -> list[str]:
    """None, one non-empty string, or a list/tuple of them -> a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [check_str(argument, value)]
    if not isinstance(value, (list, tuple)):
        fail(argument, "a string or a list of strings", value, wrong_type=True)
    return [check_str(f"{argument}[{i}]", s) for i, s in enumerate(value)]


def check_int_list(argument: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> list[int]:
    """None, or a list/tuple/1-D integer array of ints within ``[lo, hi]`` -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        fail(argument, "a list of ints", value, wrong_type=True)
    return [check_int(f"{argument}[{i}]", t, lo=lo, hi=hi) for i, t in enumerate(value)]


# ----------------------------------------------------------------------------- sizes
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
SIZE_UNITS = ("B, KB, MB, GB, TB (powers of 1000; also K, M, G, T) and KiB, MiB, GiB, TiB "
              "(powers of 1024; also Ki, Mi, Gi, Ti), case-insensitive")


def parse_bytes(argument: str, value: Any) -> int:
    """A size in bytes >= 1: an int, or a string such as ``"2GiB"``, ``"512MB"``, ``"1.5G"``."""
    if isinstance(value, str):
        return check_int(argument, _size_from_text(argument, value), lo=1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        fail(argument, "a number of bytes (int) or a size string such as '2GiB'", value, wrong_type=True)
    return check_int(argument, value, lo=1)


def _size_from_text(argument: str, text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower().removesuffix("b") if m else ""
    scale = 1 if unit == "" else _DECIMAL.get(unit) or _BINARY.get(unit)
    if not m or scale is None:
        fail(argument, f"a number of bytes or a size with a unit: {SIZE_UNITS}", text)
    return int(Decimal(m.group(1)) * scale)  # exact for any length of digits (a float overflows)


def format_bytes(n: int) -> str:
    """``1073741824`` -> ``"1.00 GiB"`` (exact for any size)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{Decimal(n) / scale:.2f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- devices
def parse_device(argument: str, value: Any):
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (also a ``torch.device``) -> ``torch.device``,
    refused when CUDA is absent or has no GPU ``N``. ``"auto"`` is the caller's to resolve."""
    import torch

    expected = "'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)"
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        fail(argument, expected, value, wrong_type=True)
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"{argument} must be {expected}, got {value!r}", argument) from exc
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        fail(argument, expected, value)
    if device.type == "cuda":
        _check_cuda(argument, value, device)
    return device


def _check_cuda(argument: str, text: str, device) -> None:
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"{argument} is {text!r} but CUDA is not available ({why}); use 'cpu' or 'auto'",
                          argument)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{argument} is {text!r} but there are {count} GPU(s): "
                          f"expected cuda:0 to cuda:{count - 1}", argument)


# ----------------------------------------------------------------------------- prompts
def as_prompt(value: Any, argument: str = "prompt") -> Prompt:
    """One prompt: a non-empty string of valid Unicode, or a non-empty sequence of int token
    ids (numpy integers and 1-D integer arrays too) -> ``str`` or ``list[int]``."""
    if isinstance(value, str):
        return check_str(argument, value, error=InvalidRequestError)
    if _is_token_sequence(value):
        ids = [_token(argument, i, t) for i, t in enumerate(_as_sequence(value))]
        if not ids:
            raise InvalidRequestError(f"{argument} is empty (no token ids)", argument)
        return ids
    hint = f"; for one token id pass [{value}]" if isinstance(value, numbers.Integral) else ""
    fail(argument, "a string or a sequence of int token ids" + hint, value, InvalidRequestError, wrong_type=True)


def as_prompts(value: Any, argument: str = "prompts") -> list[Prompt]:
    """``generate``'s first argument: one prompt (a string or a token-id sequence) or a
    list/tuple of prompts -> a list of prompts (empty when given an empty list)."""
    if isinstance(value, str) or (_is_token_sequence(value) and _looks_like_one_token_prompt(value)):
        return [as_prompt(value)]
    if not isinstance(value, (list, tuple)):
        fail(argument, "a string, a sequence of int token ids, or a list of those", value, InvalidRequestError,
             wrong_type=True)
    return [as_prompt(p, f"{argument}[{i}]") for i, p in enumerate(value)]


def _is_token_sequence(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview))


def _looks_like_one_token_prompt(value: Any) -> bool:
    """A sequence whose first item is a scalar (not a prompt of its own) is one token-id prompt."""
    seq = _as_sequence(value)
    return len(seq) > 0 and isinstance(seq[0], (numbers.Number, np.number, np.bool_))


def _as_sequence(value: Any) -> Sequence[Any]:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _token(argument: str, position: int, t: Any) -> int:
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
        raise RequestTypeError(f"{argument} token ids must be ints, got {describe(t)} at position {position}",
                               argument)
    return int(t)


# ----------------------------------------------------------------------------- chat messages
def check_messages(value: Any, argument: str = "messages") -> list[Message]:
    """One conversation: a non-empty list of ``{"role", "content"}`` dicts, roles among
    ``CHAT_ROLES``, content a string -> a list of plain dicts (other keys kept)."""
    expected = "a list of {'role': ..., 'content': ...} dicts"
    if not isinstance(value, (list, tuple)):
        fail(argument, expected, value, InvalidRequestError, wrong_type=True)
    if not value:
        raise InvalidRequestError(f"{argument} is empty: expected {expected}", argument)
    return [_check_message(f"{argument}[{i}]", m) for i, m in enumerate(value)]


def _check_message(argument: str, message: Any) -> Message:
    if not isinstance(message, Mapping):
        fail(argument, "a dict with 'role' and 'content'", message, InvalidRequestError, wrong_type=True)
    for key in ("role", "content"):
        if key not in message:
            raise InvalidRequestError(f"{argument} has no {key!r}: expected a dict with 'role' and 'content'",
                                      argument)
    check_choice(f"{argument}['role']", message["role"], CHAT_ROLES, InvalidRequestError)
    check_str(f"{argument}['content']", message["content"], allow_empty=True, error=InvalidRequestError)
    return dict(message)


def as_conversations(value: Any, argument: str = "messages") -> list[list[Message]]:
    """``chat``'s first argument: one conversation or a list of conversations (an empty list:
    no conversations)."""
    if isinstance(value, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in value):
        return [check_messages(c, f"{argument}[{i}]") for i, c in enumerate(value)]
    return [check_messages(value, argument)]
