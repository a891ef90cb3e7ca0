"""What every Triton kernel module shares: where a Triton kernel may run, the float dtypes the
kernels take, rounding float32 to the output type, and warps per program.

On a GPU a Triton kernel runs on CUDA tensors. On a CPU it runs only under the interpreter
(``TRITON_INTERPRET=1``, set before the first kernel is compiled), which is how the test suite
checks every kernel against the reference (the dispatch point takes it there only when the
``triton`` backend is forced: ``fastinfer.ops.backends.triton``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, in numpy)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_here(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel may take these tensors: all on one CUDA device, or all on the
    CPU under the interpreter."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        return not interpreting()
    return dev.type == "cpu" and interpreting()


@triton.jit
def rounded(y, out_ptr, INTERP: tl.constexpr):
    """float32 ``y`` rounded (to nearest, ties to even) to ``out_ptr``'s element type. Under the
    interpreter, whose float32 -> bfloat16 cast truncates, bfloat16 is rounded with integer
    ops (NaN stays NaN); elsewhere the hardware cast, which rounds to nearest even."""
    if INTERP and out_ptr.dtype.element_ty == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(out_ptr.dtype.element_ty)


def num_warps(n: int) -> int:
    """Warps for a program holding ``n`` elements: 4 up to 2048, 8 up to 8192, else 16."""
    return 4 if n <= 2048 else 8 if n <= 8192 else 16
