"""Error classes raised by fastinfer.

Every bad value given to a public entry (``LLM``, ``Engine``, ``SamplingParams``,
``EngineConfig``, the CLI) raises an ``InvalidArgumentError``: a ``ValueError``, so callers that
only know Python's built-ins still catch it, whose ``argument`` names what was wrong (a
server puts it in the error's ``param``). A value of the wrong type raises
``ArgumentTypeError``, which is also a ``TypeError``.
"""
from __future__ import annotations


class FastInferError(Exception):
    """Base class of every fastinfer-specific error."""


class InvalidArgumentError(FastInferError, ValueError):
    """A public entry got a bad value; ``argument`` names it (None when no single one is to
    blame). Nothing was changed: the engine keeps serving."""

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """A public entry got a value of the wrong type (``ignore_eos="no"``, a dict as prompt)."""


class ConfigError(InvalidArgumentError):
    """An engine setting this machine cannot meet (a GPU that is not there, a KV-cache budget
    larger than the memory there is, a budget that holds no block)."""


class InvalidRequestError(InvalidArgumentError):
    """A request was rejected at submission; the engine state is unchanged."""


class RequestTypeError(InvalidRequestError, ArgumentTypeError):
    """A request holds a value of the wrong type (a dict as prompt, a message without string
    content): an ``InvalidRequestError`` and a ``TypeError``."""


class RequestTooLargeError(InvalidRequestError):
    """A request can never fit: longer than ``max_model_len``, or a sample needing more blocks
    than the whole KV cache."""


class ModelLoadError(FastInferError):
    """A model could not be found or read (unknown path, corrupt, truncated or unsupported file)."""


class NativeExtensionError(FastInferError, ImportError):
    """The compiled extension ``fastinfer._C`` is missing: the package was not built."""


class EngineOverloadedError(FastInferError):
    """``AsyncEngine`` refused a request because its queue is full (``max_queued_requests`` or
    ``max_queued_tokens``); nothing was queued. Retry later (a server answers 429)."""


class EngineShutdownError(FastInferError):
    """``AsyncEngine`` is shutting down or shut down and takes no new request (a server
    answers 503)."""


class EngineDeadError(FastInferError):
    """``AsyncEngine``'s loop stopped on an unexpected error; every request still in it ends
    with this error. Build a new engine."""
