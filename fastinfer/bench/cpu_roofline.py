"""The CPU's limits, measured in the run that compares against them (issue 25).

These shared machines drift by tens of percent within minutes, so a roofline quoted from a data
sheet or from another run says little; the benchmarks measure it beside the systems they time:

- :func:`read_bandwidth`: bytes per second of a streaming read of a buffer far larger than the
  last-level cache, with every thread torch uses (what a decode step's weight reads can reach);
- :func:`gemm_rate`: FLOP/s of ``F.linear`` on a given shape and dtype (what a batched step's
  matmuls can reach).

:func:`decode_roofline` turns them into a single-stream limit: weight bytes read per token over
the read bandwidth.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: pages touched, code paths loaded
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict[str, Any]:
    """Streaming read of ``nbytes`` (a float32 sum, which the vector units do far faster than
    memory delivers): the best of ``repeats`` runs, in bytes/s."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    t = _best_seconds(lambda: buf.sum(), repeats)
    return {"read_bytes_per_s": nbytes / t, "read_GBps": round(nbytes / t / 1e9, 1), "buffer_MiB": nbytes >> 20,
            "threads": torch.get_num_threads()}


def gemm_rate(m: int = 256, k: int = 576, n: int = 1536, dtype: torch.dtype = torch.bfloat16,
              repeats: int = 10) -> dict[str, Any]:
    """``F.linear`` of an ``[m, k]`` input on an ``[n, k]`` weight in ``dtype``: the best of
    ``repeats`` runs of a batch of products, in FLOP/s."""
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    inner = 8

    def run() -> None:
        for _ in range(inner):
            F.linear(x, w)

    t = _best_seconds(run, repeats) / inner
    flops = 2 * m * k * n
    return {"flop_per_s": flops / t, "GFLOPs": round(flops / t / 1e9, 1), "shape": [m, k, n],
            "dtype": str(dtype).removeprefix("torch.")}


def decode_roofline(weight_bytes: int, bandwidth: dict[str, Any]) -> dict[str, Any]:
    """Single-stream decode limit: every weight byte is read once per token (KV-cache reads,
    small at short contexts, are left out, so the limit is generous)."""
    rate = bandwidth["read_bytes_per_s"]
    return {"weight_bytes": weight_bytes, "tok_s": rate / weight_bytes, "read_GBps": bandwidth["read_GBps"]}


def workload_flops(cfg, input_lens: list[int], output_lens: list[int]) -> dict[str, float]:
    """FLOPs of serving a workload with a Llama-family model (``ModelConfig`` ``cfg``): every
    token fed through the layers (a request's prompt and all its outputs but the last), its
    attention over the positions before it, and one LM-head row per output token."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_token = 2 * cfg.num_layers * (h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
                                      + 3 * h * cfg.intermediate_size)
    fed = [p + o - 1 for p, o in zip(input_lens, output_lens)]  # tokens through the layers, per request
    tokens = sum(fed)
    # token at position i attends i + 1 keys: QK and PV, 2 FLOPs a multiply-add each
    positions = sum(n * (n + 1) // 2 for n in fed)
    attention = 4 * cfg.num_layers * cfg.num_heads * d * positions
    head = 2 * h * cfg.vocab_size * sum(output_lens)
    return {"linear": per_token * tokens, "attention": attention, "lm_head": head,
            "total": per_token * tokens + attention + head}


def compute_roofline(cfg, input_lens: list[int], output_lens: list[int], rate: dict[str, Any]) -> dict[str, Any]:
    """The workload's FLOPs over a measured GEMM rate: the least time its matmuls take on this
    machine, and the output tokens/s that would give."""
    flops = workload_flops(cfg, input_lens, output_lens)
    seconds = flops["total"] / rate["flop_per_s"]
    return {"gemm": rate, "workload_flops": flops, "seconds": seconds,
            "output_tok_s": sum(output_lens) / seconds}
