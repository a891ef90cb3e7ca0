"""Native CPU kernels from the optional torch C++ extension ``fastinfer._C_cpu``.

The extension registers its ops under ``torch.ops.fastinfer_cpu``; this module loads it once
and wraps the ops with shape handling. The package imports fine without the extension:
:func:`available` then returns False and the wrappers raise :class:`RuntimeError`.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["available", "isa", "linear_f32"]


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    try:
        from fastinfer import _C_cpu  # noqa: F401  (importing registers torch.ops.fastinfer_cpu)
    except ImportError:
        return False
    return hasattr(torch.ops.fastinfer_cpu, "linear_f32")


def available() -> bool:
    """True when ``fastinfer._C_cpu`` is built and its ops are registered."""
    return _load()


def _require() -> None:
    if not _load():
        raise RuntimeError(
            "fastinfer._C_cpu is not built: run `python setup.py build_ext --inplace` "
            "(or `pip install -e . --no-build-isolation`)"
        )


def isa() -> str:
    """Code path the kernels use on this CPU: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    _require()
    return torch.ops.fastinfer_cpu.isa_name()


@functools.lru_cache(maxsize=1)
def _linear_op():
    """``torch.ops.fastinfer_cpu.linear_f32.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.linear_f32.default


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias`` in float32 on the CPU.

    Args:
        x: float32 CPU tensor ``[..., K]`` (any leading dims and strides; copied to a
            row-contiguous layout only when its last dim is strided).
        weight: float32 CPU tensor ``[N, K]`` (copied when its rows are not contiguous, so keep
            weights contiguous).
        bias: optional float32 CPU tensor ``[N]``.

    Returns:
        float32 CPU tensor ``[..., N]`` (contiguous).

    Raises:
        TypeError: a dtype other than float32. ValueError: mismatched shapes.
        RuntimeError: a non-CPU tensor, or the extension is not built.

    Each output element ``y[m, n]`` is reduced over K in an order that depends only on K (16
    FMA lanes over K in chunks of 16, then a fixed pairwise tree, then ``+ bias[n]``): the
    result for a row is bit-identical whatever the other rows in the batch, the row's
    position, the thread count or the SIMD path (AVX-512, AVX2, scalar). No autograd.
    """
    op = _linear_op()
    if weight.dim() == 2 and weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.dim() == 1 and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.dim() == 2 and x.stride(1) == 1:
        return op(x, weight, bias)  # the hot path: the op checks dtypes, shapes and devices
    if x.dim() < 1:
        raise ValueError(f"linear_f32: x must be a tensor of shape [..., K], got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = op(x2, weight, bias)
    return y.view(*lead, y.shape[1])
