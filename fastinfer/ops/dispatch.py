"""The one place that picks an implementation for an op.

Each op has a list of (backend, applies, fn) entries, most preferred first; the reference
implementation is always last and applies everywhere. ``select`` returns the first entry
whose ``applies(*args)`` is true. Tests iterate ``implementations(op)`` to check every
available backend against the reference.

A backend can be forced (``FASTINFER_OPS_BACKEND=reference|triton|cpu|cuda``, or
``EngineConfig(ops_backend=...)``, which the model runner sets around each step with
:func:`forcing`): ``select`` then takes that backend's implementation of an op wherever it
applies to the inputs, and otherwise the usual order (so the reference still covers what a
backend lacks), less the fused implementations of other backends. This module is the only one
that reads which backend is forced: a backend that must wait to be forced (Triton's interpreter
on the CPU) says so when it registers.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BACKENDS = ("reference", "triton", "cpu", "cuda")
"""Backend names that can be forced; ``"cpu"`` is the native CPU backend (``cpu_native``)."""
_ALIASES = {"cpu": "cpu_native"}
ENV_VAR = "FASTINFER_OPS_BACKEND"


@dataclass(frozen=True, slots=True)
class Impl:
    """One backend's implementation of an op and the inputs it accepts."""

    backend: str
    applies: Callable[..., bool]
    fn: Callable[..., Any]
    only_if_forced: Callable[..., bool] | None = None  # where true, taken only when forced
    fused: bool = False  # made of other ops: skipped while another backend is forced


_REGISTRY: dict[str, list[Impl]] = {}
_UNSET = object()
# The registry name of the backend forced in this context (None: none), or _UNSET outside any
# ``forcing`` block (then the environment variable decides at each call).
_FORCED: contextvars.ContextVar = contextvars.ContextVar("fastinfer_forced_backend", default=_UNSET)


def check_backend(name: str | None, what: str = ENV_VAR) -> str | None:
    """``name`` when it is None, ``"auto"``/empty (both None) or one of :data:`BACKENDS`; else a
    ``ValueError`` naming ``what`` and the choices."""
    if name is None or name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)} (or auto), got {name!r}")
    return name


def requested_backend(name: str | None) -> tuple[str | None, str]:
    """The backend that ``name`` (an ``ops_backend`` setting) forces or, when it forces none,
    ``FASTINFER_OPS_BACKEND``; with where it came from (``"ops_backend"`` or the variable's
    name). An unknown name raises ``ValueError``."""
    checked = check_backend(name, "ops_backend") if name is not None else None
    if checked is not None:
        return checked, "ops_backend"
    return check_backend(os.environ.get(ENV_VAR)), ENV_VAR


def _registry_name(name: str | None) -> str | None:
    return None if name is None else _ALIASES.get(name, name)


def forced_backend() -> str | None:
    """The forced backend's registry name (``"cpu_native"`` for ``cpu``), or None: the one set by
    :func:`forcing` in this context, else ``FASTINFER_OPS_BACKEND``."""
    name = _FORCED.get()
    return _registry_name(check_backend(os.environ.get(ENV_VAR))) if name is _UNSET else name


@contextlib.contextmanager
def forcing(name: str | None) -> Iterator[None]:
    """Forces backend ``name`` (None: leave it to ``FASTINFER_OPS_BACKEND``) inside the block.
    The choice is resolved once, on entry (the engine enters once per step), so ``select``
    does not read the environment for every op."""
    token = _FORCED.set(_registry_name(requested_backend(name)[0]))
    try:
        yield
    finally:
        _FORCED.reset(token)


def register(op: str, backend: str, fn: Callable[..., Any],
             applies: Callable[..., bool] = lambda *a, **k: True,
             only_if_forced: Callable[..., bool] | None = None, fused: bool = False) -> None:
    """Adds ``fn`` as ``backend``'s implementation of ``op``, ahead of earlier ones. Where
    ``only_if_forced(*args)`` is true, it is taken only while ``backend`` is forced (Triton's
    interpreter on CPU tensors: correct, but far slower than the other backends). A ``fused``
    implementation does the work of several ops in one call; while another backend is forced
    it is skipped, so that the reference runs those ops one by one on the forced backend."""
    impls = _REGISTRY.setdefault(op, [])
    impls[:] = [i for i in impls if i.backend != backend]
    impls.insert(0, Impl(backend, applies, fn, only_if_forced, fused))


def implementations(op: str) -> list[Impl]:
    """Every registered implementation of ``op``, most preferred first."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def select(op: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """The preferred implementation of ``op`` for these arguments (the forced backend's first,
    where it has one that applies)."""
    impls = _REGISTRY[op]
    forced = forced_backend()
    if forced is not None:
        for impl in impls:
            if impl.backend == forced and impl.applies(*args, **kwargs):
                return impl.fn
        if forced == "reference":
            return impls[-1].fn
    for impl in impls:
        if (impl.fused and forced is not None) or (impl.only_if_forced is not None
                                                   and impl.only_if_forced(*args, **kwargs)):
            continue
        if impl.applies(*args, **kwargs):
            return impl.fn
    raise RuntimeError(f"no implementation of {op!r} applies")  # the reference always applies
