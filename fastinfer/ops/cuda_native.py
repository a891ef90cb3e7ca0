"""CUDA kernels from the extension ``fastinfer._C_cuda`` (built only where CUDA is present).

The extension registers ``torch.ops.fastinfer_cuda.*``; this module loads it once. The package
imports fine without it: :func:`available` is then False.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["available", "built", "reshape_and_cache"]


@functools.lru_cache(maxsize=1)
def built() -> bool:
    """True when ``fastinfer._C_cuda`` was compiled and loads (no GPU needed)."""
    try:
        from fastinfer import _C_cuda  # noqa: F401  (importing registers the ops)
    except ImportError:
        return False
    return hasattr(torch.ops.fastinfer_cuda, "reshape_and_cache")


def available() -> bool:
    """True when the CUDA kernels are built and a GPU is present."""
    return built() and torch.cuda.is_available()


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: None = None,
                      v_scale: None = None) -> None:
    """Stores ``key/value [T, Hkv, D]`` (rows contiguous, any token stride) into contiguous
    caches ``[num_blocks, block_size, Hkv, D]`` of the same dtype at flat slots
    ``slot_mapping [T]`` (int64; a negative slot skips the token). CUDA tensors only; float
    caches only (``k_scale, v_scale`` are None: quantized caches take the reference)."""
    torch.ops.fastinfer_cuda.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
