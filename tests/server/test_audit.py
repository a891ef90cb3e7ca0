"""The audit log: one JSON line per request, exactly the documented fields, prompts only when
asked for, safe from many threads."""
from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timedelta, timezone

from fastinfer.server.audit import AUDIT_FIELDS, AuditLog

FIELDS = ["time", "request_id", "endpoint", "key_id", "model", "version", "prompt_tokens", "output_tokens",
          "ttft", "latency", "finish_reason", "status"]


def _record(log: AuditLog, **overrides) -> None:
    values = dict(key_id="team-a", model="chat", version="v2", prompt_tokens=12, output_tokens=34, ttft=0.05,
                  latency=1.25, finish_reason="stop", status=200, request_id="req-1",
                  endpoint="/v1/chat/completions")
    values.update(overrides)
    log.record(**values)


def test_file_log_writes_one_json_line_with_exactly_the_fields(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    _record(log, prompt="hello")  # no log_prompts: the prompt stays out
    _record(log, key_id=None, version=None, ttft=None, finish_reason=None, status=429, output_tokens=0)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == FIELDS == list(AUDIT_FIELDS)
    assert first | {"time": None} == {"time": None, "request_id": "req-1", "endpoint": "/v1/chat/completions",
                                      "key_id": "team-a", "model": "chat", "version": "v2", "prompt_tokens": 12,
                                      "output_tokens": 34, "ttft": 0.05, "latency": 1.25, "finish_reason": "stop",
                                      "status": 200}
    assert second["key_id"] is None and second["status"] == 429 and second["ttft"] is None


def test_time_is_iso_8601_utc_with_z(tmp_path):
    stream = io.StringIO()
    _record(AuditLog(stream))
    stamp = json.loads(stream.getvalue())["time"]
    assert stamp.endswith("Z")
    when = datetime.fromisoformat(stamp[:-1] + "+00:00")
    assert abs(datetime.now(timezone.utc) - when) < timedelta(seconds=5)


def test_prompt_is_written_only_with_log_prompts():
    stream = io.StringIO()
    log = AuditLog(stream, log_prompts=True)
    _record(log, prompt="line one\nline two é")
    _record(log)  # no prompt given: no field
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["prompt"] == "line one\nline two é" and list(first) == FIELDS + ["prompt"]
    assert "prompt" not in second


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": 1}\n')
    with AuditLog(path) as log:
        _record(log)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"old": 1} and json.loads(lines[1])["model"] == "chat"


def test_each_line_is_flushed_before_close(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    _record(log)
    assert len(path.read_text().splitlines()) == 1
    log.close()


def test_disabled_log_writes_nothing_and_closed_log_ignores_records():
    log = AuditLog(None)
    assert not log.enabled
    _record(log)
    log.close()
    stream = io.StringIO()
    log = AuditLog(stream)
    log.close()
    assert not stream.closed  # a stream it was given stays open
    _record(log)
    assert stream.getvalue() == ""


def test_many_threads_write_whole_lines():
    stream = io.StringIO()
    log = AuditLog(stream, log_prompts=True)

    def worker(n: int) -> None:
        for i in range(50):
            _record(log, request_id=f"{n}-{i}", prompt="x" * 500)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert sorted(ids) == sorted(f"{n}-{i}" for n in range(8) for i in range(50))
