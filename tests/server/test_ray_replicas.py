"""Engine replicas on Ray Serve behind the OpenAI server (issue 24), on a local Ray instance
started here (``ray.init(num_cpus=2)``) with two replicas of a tiny random-weight Llama:
every one of 50 concurrent requests completes; a shared prefix lands on the replica holding
it (prefix-aware routing) where random routing scatters it; a replica killed under load fails
only the requests it held, with 503, and is replaced; keys and quotas hold across replicas;
``/health`` lists the replicas and ``/metrics`` the router's counts; ``build_openai_app`` runs
as a whole Serve application behind Ray's own HTTP proxy."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fastinfer.server.app import ServerState
from fastinfer.server.keys import KeyStore
from fastinfer.server.registry import ModelRegistry

from .conftest import API_KEY, LiveServer, policy

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from fastinfer.ray_serve.app import ReplicaOptions, build_openai_app, deploy_replicas  # noqa: E402

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 8 << 20, "max_num_seqs": 64, "block_size": 16}
QUOTA_KEY = "sk-quota"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy_port():
    """A local Ray instance with Serve (its HTTP proxy on a free port, for the composed app)."""
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="fastinfer-tests",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(proxy_port, tiny_path):
    """The OpenAI server over two model versions of two replicas each: ``tiny@prefix``
    (prefix-aware routing on the KV events alone: the router's memory of where it sent a prefix
    is off, ``recent_ttl_s=0``) and ``tiny@random`` (random routing)."""
    def factory(name: str, version: str, source: str):
        return deploy_replicas(name, version, tiny_path, ENGINE, ReplicaOptions(replicas=2, routing=source,
                                                                                 num_cpus=0, recent_ttl_s=0))

    keys = KeyStore([policy("quota", QUOTA_KEY, requests_per_minute=12)], plain_keys=[API_KEY])
    state = ServerState(registry=ModelRegistry(factory), keys=keys, shutdown_timeout=5.0)
    # Four replicas start before it serves: about 20 s on a quiet 2-core machine.
    live = LiveServer(state, [("tiny", "prefix", "prefix"), ("tiny", "random", "random")], start_timeout_s=180)
    yield live
    live.stop()


def _engine(server, version):
    return next(mv.engine for mv in server.state.registry.versions() if mv.version == version)


def _complete(client, model, prompt, max_tokens=8):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)


def test_fifty_concurrent_requests_all_complete_on_both_replicas(server):
    client = server.client()
    prompts = [[(7 * i + j) % 400 + 10 for j in range(20 + i % 7)] for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda p: _complete(client, "tiny@prefix", p), prompts))
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 for r in results)
    served = _engine(server, "prefix").routing_stats()
    assert served["requests"] >= 50
    assert len(served["replicas"]) == 2


def _prefix_hit_rate(server, model: str, groups: int = 24, wave: int = 8) -> float:
    """Sends one request for each of ``groups`` 96-token prefixes (together), then, once their
    blocks are cached, one follow-up per prefix with its own suffix (``wave`` at a time); the
    share of follow-ups that read cached prompt tokens."""
    client = server.client()
    base = 1000 if "prefix" in model else 4000
    prefixes = [[base + 97 * g + j for j in range(96)] for g in range(groups)]
    with ThreadPoolExecutor(wave) as pool:
        list(pool.map(lambda p: _complete(client, model, p + [5, 6], max_tokens=2), prefixes))
        time.sleep(0.5)  # the replicas' KV events reach the directory
        outs = list(pool.map(lambda p: _complete(client, model, p + [300, 301], max_tokens=2), prefixes))
    return sum(1 for r in outs if r.usage.prompt_tokens_details.cached_tokens > 0) / groups


def test_a_shared_prefix_lands_on_the_replica_that_holds_it(server):
    prefix_rate = _prefix_hit_rate(server, "tiny@prefix")
    random_rate = _prefix_hit_rate(server, "tiny@random")
    print(f"cached_tokens > 0 on follow-ups: prefix-aware {prefix_rate:.0%}, random {random_rate:.0%}")
    assert prefix_rate >= 0.9
    assert random_rate < 0.8  # about half land on the replica that has the prefix
    stats = _engine(server, "prefix").routing_stats()
    assert stats["decisions"].get("prefix", 0) >= 22 and stats["hits"] >= 22


def test_keys_and_quotas_hold_across_replicas(server):
    with pytest.raises(openai.AuthenticationError):
        _complete(server.client(key="sk-wrong"), "tiny@prefix", [1, 2, 3])
    client = server.client(key=QUOTA_KEY)
    engine = _engine(server, "random")  # random routing: the key's requests land on both replicas
    before = dict(engine.routing_stats()["routed"])
    statuses = []
    for i in range(14):
        try:
            _complete(client, "tiny@random", [50 + i, 60 + i, 70 + i], max_tokens=1)
            statuses.append(200)
        except openai.RateLimitError:
            statuses.append(429)
    assert statuses == [200] * 12 + [429] * 2, statuses  # 12 a minute, whichever replica served them
    after = engine.routing_stats()["routed"]
    assert sum(after.values()) - sum(before.values()) == 12
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)  # both replicas served the key


def test_health_and_metrics_show_the_replicas_and_the_router(server):
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"
    replicas = health["models"]["tiny@prefix"]["replicas"]
    assert len(replicas) == 2 and all(r["state"] == "running" for r in replicas.values())
    assert health["models"]["tiny@prefix"]["deployment"]["engine"]["replica_states"] == {"RUNNING": 2}
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'fastinfer:router_prefix_hit_rate{model_name="tiny",model_version="prefix"}' in text
    assert 'fastinfer:router_requests_total{decision="prefix",model_name="tiny",model_version="prefix"}' in text
    assert text.count('fastinfer:replica_num_running{model_name="tiny",model_version="prefix",replica=') == 2


def test_a_killed_replica_fails_only_its_requests_with_503_and_is_replaced(server):
    engine = _engine(server, "random")
    pids = {name: r["pid"] for name, r in engine.routing_stats()["replicas"].items()}
    assert len(pids) == 2
    client = server.client()
    victim_name, victim = next(iter(pids.items()))

    def one(i, max_tokens=400):
        try:
            r = _complete(client, "tiny@random", [20 + i % 50] * 12, max_tokens=max_tokens)
            return r.choices[0].finish_reason
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)  # 400 tokens each: all are still generating
        held = engine.routing_stats()["in_flight"].get(victim_name, 0)
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]
    failed = [r for r in results if r != "length"]
    assert held > 0 and failed and set(failed) == {503}, (results, held)
    assert len(failed) <= held  # only the dead replica's own requests
    # New requests go to the live replica while Serve replaces the dead one.
    assert all(one(100 + i, 8) == "length" for i in range(6))
    deadline = time.monotonic() + 60
    while True:
        live = {n: r["pid"] for n, r in engine.routing_stats()["replicas"].items() if r["state"] == "running"}
        if len(live) == 2 and victim not in live.values():
            break
        assert time.monotonic() < deadline, f"the dead replica was not replaced: {live}"
        time.sleep(0.5)


def test_a_client_that_leaves_cancels_its_request_on_the_replica(server):
    engine = _engine(server, "prefix")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny@prefix", "prompt": [7, 8, 9], "max_tokens": 400, "stream": True,
                            "ignore_eos": True}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while engine._streams:  # cancelled (the stream's Ray generator) and forgotten
        assert time.monotonic() < deadline, engine._streams
        time.sleep(0.05)


def test_build_openai_app_serves_through_ray_serve(proxy_port, tiny_path):
    app = build_openai_app(tiny_path, name="tiny", engine_options=ENGINE,
                           replica_options=ReplicaOptions(replicas=2, num_cpus=0),
                           server_options={"api_keys": [API_KEY]})
    serve.run(app, name="composed", route_prefix="/composed")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/composed/v1", api_key=API_KEY, max_retries=0,
                               timeout=60)
        r = _complete(client, "tiny", [3, 4, 5, 6], max_tokens=4)
        assert r.usage.completion_tokens == 4
        stream = client.completions.create(model="tiny", prompt=[3, 4, 5, 6], max_tokens=4, stream=True,
                                           temperature=0)
        assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    finally:
        serve.delete("composed")


def test_fastinfer_serve_replicas_joins_a_cluster_and_leaves_it_clean(proxy_port, tiny_path):
    port = _free_port()
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "fastinfer.cli.main", "serve", tiny_path, "--served-model-name", "tiny-cli",
           "--replicas", "2", "--replica-cpus", "0", "--ray-address", address, "--port", str(port),
           "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "8MiB", "--audit-log", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fastinfer serve --replicas did not start in 90 s"
                time.sleep(0.5)
        assert len(health["models"]["tiny-cli@v1"]["replicas"]) == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert _complete(client, "tiny-cli", [3, 4, 5], max_tokens=3).usage.completion_tokens == 3
        assert "fastinfer-tiny-cli-v1" in serve.status().applications
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "fastinfer-tiny-cli-v1" not in serve.status().applications  # the server deleted its replicas


def test_replicas_without_ray_is_a_clear_error(monkeypatch):
    from fastinfer.cli.main import build_parser
    from fastinfer.cli.serve import build_state
    from fastinfer.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)
    for name in [m for m in sys.modules if m.startswith("fastinfer.ray_serve")]:
        monkeypatch.delitem(sys.modules, name)
    args = build_parser().parse_args(["serve", "--replicas", "2"])
    with pytest.raises(ConfigError, match=r"pip install 'fastinfer\[ray\]'"):
        build_state(args)
