"""Context managers shared by the native-kernel tests."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def threads(n: int):
    """Runs the block with ``n`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def isa_cap(cap: int):
    """Caps the native kernels' SIMD path (0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI) inside the block."""
    from fastinfer.ops.backends import cpu_native

    try:
        yield cpu_native.set_isa_cap(cap)
    finally:
        cpu_native.set_isa_cap(3)
