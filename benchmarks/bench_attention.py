"""Benchmark: fastinfer's native CPU paged attention vs the pure-torch reference.

Run: ``python benchmarks/bench_attention.py [--repeats 20] [--dtype float32] [--threads 0]``.
Shapes of the default model (SmolLM2-135M: H=9, Hkv=3, D=64, block size 16); decode batches
(B sequences of n cached tokens, one query each) and single-sequence prefills (L = n). Prints
the median time of each path over interleaved runs after warm-up, the native path's achieved
GB/s (K and V bytes read once) and GFLOP/s (4 * D flops per attended (query, key, head)), and
the speed-up. Block ids are shuffled, as in a real cache.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import parse_native_args, times_ms  # benchmarks/timing.py (run as a script from anywhere)

from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native
from fastinfer.common.metadata import AttentionMetadata

DECODE = [(b, n) for b in (1, 8, 32) for n in (128, 512, 2048)]  # (batch, context length)
PREFILL = [128, 512, 2048]


def make_batch(seqs: list[tuple[int, int]], h: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
               gen: torch.Generator):
    """``seqs``: (context_len, query_len) per sequence -> (q, k_cache, v_cache, meta)."""
    need = [-(-n // bs) for n, _ in seqs]
    nblocks = sum(need)
    k_cache = torch.randn(nblocks, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(nblocks, bs, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(nblocks, generator=gen)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int64)
    starts, at = [0], 0
    for i, m in enumerate(need):
        tables[i, :m] = perm[at:at + m]
        at += m
        starts.append(starts[-1] + seqs[i][1])
    q = torch.randn(starts[-1], h, d, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), query_start_loc=starts,
        context_lens=[n for n, _ in seqs], block_tables=tables,
        max_query_len=max(L for _, L in seqs))
    return q, k_cache, v_cache, meta


def bench_row(label: str, seqs, args, gen) -> None:
    q, kc, vc, meta = make_batch(seqs, args.heads, args.kv_heads, args.head_dim, args.block_size,
                                 getattr(torch, args.dtype), gen)
    scale = args.head_dim ** -0.5
    fns = (lambda: cpu_native.paged_attention(q, kc, vc, meta, scale),
           lambda: reference.paged_attention(q, kc, vc, meta, scale))
    reps = max(5, args.repeats // 4) if sum(L * n for n, L in seqs) > 1_000_000 else args.repeats
    native, ref = (statistics.median(t) for t in times_ms(fns, reps))
    kv_bytes = 2 * sum(n for n, _ in seqs) * args.kv_heads * args.head_dim * kc.element_size()
    pairs = sum(L * n - L * (L - 1) // 2 for n, L in seqs) * args.heads  # attended (q, k, head)
    flops = 4.0 * args.head_dim * pairs
    print(f"{label:<24} | {native:9.3f} {kv_bytes / native / 1e6:7.1f} {flops / native / 1e6:7.1f} | "
          f"{ref:9.3f} | {ref / native:7.1f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    args = parse_native_args(ap)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernel path {cpu_native.isa()}, "
          f"{args.dtype}, H={args.heads} Hkv={args.kv_heads} D={args.head_dim} block={args.block_size}, "
          f"median of {args.repeats} interleaved runs")
    hdr = f"{'case':<24} | {'native ms':>9} {'GB/s':>7} {'GF/s':>7} | {'ref ms':>9} | {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(0)
    for b, n in DECODE:
        bench_row(f"decode B={b} n={n}", [(n, 1)] * b, args, gen)
    for n in PREFILL:
        bench_row(f"prefill n={n}", [(n, n)], args, gen)


if __name__ == "__main__":
    main()
