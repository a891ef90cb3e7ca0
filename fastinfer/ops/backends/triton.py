"""The Triton kernels of ``fastinfer.kernels.triton`` as a backend of the dispatch point: on a
GPU, and on the CPU under ``TRITON_INTERPRET=1``, where the tests run them and where they are
taken only when the ``triton`` backend is forced (the interpreter is far slower than any other
backend)."""
from __future__ import annotations

import os

import torch


def _on_cpu(first, *args, **kwargs) -> bool:
    """True when an op's first tensor argument is on the CPU (the interpreter's case)."""
    return isinstance(first, torch.Tensor) and first.device.type == "cpu"


def register_ops(register) -> None:
    """Registers the Triton kernels with the dispatch point's ``register`` where Triton can
    run (a GPU, or the interpreter) and is installed."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return
    try:
        from fastinfer.kernels.triton import activation, cache, norm, rotary
        from fastinfer.kernels.triton import attention as triton_attention
        from fastinfer.kernels.triton import quantized_linear as triton_qlinear
    except ImportError:
        return
    entries = (
        # Row-wise ops: one program per row (or a few), one pass over the data.
        ("rms_norm", norm.rms_norm, norm.rms_norm_applies),
        ("add_rms_norm", norm.add_rms_norm, norm.add_rms_norm_applies),
        ("silu_and_mul", activation.silu_and_mul, activation.silu_and_mul_applies),
        ("rotary_embedding", rotary.rotary_embedding, rotary.rotary_embedding_applies),
        # Float, int8 and fp8 caches; a negative slot (a padded token) is skipped.
        ("reshape_and_cache", cache.reshape_and_cache, cache.reshape_and_cache_applies),
        # Dequantizes in registers inside the GEMM/GEMV tiles.
        ("quantized_linear", triton_qlinear.quantized_linear, triton_qlinear.applies),
        # One kernel for prefill and chunked prefill, a split-K one for decode.
        ("paged_attention", triton_attention.paged_attention, triton_attention.paged_attention_applies),
    )
    for op, fn, applies in entries:
        register(op, "triton", fn, applies, only_if_forced=_on_cpu)
