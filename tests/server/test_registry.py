"""ModelRegistry and CanaryMonitor with fake engines: spec parsing, loading under a memory
budget, weighted and pinned routing, promotion and rollback, draining unloads and the
automatic rollback of a canary that does worse than its stable version."""
from __future__ import annotations

import asyncio
import random

import pytest

from fastinfer.errors import ConfigError
from fastinfer.server.errors import APIError
from fastinfer.server.registry import (CanaryMonitor, ModelRegistry, parse_model_spec,
                                       parse_traffic)

MIB = 1 << 20


class FakeEngine:
    def __init__(self, name: str, version: str, source: str, size: int = 100 * MIB) -> None:
        self.name, self.version, self.source, self.size = name, version, source, size
        self.shutdown_calls: list[float | None] = []

    async def shutdown(self, timeout: float | None = None) -> None:
        self.shutdown_calls.append(timeout)

    def memory_bytes(self) -> int:
        return self.size


class Factory:
    """A sync factory that remembers every engine it built; sizes by source."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes, self.built = sizes or {}, []

    def __call__(self, name: str, version: str, source: str) -> FakeEngine:
        engine = FakeEngine(name, version, source, self.sizes.get(source, 100 * MIB))
        self.built.append(engine)
        return engine


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def make_registry(*versions: str, factory=None, **kwargs) -> ModelRegistry:
    """A registry with chat@<v> loaded for each version given (the first is stable)."""
    registry = ModelRegistry(factory or Factory(), rng=kwargs.pop("rng", random.Random(0)), **kwargs)

    async def load_all():
        for version in versions:
            await registry.load("chat", version, f"src-{version}")
    run(load_all())
    return registry


def weights(registry: ModelRegistry, name: str = "chat") -> dict[str, float]:
    return {row["version"]: row["weight"] for row in registry.list_models() if row["name"] == name}


def status_of(excinfo) -> int:
    return excinfo.value.status


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("chat@v1=smollm2-135m", ("chat", "v1", "smollm2-135m")),
    ("chat@v2=/models/a=b@c.gguf", ("chat", "v2", "/models/a=b@c.gguf")),
    ("chat=smollm2-135m", ("chat", "v1", "smollm2-135m")),
    ("smollm2-135m", ("smollm2-135m", "v1", "smollm2-135m")),
    ("/models/qwen/Qwen2.5-0.5B.gguf", ("Qwen2.5-0.5B", "v1", "/models/qwen/Qwen2.5-0.5B.gguf")),
    ("Qwen2.5-0.5B", ("Qwen2.5-0.5B", "v1", "Qwen2.5-0.5B")),
])
def test_parse_model_spec(text, expected):
    assert parse_model_spec(text) == expected


@pytest.mark.parametrize("text", ["@v1=src", "chat@=src", "chat@v1=", "ch at@v1=src", "chat@v/1=src",
                                  "chat@v1@x=src", ""])
def test_parse_model_spec_refuses_bad_parts(text):
    with pytest.raises(ConfigError) as excinfo:
        parse_model_spec(text, argument="--model")
    assert excinfo.value.argument == "--model"


def test_parse_traffic():
    assert parse_traffic("chat@v2=10") == ("chat", "v2", 10.0)
    assert parse_traffic("chat@v1=0") == ("chat", "v1", 0.0)
    assert parse_traffic("chat@v1=100") == ("chat", "v1", 100.0)


@pytest.mark.parametrize("text", ["chat@v2", "chat=10", "chat@v2=ten", "chat@v2=-1", "chat@v2=101",
                                  "chat@v2=nan", "@v2=10"])
def test_parse_traffic_refuses(text):
    with pytest.raises(ConfigError):
        parse_traffic(text)


# ---------------------------------------------------------------- loading


def test_first_version_is_stable_with_all_traffic_later_ones_with_none():
    registry = make_registry("v1", "v2")
    rows = {r["version"]: r for r in registry.list_models()}
    assert rows["v1"]["stable"] and rows["v1"]["weight"] == 100 and rows["v1"]["traffic_percent"] == 100
    assert not rows["v2"]["stable"] and rows["v2"]["weight"] == 0
    assert rows["v2"]["state"] == "ready" and rows["v2"]["memory_bytes"] == 100 * MIB
    assert registry.served_names() == ["chat", "chat@v1", "chat@v2"]
    assert [e["action"] for e in registry.events] == ["load", "load"]


def test_duplicate_load_is_refused_with_409():
    factory = Factory()
    registry = make_registry("v1", factory=factory)
    with pytest.raises(APIError) as excinfo:
        run(registry.load("chat", "v1", "other"))
    assert status_of(excinfo) == 409
    assert len(factory.built) == 1  # refused before building


def test_async_factory_is_awaited():
    async def factory(name, version, source):
        await asyncio.sleep(0)
        return FakeEngine(name, version, source)

    registry = ModelRegistry(factory)
    mv = run(registry.load("chat", "v1", "src"))
    assert isinstance(mv.engine, FakeEngine) and mv.state == "ready"


def test_load_over_memory_budget_is_refused_and_the_new_engine_shut_down():
    factory = Factory({"big": 300 * MIB})
    registry = make_registry("v1", "v2", factory=factory, memory_budget=400 * MIB)
    with pytest.raises(APIError) as excinfo:
        run(registry.load("chat", "v3", "big"))
    assert status_of(excinfo) == 507 and "memory budget" in excinfo.value.message
    extra = factory.built[-1]
    assert extra.source == "big" and extra.shutdown_calls == [None]
    assert [r["version"] for r in registry.list_models()] == ["v1", "v2"]
    # a version that fits exactly is accepted
    factory.sizes["fits"] = 200 * MIB
    run(registry.load("chat", "v3", "fits"))
    assert "chat@v3" in registry.served_names()


# ---------------------------------------------------------------- routing


def test_weighted_routing_sends_about_ten_percent_to_the_canary():
    registry = make_registry("v1", "v2")
    registry.set_traffic("chat", {"v1": 90, "v2": 10})
    draws = [registry.route("chat").version for _ in range(2000)]
    canary = draws.count("v2") / len(draws)
    assert 0.08 < canary < 0.12, canary  # binomial sd ~0.0067
    assert set(draws) == {"v1", "v2"}


def test_routing_without_canary_traffic_never_picks_the_canary():
    registry = make_registry("v1", "v2")
    assert {registry.route("chat").version for _ in range(200)} == {"v1"}


def test_pinned_routing_reaches_a_version_without_traffic():
    registry = make_registry("v1", "v2")
    assert registry.route("chat@v2").version == "v2"
    assert registry.route("chat@v1").version == "v1"


@pytest.mark.parametrize("field", ["nope", "chat@v9", "nope@v1", "chat@"])
def test_unknown_model_is_404_naming_the_available_ones(field):
    registry = make_registry("v1")
    with pytest.raises(APIError) as excinfo:
        registry.route(field)
    assert status_of(excinfo) == 404 and excinfo.value.code == "model_not_found"
    assert "chat@v1" in excinfo.value.message


# ---------------------------------------------------------------- traffic, promote, rollback


def test_set_traffic_zeroes_versions_not_named():
    registry = make_registry("v1", "v2", "v3")
    registry.set_traffic("chat", {"v1": 80, "v2": 20})
    registry.set_traffic("chat", {"v3": 5, "v1": 95})
    assert weights(registry) == {"v1": 95, "v2": 0, "v3": 5}


@pytest.mark.parametrize("bad, status", [
    ({"v9": 10}, 404), ({"v1": -1}, 400), ({"v1": 101}, 400), ({"v1": "10"}, 400),
    ({"v1": float("nan")}, 400), ({"v1": True}, 400), ({"v1": 0, "v2": 0}, 400), ({}, 400),
])
def test_set_traffic_refusals_leave_weights_unchanged(bad, status):
    registry = make_registry("v1", "v2")
    with pytest.raises(APIError) as excinfo:
        registry.set_traffic("chat", bad)
    assert status_of(excinfo) == status
    assert weights(registry) == {"v1": 100, "v2": 0}


def test_promote_then_rollback_restores_the_previous_stable():
    registry = make_registry("v1", "v2")
    registry.promote("chat", "v2")
    assert weights(registry) == {"v1": 0, "v2": 100}
    assert {r["version"] for r in registry.list_models() if r["stable"]} == {"v2"}
    registry.rollback("chat", reason="bad answers")
    assert weights(registry) == {"v1": 100, "v2": 0}
    assert {r["version"] for r in registry.list_models() if r["stable"]} == {"v1"}
    event = registry.events[-1]
    assert (event["action"], event["from"], event["to"], event["reason"]) == ("rollback", "v2", "v1", "bad answers")
    with pytest.raises(APIError) as excinfo:  # nothing left to undo
        registry.rollback("chat")
    assert status_of(excinfo) == 409


def test_rollback_of_a_canary_gives_all_traffic_to_the_stable():
    registry = make_registry("v1", "v2")
    registry.set_traffic("chat", {"v1": 90, "v2": 10})
    registry.rollback("chat")
    assert weights(registry) == {"v1": 100, "v2": 0}
    assert registry.route("chat@v2").version == "v2"  # still loaded


def test_in_flight_request_keeps_its_version_across_promotion():
    registry = make_registry("v1", "v2")
    mv = registry.route("chat")
    mv.acquire()
    registry.promote("chat", "v2")
    assert mv.version == "v1" and mv.state == "ready" and mv.in_flight == 1
    assert registry.route("chat").version == "v2"


# ---------------------------------------------------------------- unload


def test_unload_is_refused_for_the_only_the_stable_or_a_version_with_traffic():
    registry = make_registry("v1")
    with pytest.raises(APIError) as excinfo:
        run(registry.unload("chat", "v1"))
    assert status_of(excinfo) == 409
    registry = make_registry("v1", "v2")
    registry.set_traffic("chat", {"v1": 50, "v2": 50})
    with pytest.raises(APIError) as excinfo:
        run(registry.unload("chat", "v2"))
    assert status_of(excinfo) == 409 and "traffic" in excinfo.value.message
    registry.set_traffic("chat", {"v2": 100})  # v1 is still the stable one
    with pytest.raises(APIError) as excinfo:
        run(registry.unload("chat", "v1"))
    assert status_of(excinfo) == 409
    assert [r["state"] for r in registry.list_models()] == ["ready", "ready"]


def test_unload_drains_in_flight_requests_before_shutting_down():
    registry = make_registry("v1", "v2")
    mv = registry.route("chat@v2")
    mv.acquire()
    mv.acquire()

    async def scenario():
        unloading = asyncio.create_task(registry.unload("chat", "v2"))
        await asyncio.sleep(0.01)
        assert mv.state == "draining" and not unloading.done()
        assert mv.engine.shutdown_calls == []
        assert "chat@v2" not in registry.served_names()
        with pytest.raises(APIError):
            registry.route("chat@v2")
        for change in (lambda: registry.set_traffic("chat", {"v1": 90, "v2": 10}),
                       lambda: registry.promote("chat", "v2")):
            with pytest.raises(APIError) as excinfo:  # a draining version takes no traffic
                change()
            assert excinfo.value.status == 409
        registry.set_traffic("chat", {"v1": 100, "v2": 0})  # naming it with no traffic is fine
        mv.release()
        await asyncio.sleep(0.01)
        assert not unloading.done()
        mv.release()
        await asyncio.wait_for(unloading, 1.0)

    run(scenario())
    assert mv.engine.shutdown_calls == [None]
    assert [r["version"] for r in registry.list_models()] == ["v1"]
    assert registry.events[-1]["action"] == "unload"


def test_unload_timeout_shuts_down_with_requests_still_running():
    registry = make_registry("v1", "v2")
    mv = registry.route("chat@v2")
    mv.acquire()
    run(asyncio.wait_for(registry.unload("chat", "v2", timeout=0.05), 1.0))
    assert len(mv.engine.shutdown_calls) == 1 and mv.engine.shutdown_calls[0] < 0.05
    assert "chat@v2" not in registry.served_names()


def test_shutdown_stops_every_engine():
    factory = Factory()
    registry = make_registry("v1", "v2", factory=factory)
    run(registry.shutdown(2.0))
    assert [e.shutdown_calls for e in factory.built] == [[2.0], [2.0]]
    assert registry.list_models() == []


def test_release_without_acquire_raises():
    registry = make_registry("v1")
    with pytest.raises(RuntimeError):
        registry.route("chat").release()


# ---------------------------------------------------------------- canary monitor


def canary_registry(**monitor_kwargs):
    clock = FakeClock()
    monitor = CanaryMonitor(clock=clock, min_requests=monitor_kwargs.pop("min_requests", 10), **monitor_kwargs)
    registry = make_registry("v1", "v2", monitor=monitor)
    registry.set_traffic("chat", {"v1": 90, "v2": 10})
    return registry, clock


def feed(registry: ModelRegistry, version: str, n: int, *, ok=True, ttft=0.1, logprob=-1.0):
    mv = registry.route(f"chat@{version}")
    reasons = [registry.record_result(mv, ok=ok, ttft=ttft, mean_logprob=logprob) for _ in range(n)]
    return [r for r in reasons if r is not None]


@pytest.mark.parametrize("bad, signal", [
    ({"logprob": -1.8}, "log-probability"),
    ({"ok": False}, "error rate"),
    ({"ttft": 0.5}, "TTFT"),
])
def test_worse_canary_is_rolled_back_automatically(bad, signal):
    registry, _ = canary_registry()
    feed(registry, "v1", 10)
    reasons = feed(registry, "v2", 10, **bad)
    assert len(reasons) == 1 and signal in reasons[0]
    assert weights(registry) == {"v1": 100, "v2": 0}
    event = registry.events[-1]
    assert event["action"] == "rollback" and event["reason"].startswith("auto: ")
    assert event["from"] == "v2" and event["to"] == "v1"
    assert registry.route("chat@v2").state == "ready"  # kept loaded


def test_no_rollback_below_min_requests():
    registry, _ = canary_registry()
    feed(registry, "v1", 10)
    assert feed(registry, "v2", 9, ok=False, ttft=5.0, logprob=-9.0) == []
    assert weights(registry) == {"v1": 90, "v2": 10}
    assert feed(registry, "v2", 1, ok=False, ttft=5.0, logprob=-9.0) != []  # the 10th tips it


def test_no_rollback_when_the_stable_has_too_few_results():
    registry, _ = canary_registry()
    feed(registry, "v1", 9)
    assert feed(registry, "v2", 50, ok=False) == []
    assert weights(registry) == {"v1": 90, "v2": 10}


def test_no_rollback_for_equal_windows_or_drift_within_limits():
    registry, _ = canary_registry()
    feed(registry, "v1", 20, ttft=0.1, logprob=-1.0)
    feed(registry, "v1", 2, ok=False)
    assert feed(registry, "v2", 20, ttft=0.1, logprob=-1.0) == []
    assert feed(registry, "v2", 2, ok=False) == []  # same error rate as the stable
    assert feed(registry, "v2", 20, ttft=0.19, logprob=-1.4) == []  # < 2x TTFT, < 0.5 nats drop
    assert weights(registry) == {"v1": 90, "v2": 10}


def test_old_results_leave_the_window():
    registry, clock = canary_registry(window_s=60.0)
    feed(registry, "v1", 10)
    clock.now += 61.0  # the stable's results expire
    assert feed(registry, "v2", 10, ok=False) == []
    feed(registry, "v1", 10)
    assert feed(registry, "v2", 1, ok=False) != []


def test_stable_results_never_trigger_a_rollback():
    registry, _ = canary_registry()
    feed(registry, "v2", 10)
    assert feed(registry, "v1", 20, ok=False) == []
    assert weights(registry) == {"v1": 90, "v2": 10}


def test_canary_given_traffic_again_starts_a_fresh_window():
    registry, _ = canary_registry()
    feed(registry, "v1", 10)
    assert feed(registry, "v2", 10, ok=False) != []
    registry.set_traffic("chat", {"v1": 90, "v2": 10})
    assert feed(registry, "v2", 9, ok=True) == []  # old failures forgotten
    assert weights(registry) == {"v1": 90, "v2": 10}


def test_monitor_check_directly():
    clock = FakeClock()
    monitor = CanaryMonitor(min_requests=3, clock=clock)
    for _ in range(3):
        monitor.record("m", "a", ok=True, ttft=0.1, mean_logprob=-1.0)
        monitor.record("m", "b", ok=True, ttft=0.1, mean_logprob=-2.0)
    assert "log-probability" in monitor.check("m", "a", "b")
    assert monitor.check("m", "b", "a") is None  # better than the stable is fine
    with pytest.raises(ConfigError):
        CanaryMonitor(min_requests=0)
