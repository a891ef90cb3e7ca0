"""The compiled extensions: ``fastinfer._C`` (the core, always built; loaded here once, with a
clear error when it is missing) and the optional kernel modules, loaded by name through
:func:`extension_built` (importing one registers its ``torch.ops``)."""
from __future__ import annotations

import functools
import importlib

from fastinfer.errors import NativeExtensionError


@functools.lru_cache(maxsize=None)
def extension_built(name: str) -> bool:
    """True when the compiled module ``fastinfer.<name>`` was built and imports."""
    try:
        importlib.import_module(f"fastinfer.{name}")
    except ImportError:
        return False
    return True


if not extension_built("_C"):  # pragma: no cover - exercised only on a broken install
    raise NativeExtensionError(
        "fastinfer._C is not built: run scripts/setup.sh (or `pip install -e . --no-build-isolation`)")
native = importlib.import_module("fastinfer._C")

__all__ = ["extension_built", "native"]
