"""The one place that picks an implementation for an op.

Each op has a list of (backend, applies, fn) entries, most preferred first; the reference
implementation is always last and applies everywhere. ``select`` returns the first entry
whose ``applies(*args)`` is true. Tests iterate ``implementations(op)`` to check every
available backend against the reference.

A backend can be forced (``FASTINFER_OPS_BACKEND=reference|triton|cpu|cuda``, or
``EngineConfig(ops_backend=...)``, which the engine sets around each step with
:func:`forcing`): ``select`` then takes that backend's implementation of an op wherever it
applies to the inputs, and otherwise the usual order (so the reference still covers what a
backend lacks).
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
    checked = check_backend(name, "ops_backend")
    token = _FORCED.set(_registry_name(checked if checked is not None else check_backend(os.environ.get(ENV_VAR))))
    try:
        yield
    finally:
        _FORCED.reset(token)


def register(op: str, backend: str, fn: Callable[..., Any],
             applies: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Adds ``fn`` as ``backend``'s implementation of ``op``, ahead of earlier ones."""
    impls = _REGISTRY.setdefault(op, [])
    impls[:] = [i for i in impls if i.backend != backend]
    impls.insert(0, Impl(backend, applies, fn))


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
        if impl.applies(*args, **kwargs):
            return impl.fn
    raise RuntimeError(f"no implementation of {op!r} applies")  # the reference always applies
