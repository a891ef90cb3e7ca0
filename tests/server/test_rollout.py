"""Operating the server without failing a request: a rollout under steady load (load v2, give it
10% of the traffic, promote it, roll back to v1), the canary monitor rolling back on its own a
v2 whose distributions were flattened (lm_head scaled down: the same greedy tokens, a much
lower log-probability), the admin API's refusals, and a ``fastinfer serve`` process that on
SIGTERM answers new requests 503 (still accepting connections), finishes its in-flight stream
and exits 0."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from fastinfer.server.registry import CanaryMonitor

from .conftest import ADMIN_KEY, API_KEY, ServerSpec, read_audit

PROMPTS = [f"Write one sentence about {topic}." for topic in
           ("rivers", "prime numbers", "the moon", "bread", "glaciers", "jazz", "compilers", "owls")]
MAX_TOKENS = 8
WORKERS = 4
FAILED_STREAM = 500  # the status recorded for a stream that carried an error or ended without [DONE]


@dataclass(frozen=True)
class Result:
    start: float
    status: int
    model: str | None
    text: str
    prompt: str


class SteadyLoad:
    """``WORKERS`` clients in a thread of their own sending greedy completions (streamed and
    whole, in turn) back to back until ``stop``; every result is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True, name="steady-load")

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(WORKERS)))

    async def _worker(self, client: httpx.AsyncClient, w: int) -> None:
        i = w
        while not self._stop.is_set():
            prompt, stream = PROMPTS[i % len(PROMPTS)], i % 2 == 0
            body = {"model": "chat", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            start = time.monotonic()
            self.results.append(await (_streamed if stream else _whole)(client, body, start))
            i += WORKERS

    def since(self, t: float) -> list[Result]:
        """The results of the requests that started after ``t``."""
        return [r for r in list(self.results) if r.start > t]

    def wait(self, t: float, predicate, timeout: float = 60.0) -> list[Result]:
        """Waits until ``predicate(results since t)`` holds; returns those results."""
        deadline = time.monotonic() + timeout
        while not predicate(self.since(t)):
            assert time.monotonic() < deadline, f"load condition not met; {len(self.since(t))} results since"
            time.sleep(0.05)
        return self.since(t)


async def _whole(client: httpx.AsyncClient, body: dict, start: float) -> Result:
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        return Result(start, r.status_code, None, "", body["prompt"])
    data = r.json()
    return Result(start, 200, data["model"], data["choices"][0]["text"], body["prompt"])


async def _streamed(client: httpx.AsyncClient, body: dict, start: float) -> Result:
    text, model, done = "", None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return Result(start, r.status_code, None, "", body["prompt"])
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:  # an error after the headers: a failed request all the same
                    return Result(start, FAILED_STREAM, None, text, body["prompt"])
                model = chunk["model"]
                text += "".join(c["text"] for c in chunk["choices"])
    return Result(start, 200 if done else FAILED_STREAM, model, text, body["prompt"])


def admin(server, action: str, **body) -> dict:
    """``POST /admin/models/chat/<action>``, which must succeed; returns the listing."""
    r = httpx.post(f"{server.url}/admin/models/chat/{action}", json=body,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return {(m["version"]): m for m in r.json()["models"]}


def events(server) -> list[dict]:
    r = httpx.get(f"{server.url}/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200
    return r.json()["events"]


def served_by(results: list[Result], model: str) -> int:
    return sum(r.model == model for r in results)


@pytest.fixture
def rollout_server(serve):
    # The logprob drop threshold sits between the prompts' spread (under 0.7 nats between the best
    # and the worst prompt) and the flattened model's drop (over 5 nats). TTFT on two shared cores
    # is too noisy to judge here, so its ratio is set out of reach.
    monitor = CanaryMonitor(window_s=300, min_requests=10, max_error_rate_delta=0.1, max_ttft_p99_ratio=1e6,
                            max_logprob_drop=1.0)
    return serve(ServerSpec(monitor=monitor))


def _expected(server) -> dict[str, str]:
    client = server.client()
    return {p: client.completions.create(model="chat", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS}


@pytest.mark.slow
def test_rollout_under_load_then_auto_rollback_of_a_worse_canary(rollout_server):
    server = rollout_server
    want = _expected(server)
    before = len(read_audit(server.audit_path))
    with SteadyLoad(server.url) as load:
        load.wait(0, lambda rs: len(rs) >= 20)

        listing = admin(server, "load", version="v2", source="v2")
        t = time.monotonic()  # requests sent from now on see the change
        assert listing["v2"]["weight"] == 0 and listing["v1"]["stable"]
        assert served_by(load.wait(t, lambda rs: len(rs) >= 20), "chat@v2") == 0  # no traffic yet

        admin(server, "traffic", weights={"v1": 90, "v2": 10})
        t = time.monotonic()
        phase = load.wait(t, lambda rs: len(rs) >= 150 and served_by(rs, "chat@v2") >= 5)
        share = served_by(phase, "chat@v2") / len(phase)
        assert 0.02 <= share <= 0.3, f"v2 got {share:.0%} of the traffic, expected about 10%"

        listing = admin(server, "promote", version="v2")
        t = time.monotonic()
        assert listing["v2"]["stable"] and listing["v2"]["traffic_percent"] == 100
        phase = load.wait(t, lambda rs: len(rs) >= 30)
        assert {r.model for r in phase} == {"chat@v2"}

        listing = admin(server, "rollback", reason="test")
        t = time.monotonic()
        assert listing["v1"]["stable"] and listing["v1"]["traffic_percent"] == 100
        phase = load.wait(t, lambda rs: len(rs) >= 30)
        assert {r.model for r in phase} == {"chat@v1"}
        assert [e for e in events(server) if e["action"] == "rollback"][-1]["reason"] == "test"

        # A worse v2 replaces the good one and gets a canary's share: the monitor rolls it back.
        listing = admin(server, "unload", version="v2")
        assert set(listing) == {"v1"}
        admin(server, "load", version="v2", source="v2-flat")
        t = time.monotonic()  # before the split: v2-flat has no traffic until it
        admin(server, "traffic", weights={"v1": 70, "v2": 30})
        deadline = time.monotonic() + 60
        while not (autos := [e for e in events(server) if (e["reason"] or "").startswith("auto:")]):
            assert time.monotonic() < deadline, "the canary monitor did not roll the worse v2 back"
            time.sleep(0.1)
        (auto,) = autos
        assert auto["action"] == "rollback" and auto["from"] == "v2" and auto["to"] == "v1"
        assert "log-probability" in auto["reason"]
        # It was judged on real traffic (a client records its result just after the server does).
        load.wait(t, lambda rs: served_by(rs, "chat@v2") >= 10, timeout=10)
        t = time.monotonic()
        assert {r.model for r in load.wait(t, lambda rs: len(rs) >= 20)} == {"chat@v1"}

    failed = [r for r in load.results if r.status != 200]
    assert failed == [], f"{len(failed)} of {len(load.results)} requests failed"
    wrong = [r for r in load.results if r.text != want[r.prompt]]
    assert wrong == [], f"{len(wrong)} responses differ from the greedy reference"
    audit = read_audit(server.audit_path)[before:]
    assert len(audit) == len(load.results) and {line["status"] for line in audit} == {200}
    server.wait_idle(mv.engine for mv in server.state.registry.versions())


def test_admin_api_refusals(serve):
    server = serve()
    url, key = server.url + "/admin/models/chat", {"Authorization": f"Bearer {ADMIN_KEY}"}
    bad_source = httpx.post(url + "/load", json={"version": "v2", "source": "no/such/model"}, headers=key)
    assert bad_source.status_code == 400 and bad_source.json()["error"]["param"] == "source"
    duplicate = httpx.post(url + "/load", json={"version": "v1", "source": "v1"}, headers=key)
    assert duplicate.status_code == 409
    assert httpx.post(url + "/rollback", headers=key).status_code == 409  # nothing to roll back
    assert httpx.post(url + "/unload", json={"version": "v1"}, headers=key).status_code == 409  # the only one
    assert httpx.post(url + "/promote", json={"version": "v7"}, headers=key).status_code == 404
    assert httpx.post(url + "/traffic", json={"weights": {"v1": 0}}, headers=key).status_code == 400
    assert httpx.post(url + "/traffic", json={"weights": {"v1": 1}}).status_code == 401
    assert [m.id for m in server.client().models.list()] == ["chat", "chat@v1"]  # nothing changed


# --------------------------------------------------------------------------- SIGTERM
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_answers_503_finishes_the_in_flight_stream_and_exits_0(tmp_path):
    port, audit = _free_port(), tmp_path / "audit.jsonl"
    # The default model: its 480 tokens take seconds, so the stream is still running at the
    # SIGTERM (the tiny model's finish in under half a second).
    cmd = [sys.executable, "-m", "fastinfer.cli.main", "serve", "smollm2-135m", "--served-model-name", "chat",
           "--port", str(port), "--api-key", API_KEY, "--audit-log", str(audit), "--shutdown-timeout", "30",
           "--kv-cache-memory", "64MiB", "--max-model-len", "1024", "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {API_KEY}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"fastinfer serve exited early: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "fastinfer serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "chat", "prompt": "Tell me a long story.", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                health = httpx.get(url + "/health", timeout=5)  # still accepting, and saying so
                refused = httpx.post(url + "/v1/completions", json={"model": "chat", "prompt": "x"},
                                     headers=headers, timeout=5)
                rest = [line for line in lines if line.startswith("data: ")]
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    refusal, line = read_audit(audit)  # the refusal was written while the stream still ran
    assert (line["status"], line["finish_reason"], line["output_tokens"]) == (200, "length", 480)
    assert (refusal["status"], refusal["finish_reason"], refusal["key_id"]) == (503, "draining", "key-1")
