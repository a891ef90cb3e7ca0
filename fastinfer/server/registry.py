"""Model versions served side by side: several ``name@version`` engines in one process, traffic
split between them (a canary), promotion, rollback, and an automatic rollback when a canary's
error rate, latency or generated-token log-probability drifts from its stable version's.

Engines come from a ``factory(name, version, source)`` (sync or async) and are used by duck
typing: ``async shutdown(timeout)`` and ``memory_bytes()``. The registry is meant for one asyncio
event loop; none of its methods is thread-safe.

The app's request path::

    mv = registry.route(body["model"])     # APIError 404 for an unknown model
    mv.acquire()                           # before the next await, so unload() waits for it
    try:
        ...                                # generate on mv.engine
    finally:
        mv.release()
    registry.record_result(mv, ok=..., ttft=..., mean_logprob=...)
"""
from __future__ import annotations

import asyncio
import inspect
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from fastinfer.errors import ConfigError
from fastinfer.server.errors import APIError

_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Suffixes taken off a file name to make a model name; anything else (".5B" in "Qwen2.5-0.5B")
# is part of the name.
_MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")
DEFAULT_VERSION = "v1"
MAX_WEIGHT = 100.0

EngineFactory = Callable[[str, str, str], Any]


# --------------------------------------------------------------------------- parsing


def _check_name(value: str, what: str, text: str, argument: str) -> None:
    if not _NAME.fullmatch(value):
        raise ConfigError(f"{what} in {text!r} must be non-empty and use only letters, digits, "
                          f"'.', '_' or '-', got {value!r}", argument)


def _name_from_source(source: str) -> str:
    name = PurePath(source.rstrip("/\\")).name
    for suffix in _MODEL_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _split_name_version(text: str, argument: str) -> tuple[str, str]:
    """``"chat@v2"`` -> ``("chat", "v2")``; ``"chat"`` -> ``("chat", "v1")``."""
    name, at, version = text.partition("@")
    version = version if at else DEFAULT_VERSION
    _check_name(name, "the model name", text, argument)
    _check_name(version, "the version", text, argument)
    return name, version


def parse_model_spec(text: str, argument: str = "model") -> tuple[str, str, str]:
    """Parse ``name@version=source`` into ``(name, version, source)``.

    The text is split on its first ``=``, so a source may itself hold ``=`` or ``@``. Without
    ``@version`` the version is ``v1``. A bare source (no ``=``) is served under its file name
    without a model-file extension (``models/smollm2-135m.gguf`` -> ``smollm2-135m``), version
    ``v1``. Raises ``ConfigError`` (its ``argument`` set to ``argument``) for an empty part or a
    name or version with characters other than letters, digits, ``.``, ``_`` and ``-``.
    """
    text = text.strip()
    head, eq, source = text.partition("=")
    if not eq:
        source, head = text, _name_from_source(text)
    if not source:
        raise ConfigError(f"model spec {text!r} has no source; expected name@version=source", argument)
    name, version = _split_name_version(head, argument)
    return name, version, source


def parse_traffic(text: str, argument: str = "traffic") -> tuple[str, str, float]:
    """Parse ``name@version=weight`` (a weight from 0 to 100) into ``(name, version, weight)``."""
    head, eq, weight_text = text.strip().partition("=")
    if not eq or "@" not in head:
        raise ConfigError(f"traffic {text!r} must look like name@version=weight, e.g. chat@v2=10",
                          argument)
    name, version = _split_name_version(head, argument)
    try:
        weight = float(weight_text)
    except ValueError:
        raise ConfigError(f"traffic weight in {text!r} must be a number from 0 to 100, "
                          f"got {weight_text!r}", argument) from None
    if not 0.0 <= weight <= MAX_WEIGHT:  # also refuses nan
        raise ConfigError(f"traffic weight in {text!r} must be from 0 to 100, got {weight_text}", argument)
    return name, version, weight


# --------------------------------------------------------------------------- versions


class ModelVersion:
    """One loaded ``name@version``: its engine, its state (``loading``, ``ready`` or
    ``draining``) and how many requests are running on it. A request keeps its ModelVersion
    for its whole life, so traffic changes never move a request that already started."""

    def __init__(self, name: str, version: str, source: str, engine: Any = None,
                 state: str = "loading") -> None:
        self.name, self.version, self.source = name, version, source
        self.engine, self.state = engine, state
        self.in_flight = 0
        self._idle: asyncio.Event | None = None  # made by wait_idle, inside the running loop

    @property
    def key(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def acquire(self) -> None:
        """Count a request starting on this version."""
        self.in_flight += 1

    def release(self) -> None:
        """Count a request that ended; wakes ``wait_idle`` when none is left."""
        if self.in_flight <= 0:
            raise RuntimeError(f"{self.key}: release() without a matching acquire()")
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    def idle(self) -> bool:
        """True when no request is running on this version."""
        return self.in_flight == 0

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request runs here; False if ``timeout`` seconds passed first."""
        if self.idle():
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def memory_bytes(self) -> int:
        """The engine's weights and KV cache in bytes (0 while loading)."""
        return int(self.engine.memory_bytes()) if self.engine is not None else 0

    def __repr__(self) -> str:
        return f"ModelVersion({self.key}, state={self.state}, in_flight={self.in_flight})"


@dataclass(slots=True)
class _Model:
    """The versions of one model name and how its traffic is split."""

    versions: dict[str, ModelVersion]
    weights: dict[str, float]
    stable: str
    previous_stable: str | None = None

    def canaries(self) -> list[str]:
        return [v for v, w in self.weights.items() if w > 0 and v != self.stable]


# --------------------------------------------------------------------------- canary monitor


@dataclass(slots=True)
class _Result:
    time: float
    ok: bool
    ttft: float | None
    mean_logprob: float | None


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank


class CanaryMonitor:
    """Compares a canary's recent results with its stable version's over a sliding window of
    ``window_s`` seconds. A signal is compared only when both windows hold at least
    ``min_requests`` values of it (requests for the error rate, reported TTFTs for the latency,
    reported log-probabilities for the quality)."""

    def __init__(self, *, window_s: float = 60.0, min_requests: int = 20, max_error_rate_delta: float = 0.1,
                 max_ttft_p99_ratio: float = 2.0, max_logprob_drop: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for argument, value in (("window_s", window_s), ("max_error_rate_delta", max_error_rate_delta),
                                ("max_ttft_p99_ratio", max_ttft_p99_ratio),
                                ("max_logprob_drop", max_logprob_drop)):
            if not value > 0:
                raise ConfigError(f"{argument} must be > 0, got {value}", argument)
        if min_requests < 1:
            raise ConfigError(f"min_requests must be >= 1, got {min_requests}", "min_requests")
        self.window_s, self.min_requests = window_s, min_requests
        self.max_error_rate_delta, self.max_ttft_p99_ratio = max_error_rate_delta, max_ttft_p99_ratio
        self.max_logprob_drop, self.clock = max_logprob_drop, clock
        self._windows: dict[tuple[str, str], deque[_Result]] = {}

    def record(self, name: str, version: str, *, ok: bool, ttft: float | None = None,
               mean_logprob: float | None = None) -> None:
        """Add one finished request of ``name@version``: whether it succeeded, its time to first
        token and the mean log-probability of its generated tokens (None when unknown)."""
        now = self.clock()
        window = self._windows.setdefault((name, version), deque())
        window.append(_Result(now, ok, ttft, mean_logprob))
        self._prune(window, now)

    def forget(self, name: str, version: str) -> None:
        """Drop a version's window (unloaded, or starting a fresh canary phase)."""
        self._windows.pop((name, version), None)

    def _window(self, name: str, version: str) -> list[_Result]:
        window = self._windows.get((name, version))
        if window is None:
            return []
        self._prune(window, self.clock())
        return list(window)

    def _prune(self, window: deque[_Result], now: float) -> None:
        while window and window[0].time < now - self.window_s:
            window.popleft()

    def check(self, name: str, stable_version: str, canary_version: str) -> str | None:
        """A reason to roll the canary back, or None while it is no worse than the stable."""
        stable, canary = self._window(name, stable_version), self._window(name, canary_version)
        if len(stable) < self.min_requests or len(canary) < self.min_requests:
            return None
        where = f"{name}@{canary_version} vs {name}@{stable_version} over {len(canary)}/{len(stable)} requests"
        for test in (self._error_rate, self._ttft, self._logprob):
            reason = test(stable, canary)
            if reason is not None:
                return f"{reason} ({where})"
        return None

    def _error_rate(self, stable: list[_Result], canary: list[_Result]) -> str | None:
        s_rate = sum(not r.ok for r in stable) / len(stable)
        c_rate = sum(not r.ok for r in canary) / len(canary)
        if c_rate - s_rate > self.max_error_rate_delta:
            return (f"error rate {c_rate:.3f} vs {s_rate:.3f}, more than "
                    f"{self.max_error_rate_delta} higher")
        return None

    def _values(self, results: list[_Result], attr: str) -> list[float] | None:
        values = [getattr(r, attr) for r in results if getattr(r, attr) is not None]
        return values if len(values) >= self.min_requests else None

    def _ttft(self, stable: list[_Result], canary: list[_Result]) -> str | None:
        s_values, c_values = self._values(stable, "ttft"), self._values(canary, "ttft")
        if s_values is None or c_values is None:
            return None
        s_p99, c_p99 = _p99(s_values), _p99(c_values)
        if s_p99 > 0 and c_p99 > self.max_ttft_p99_ratio * s_p99:
            return (f"TTFT p99 {c_p99:.3f} s vs {s_p99:.3f} s, more than "
                    f"{self.max_ttft_p99_ratio}x")
        return None

    def _logprob(self, stable: list[_Result], canary: list[_Result]) -> str | None:
        s_values, c_values = self._values(stable, "mean_logprob"), self._values(canary, "mean_logprob")
        if s_values is None or c_values is None:
            return None
        s_mean, c_mean = sum(s_values) / len(s_values), sum(c_values) / len(c_values)
        if s_mean - c_mean > self.max_logprob_drop:
            return (f"mean token log-probability {c_mean:.3f} vs {s_mean:.3f}, a drop of more than "
                    f"{self.max_logprob_drop} nats")
        return None


# --------------------------------------------------------------------------- registry


def _not_found(message: str) -> APIError:
    return APIError(404, message, param="model", code="model_not_found")


def _conflict(message: str) -> APIError:
    return APIError(409, message, param="model", code="conflict")


def _check_weight(version: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_WEIGHT:
        raise APIError(400, f"traffic weight of {version!r} must be a number from 0 to 100, got {weight!r}",
                       param="weights", code="invalid_weight")
    return float(weight)


async def _build(factory: EngineFactory, name: str, version: str, source: str) -> Any:
    """Call a sync or async factory; a sync one runs in a thread so loading does not stall the
    event loop (and the requests other versions are serving)."""
    if inspect.iscoroutinefunction(factory):
        return await factory(name, version, source)
    engine = await asyncio.to_thread(factory, name, version, source)
    return await engine if inspect.isawaitable(engine) else engine


class ModelRegistry:
    """Every loaded model version, the traffic split of each model name, and the audit
    ``events`` of loads, traffic changes, promotions, rollbacks and unloads."""

    def __init__(self, factory: EngineFactory, *, memory_budget: int | None = None,
                 monitor: CanaryMonitor | None = None, rng: random.Random | None = None) -> None:
        if memory_budget is not None and memory_budget <= 0:
            raise ConfigError(f"memory_budget must be > 0 bytes, got {memory_budget}", "memory_budget")
        self.factory, self.memory_budget, self.monitor = factory, memory_budget, monitor
        self.rng = rng if rng is not None else random.Random()
        self.events: list[dict[str, Any]] = []
        self._models: dict[str, _Model] = {}
        self._loading: dict[str, ModelVersion] = {}  # "name@version" -> placeholder

    # ---- loading and unloading

    async def load(self, name: str, version: str, source: str) -> ModelVersion:
        """Build ``name@version`` from ``source`` and add it. The first version of a name is its
        stable version with all the traffic; a later one starts with none (see ``set_traffic``).
        APIError 400 for a bad name, 409 for a duplicate, 507 when it does not fit
        ``memory_budget`` (the engine just built is shut down again)."""
        for value, what in ((name, "name"), (version, "version")):
            if not _NAME.fullmatch(value):
                raise APIError(400, f"model {what} must use only letters, digits, '.', '_' or '-', "
                               f"got {value!r}", param=what, code="invalid_model_name")
        placeholder = ModelVersion(name, version, source)
        if self._find(name, version) is not None or placeholder.key in self._loading:
            raise _conflict(f"{placeholder.key} is already loaded or loading")
        self._loading[placeholder.key] = placeholder
        try:
            engine = await _build(self.factory, name, version, source)
        finally:
            del self._loading[placeholder.key]
        placeholder.engine = engine
        await self._check_budget(placeholder)
        self._add(placeholder)
        return placeholder

    async def _check_budget(self, new: ModelVersion) -> None:
        if self.memory_budget is None:
            return
        used = sum(mv.memory_bytes() for mv in self._all_versions())
        need = new.memory_bytes()
        if used + need <= self.memory_budget:
            return
        await new.engine.shutdown(None)
        mib = 1 << 20
        raise APIError(507, f"{new.key} needs {need / mib:.1f} MiB but only "
                       f"{max(0, self.memory_budget - used) / mib:.1f} MiB of the "
                       f"{self.memory_budget / mib:.1f} MiB memory budget is free; unload a version first",
                       param="model", code="memory_budget_exceeded")

    def _add(self, mv: ModelVersion) -> None:
        mv.state = "ready"
        model = self._models.get(mv.name)
        if model is None:
            self._models[mv.name] = _Model({mv.version: mv}, {mv.version: MAX_WEIGHT}, mv.version)
        else:
            model.versions[mv.version] = mv
            model.weights[mv.version] = 0.0
        self._event(mv.name, "load", to=mv.version, source=mv.source)

    async def unload(self, name: str, version: str, timeout: float | None = None) -> None:
        """Stop routing to ``name@version``, wait for its requests to end (at most ``timeout``
        seconds, then the engine's shutdown aborts the rest), shut its engine down and drop it.
        APIError 409 if it is the name's only or stable version, has traffic, or is already
        being unloaded."""
        model, mv = self._get(name, version)
        if len(model.versions) == 1:
            raise _conflict(f"cannot unload {mv.key}: it is the only version of {name!r}")
        if version == model.stable:
            raise _conflict(f"cannot unload {mv.key}: it is the stable version of {name!r}; "
                            "promote another version first")
        if model.weights[version] > 0:
            raise _conflict(f"cannot unload {mv.key}: it has {model.weights[version]:g} traffic; "
                            f"shift its traffic with set_traffic or rollback first")
        if mv.state == "draining":
            raise _conflict(f"{mv.key} is already being unloaded")
        mv.state = "draining"
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await mv.wait_idle(timeout)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            await mv.engine.shutdown(left)
        finally:
            self._remove(model, mv)

    def _remove(self, model: _Model, mv: ModelVersion) -> None:
        model.versions.pop(mv.version, None)
        model.weights.pop(mv.version, None)
        if model.previous_stable == mv.version:
            model.previous_stable = None
        if self.monitor is not None:
            self.monitor.forget(mv.name, mv.version)
        self._event(mv.name, "unload", from_=mv.version)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Shut every engine down (concurrently) and forget every version. The first error an
        engine raised is raised again once all of them were asked to stop."""
        versions = list(self._all_versions())
        for mv in versions:
            mv.state = "draining"
        self._models.clear()
        results = await asyncio.gather(*(mv.engine.shutdown(timeout) for mv in versions),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    # ---- routing

    def route(self, model_field: str, allowed: Callable[[str], bool] | None = None) -> ModelVersion:
        """The version a request for ``model_field`` runs on: ``"name"`` draws among the
        versions with traffic by weight; ``"name@version"`` pins one. ``not_found`` otherwise
        (naming the served models that ``allowed`` accepts: a caller sees only its own)."""
        name, at, version = model_field.partition("@")
        model = self._models.get(name)
        if model is not None and at:
            mv = model.versions.get(version)
            if mv is not None and mv.state == "ready":
                return mv
        elif model is not None:
            candidates = [v for v, w in model.weights.items() if w > 0 and model.versions[v].state == "ready"]
            if candidates:
                weights = [model.weights[v] for v in candidates]
                return model.versions[self.rng.choices(candidates, weights)[0]]
        raise self.not_found(model_field, allowed)

    def not_found(self, model_field: str, allowed: Callable[[str], bool] | None = None) -> APIError:
        """APIError 404 ``model_not_found`` for ``model_field``, naming the served models that
        ``allowed`` accepts (every one when it is None)."""
        return _not_found(f"model {model_field!r} not found; available: "
                          f"{', '.join(self.served_names(allowed)) or 'none'}")

    # ---- traffic, promotion, rollback

    def set_traffic(self, name: str, weights: Mapping[str, float]) -> None:
        """Split ``name``'s traffic by ``weights`` ({version: 0..100}, relative to their sum);
        versions not named get none. APIError 404 for an unknown version, 400 for a bad weight
        or all-zero weights, 409 for a version being unloaded."""
        model = self._get_model(name)
        checked = {v: _check_weight(v, w) for v, w in weights.items()}
        for v, w in checked.items():
            if v not in model.versions:
                raise _not_found(f"{name}@{v} is not loaded; loaded: {', '.join(sorted(model.versions))}")
            if w > 0 and model.versions[v].state != "ready":
                raise _conflict(f"{name}@{v} is being unloaded and cannot take traffic")
        if not any(w > 0 for w in checked.values()):
            raise APIError(400, f"traffic of {name!r} needs at least one weight > 0, got {dict(weights)}",
                           param="weights", code="invalid_weight")
        self._forget_new_canaries(model, name, checked)
        before = dict(model.weights)
        model.weights = {v: checked.get(v, 0.0) for v in model.versions}
        self._event(name, "set_traffic", weights_before=before)

    def _forget_new_canaries(self, model: _Model, name: str, weights: Mapping[str, float]) -> None:
        # A version that starts taking traffic is judged on fresh results only, not on those
        # that got it rolled back before.
        if self.monitor is None:
            return
        for v, w in weights.items():
            if w > 0 and model.weights.get(v, 0.0) == 0 and v != model.stable:
                self.monitor.forget(name, v)

    def promote(self, name: str, version: str) -> None:
        """Make ``name@version`` the stable version with all the traffic; the stable it replaces
        is kept for ``rollback``."""
        model, mv = self._get(name, version)
        if mv.state != "ready":
            raise _conflict(f"{mv.key} is being unloaded and cannot be promoted")
        old = model.stable
        if version != old:
            model.previous_stable, model.stable = old, version
        model.weights = {v: (MAX_WEIGHT if v == version else 0.0) for v in model.versions}
        self._event(name, "promote", from_=old, to=version)

    def rollback(self, name: str, reason: str = "manual") -> None:
        """Undo the latest rollout step of ``name``: while canaries have traffic, give all of it
        back to the stable version (the canaries stay loaded); otherwise, if the stable version
        was promoted over another, make that previous one stable again with all the traffic.
        APIError 409 when there is nothing to roll back."""
        model = self._get_model(name)
        canaries = model.canaries()
        if canaries:
            source, target = ",".join(canaries), model.stable
        elif model.previous_stable is not None:
            source, target = model.stable, model.previous_stable
            model.stable, model.previous_stable = target, None
        else:
            raise _conflict(f"nothing to roll back: {name}@{model.stable} already has all the traffic "
                            "and was not promoted over another version")
        model.weights = {v: (MAX_WEIGHT if v == target else 0.0) for v in model.versions}
        self._event(name, "rollback", from_=source, to=target, reason=reason)

    # ---- canary results

    def record_result(self, mv: ModelVersion, *, ok: bool, ttft: float | None = None,
                      mean_logprob: float | None = None) -> str | None:
        """Report a finished request to the monitor; if ``mv`` is a canary that now does worse
        than its stable version, roll it back. Returns the rollback reason, or None."""
        if self.monitor is None:
            return None
        self.monitor.record(mv.name, mv.version, ok=ok, ttft=ttft, mean_logprob=mean_logprob)
        model = self._models.get(mv.name)
        if model is None or model.versions.get(mv.version) is not mv or mv.version not in model.canaries():
            return None
        reason = self.monitor.check(mv.name, model.stable, mv.version)
        if reason is not None:
            self.rollback(mv.name, reason="auto: " + reason)
        return reason

    # ---- listing

    def list_models(self) -> list[dict[str, Any]]:
        """One entry per version (loading ones included) for ``GET /admin/models``: name,
        version, source, state, weight, traffic_percent, stable, in_flight, memory_bytes."""
        rows = [self._row(model, mv) for model in self._models.values() for mv in model.versions.values()]
        rows += [self._row(None, mv) for mv in self._loading.values()]
        return sorted(rows, key=lambda r: (r["name"], r["version"]))

    @staticmethod
    def _row(model: _Model | None, mv: ModelVersion) -> dict[str, Any]:
        weight = model.weights.get(mv.version, 0.0) if model is not None else 0.0
        total = sum(model.weights.values()) if model is not None else 0.0
        return {"name": mv.name, "version": mv.version, "source": mv.source, "state": mv.state,
                "weight": weight, "traffic_percent": 100.0 * weight / total if total else 0.0,
                "stable": model is not None and model.stable == mv.version,
                "in_flight": mv.in_flight, "memory_bytes": mv.memory_bytes()}

    def served_names(self, allowed: Callable[[str], bool] | None = None) -> list[str]:
        """What ``/v1/models`` lists: every model name and every ``name@version`` that routes
        (only the names ``allowed`` accepts, when given)."""
        names: list[str] = []
        for name in sorted(self._models):
            names.append(name)
            versions = self._models[name].versions
            names += [versions[v].key for v in sorted(versions) if versions[v].state == "ready"]
        return names if allowed is None else [n for n in names if allowed(n)]

    def versions(self) -> list[ModelVersion]:
        """Every loaded version (for scraping their engines' stats)."""
        return list(self._all_versions())

    def monitored(self, mv: ModelVersion) -> bool:
        """True when results of ``mv`` feed the canary monitor: a monitor is set and its
        name has another version to be compared with (then requests report log-probabilities)."""
        model = self._models.get(mv.name)
        return self.monitor is not None and model is not None and len(model.versions) > 1

    # ---- helpers

    def _all_versions(self) -> Iterator[ModelVersion]:
        return (mv for model in self._models.values() for mv in model.versions.values())

    def _find(self, name: str, version: str) -> ModelVersion | None:
        model = self._models.get(name)
        return model.versions.get(version) if model is not None else None

    def _get_model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise _not_found(f"model {name!r} not found; available: {', '.join(sorted(self._models)) or 'none'}")
        return model

    def _get(self, name: str, version: str) -> tuple[_Model, ModelVersion]:
        model = self._get_model(name)
        mv = model.versions.get(version)
        if mv is None:
            raise _not_found(f"{name}@{version} is not loaded; loaded: {', '.join(sorted(model.versions))}")
        return model, mv

    def _event(self, name: str, action: str, *, from_: str | None = None, to: str | None = None,
               reason: str | None = None, **extra: Any) -> None:
        model = self._models.get(name)
        self.events.append({"time": time.time(), "name": name, "action": action, "from": from_, "to": to,
                            "reason": reason, "weights": dict(model.weights) if model else {}, **extra})
