"""Fixtures of the end-to-end server tests: tiny random Llama models (loaded once per session),
engines built over them by source name, and ``LiveServer``: ``build_app(state)`` served by
``build_server`` (uvicorn, as ``fastinfer serve`` runs it) from a daemon thread on 127.0.0.1,
reached with the real ``openai`` client and httpx."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.errors import ModelLoadError
from fastinfer.model.loader import LoadedModel, load_model
from fastinfer.server.app import ServerState, build_app
from fastinfer.server.audit import AuditLog
from fastinfer.server.keys import KeyPolicy, KeyStore, hash_key
from fastinfer.server.registry import CanaryMonitor, ModelRegistry
from fastinfer.server.serving import build_server

from ..conftest import CPU, make_engine, run_to_completion, save_tiny_model

API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"
FLAT_SCALE = 0.2  # the "worse" model: lm_head scaled down, so its distributions flatten


@dataclass(frozen=True)
class Backend:
    """What the test factory builds for one source string: an engine over the tiny model
    (``flat``: its lm_head scaled by ``FLAT_SCALE``) with these limits."""

    flat: bool = False
    max_num_seqs: int = 64
    max_queued_requests: int | None = None
    max_model_len: int | None = None
    kv_cache_memory: int = 8 << 20
    grammar_compile_timeout: float = 5.0


DEFAULT_BACKENDS = {"v1": Backend(), "v2": Backend(), "v2-flat": Backend(flat=True)}


class ModelBank:
    """One loaded tiny model per source string, loaded on first use and kept for the session,
    so that no two live engines share a module (and the admin ``load`` never reads a disk)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaded: dict[str, LoadedModel] = {}

    def loaded(self, source: str, flat: bool = False) -> LoadedModel:
        key = f"{source}{'~flat' if flat else ''}"
        if key not in self._loaded:
            loaded = load_model(self.path, torch.float32, CPU, None)
            if flat:
                with torch.no_grad():
                    loaded.model.lm_head_weight.mul_(FLAT_SCALE)
            self._loaded[key] = loaded
        return self._loaded[key]

    def factory(self, backends: dict[str, Backend]) -> Callable[[str, str, str], AsyncEngine]:
        """A registry factory: ``source`` names a backend; an unknown one fails as the real
        factory does (``ModelLoadError``)."""

        def build(name: str, version: str, source: str) -> AsyncEngine:
            backend = backends.get(source)
            if backend is None:
                raise ModelLoadError(f"model {source!r} is neither a known alias, a .gguf file nor a model folder")
            engine = make_engine(self.loaded(source, backend.flat), kv_cache_memory=backend.kv_cache_memory,
                                 max_num_seqs=backend.max_num_seqs, max_model_len=backend.max_model_len,
                                 grammar_compile_timeout=backend.grammar_compile_timeout)
            return AsyncEngine.from_engine(engine, max_queued_requests=backend.max_queued_requests)

        return build

    def greedy(self, prompt_ids: list[int], max_tokens: int, logprobs: int | None = None, flat: bool = False):
        """The offline reference: one greedy request on a private engine (ignore_eos)."""
        engine = make_engine(self.loaded("reference", flat), kv_cache_memory=4 << 20)
        engine.add_request(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                      logprobs=logprobs))
        (out,) = run_to_completion(engine).values()
        return out.outputs[0]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, hf_smollm_tokenizer) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("server") / "tiny-llama", "llama", hf_smollm_tokenizer)


@pytest.fixture(scope="session")
def bank(tiny_path) -> ModelBank:
    """The session's loaded tiny models; ``bank.factory(backends)`` builds engines over them."""
    return ModelBank(tiny_path)


# --------------------------------------------------------------------------- the live server
class LiveServer:
    """``build_app(state)`` under uvicorn in a daemon thread, on a socket bound to a free
    port of 127.0.0.1. ``loads`` (name, version, source) are loaded in the server's own event
    loop before it serves (the engines' streams belong to that loop), ``loop``."""

    def __init__(self, state: ServerState, loads: Iterable[tuple[str, str, str]],
                 audit_path: Path | None = None, start_timeout_s: float = 60.0) -> None:
        self.state, self.audit_path = state, audit_path
        self.app = build_app(state)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = build_server(self.app)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(list(loads),), daemon=True, name="live-server")
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError("the test server did not start") from self._error
            assert time.monotonic() < deadline, f"the test server did not start within {start_timeout_s:g} s"
            time.sleep(0.01)

    def _main(self, loads: list[tuple[str, str, str]]) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            for name, version, source in loads:
                await self.state.registry.load(name, version, source)
            await self._server.serve(sockets=[self._sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the constructor or by stop()
            self._error = exc

    def client(self, key: str | None = API_KEY, **kwargs) -> openai.OpenAI:
        """The real openai client, without retries (a 429 or 503 must reach the test)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def engine(self, name: str = "chat", version: str = "v1") -> AsyncEngine:
        """The engine serving ``name@version``."""
        return next(mv.engine for mv in self.state.registry.versions() if (mv.name, mv.version) == (name, version))

    def wait_idle(self, engines: Iterable[AsyncEngine], timeout: float = 30.0) -> None:
        """Waits until each engine holds no request and every KV block is free again."""
        deadline = time.monotonic() + timeout
        for engine in engines:
            while True:
                stats = engine.stats()
                if stats["num_requests"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
                    break
                assert time.monotonic() < deadline, f"the engine did not go idle: {stats}"
                time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "the test server did not stop within 30 s"
        self.state.audit.close()
        if self._error is not None:
            raise self._error


@dataclass
class ServerSpec:
    """How to build a test server: its models, keys, limits and canary monitor."""

    loads: list[tuple[str, str, str]] = field(default_factory=lambda: [("chat", "v1", "v1")])
    backends: dict[str, Backend] = field(default_factory=lambda: dict(DEFAULT_BACKENDS))
    policies: list[KeyPolicy] = field(default_factory=list)
    plain_keys: list[str] = field(default_factory=lambda: [API_KEY])
    admin_key: str | None = ADMIN_KEY
    monitor: CanaryMonitor | None = None
    max_body_bytes: int = 64 << 10
    shutdown_timeout: float = 5.0
    options: dict = field(default_factory=dict)  # further ServerState fields (timeouts, metrics key, docs)


def start_server(bank: ModelBank, spec: ServerSpec, audit_path: Path | None = None) -> LiveServer:
    """A running server for ``spec`` (stop it with ``stop``)."""
    registry = ModelRegistry(bank.factory(spec.backends), monitor=spec.monitor, rng=random.Random(0))
    state = ServerState(registry=registry, keys=KeyStore(spec.policies, plain_keys=spec.plain_keys),
                        audit=AuditLog(audit_path), admin_key=spec.admin_key,
                        max_body_bytes=spec.max_body_bytes, shutdown_timeout=spec.shutdown_timeout, **spec.options)
    return LiveServer(state, spec.loads, audit_path)


@pytest.fixture
def serve(bank, tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """Starts fresh servers (``serve(ServerSpec(...))``; audit log ``<tmp>/audit-N.jsonl``) and
    stops them after the test."""
    servers: list[LiveServer] = []

    def start(spec: ServerSpec | None = None) -> LiveServer:
        server = start_server(bank, spec or ServerSpec(), tmp_path / f"audit-{len(servers)}.jsonl")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def finish_tally(engine: AsyncEngine) -> Counter:
    """Counts, by finish reason, the samples ``engine`` ends from now on: engine-side evidence
    that a request the client left was aborted rather than run to its end. Wraps the inner
    engine's ``step`` (call it while the engine is idle)."""
    tally: Counter = Counter()
    inner = engine.engine
    step = inner.step

    def counting_step():
        outputs = step()
        tally.update(c.finish_reason for out in outputs if out.finished for c in out.outputs)
        return outputs

    inner.step = counting_step
    return tally


def read_audit(path: Path) -> list[dict]:
    """The audit log's lines, parsed."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def policy(key_id: str, key: str, **limits) -> KeyPolicy:
    """A keys-file policy for the plain ``key``."""
    return KeyPolicy(key_id, hash_key(key), **limits)
