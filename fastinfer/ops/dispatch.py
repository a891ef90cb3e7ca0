"""The one place that picks an implementation for an op.

Each op has a list of (backend, applies, fn) entries, most preferred first; the reference
implementation is always last and applies everywhere. ``select`` returns the first entry
whose ``applies(*args)`` is true. Tests iterate ``implementations(op)`` to check every
available backend against the reference.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Impl:
    """One backend's implementation of an op and the inputs it accepts."""

    backend: str
    applies: Callable[..., bool]
    fn: Callable[..., Any]


_REGISTRY: dict[str, list[Impl]] = {}


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
    """The preferred implementation of ``op`` for these arguments."""
    for impl in _REGISTRY[op]:
        if impl.applies(*args, **kwargs):
            return impl.fn
    raise RuntimeError(f"no implementation of {op!r} applies")  # the reference always applies
