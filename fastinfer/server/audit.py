"""The server's audit log: one JSON line per finished request (who, which model, how many
tokens, how long, how it ended). Prompts are written only when asked for (``--log-prompts``):
they may hold private data."""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any, TextIO

AUDIT_FIELDS = ("time", "request_id", "endpoint", "key_id", "model", "version", "prompt_tokens", "output_tokens",
                "ttft", "latency", "finish_reason", "status")

_log = logging.getLogger("fastinfer.server")


def utc_timestamp(now: datetime | None = None) -> str:
    """ISO-8601 UTC with millisecond precision and a ``Z``: ``2026-11-27T10:04:05.123Z``."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends one JSON line per request to ``target``: a file path (opened in append mode,
    line-buffered, closed by ``close``), a text stream such as ``sys.stderr`` (flushed, never
    closed here), or None (disabled: ``record`` does nothing). Thread-safe."""

    def __init__(self, target: str | os.PathLike | TextIO | None, *, log_prompts: bool = False) -> None:
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._owned = isinstance(target, (str, os.PathLike))
        self._stream: TextIO | None = (open(target, "a", buffering=1, encoding="utf-8") if self._owned
                                       else target)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def record(self, *, key_id: str | None, model: str, version: str | None, prompt_tokens: int,
               output_tokens: int, ttft: float | None, latency: float | None, finish_reason: str | None,
               status: int, prompt: Any = None, request_id: str | None = None,
               endpoint: str | None = None) -> None:
        """Writes one line for a finished request. ``prompt`` (text or chat messages) is written
        only when the log was made with ``log_prompts=True``; ``ttft`` and ``latency`` are
        seconds. Does nothing when disabled or closed; a failing write raises ``OSError``."""
        line: dict[str, Any] = {
            "time": utc_timestamp(), "request_id": request_id, "endpoint": endpoint, "key_id": key_id,
            "model": model, "version": version, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "ttft": ttft, "latency": latency, "finish_reason": finish_reason, "status": status}
        if self.log_prompts and prompt is not None:
            line["prompt"] = prompt
        text = json.dumps(line, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            if self._stream is None:
                return
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        """Closes a file the log opened (a stream it was given is only flushed); later
        ``record`` calls do nothing."""
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._owned:
            stream.close()
        else:
            stream.flush()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def record_quietly(log: AuditLog, **fields: Any) -> None:
    """Writes an audit line; a failed write (a full disk) is reported, never turned into the
    request's error."""
    try:
        log.record(**fields)
    except OSError as exc:
        _log.error("audit log write failed: %s", exc)
