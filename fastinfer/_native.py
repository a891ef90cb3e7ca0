"""Loads the compiled core ``fastinfer._C`` once, with a clear error when it was not built."""
from __future__ import annotations

from fastinfer.errors import NativeExtensionError

try:
    from fastinfer import _C as native  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise NativeExtensionError(
        "fastinfer._C is not built: run scripts/setup.sh (or `pip install -e . --no-build-isolation`)"
    ) from exc

__all__ = ["native"]
