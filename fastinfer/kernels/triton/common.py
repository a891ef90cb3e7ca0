"""What every Triton kernel module shares: where a Triton kernel may run.

On a GPU a Triton kernel runs on CUDA tensors. On a CPU it runs only under the interpreter
(``TRITON_INTERPRET=1``, set before the first kernel is compiled), which is how the test suite
checks every kernel against the reference; there it is taken only when the ``triton`` backend
is forced (``FASTINFER_OPS_BACKEND=triton`` or ``EngineConfig(ops_backend="triton")``), since
the interpreter is far slower than any other backend.
"""
from __future__ import annotations

import os

import torch

from fastinfer.ops.dispatch import forced_backend


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, in numpy)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_here(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel may take these tensors: all on one CUDA device, or all on the
    CPU under the interpreter with the ``triton`` backend forced."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        return not interpreting()
    return dev.type == "cpu" and interpreting() and forced_backend() == "triton"


def upcast_16bit() -> bool:
    """True where 16-bit arithmetic must be done in float32 (the interpreter computes bf16 on
    raw bits: BUILD_NOTES.md)."""
    return interpreting()
