"""Benchmark: fastinfer's batch-invariant float32 linear vs torch F.linear (float32, bfloat16).

Run: ``python benchmarks/bench_linear.py [--repeats 30] [--shapes 576x576,...] [--ms 1,8,...]``.
Prints, for each weight shape (K x N) and batch M, the median (or ``--stat min``) time of each
path over ``--repeats`` interleaved runs after warm-up, with GFLOP/s (2*M*N*K / t) and GB/s (bytes of x, w and y
touched once, at each path's dtype / t), and our time as a ratio of F.linear float32.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import parse_native_args, times_ms  # benchmarks/timing.py (run as a script from anywhere)
import torch.nn.functional as F

from fastinfer.ops.backends import cpu_native

MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
BATCHES = [1, 8, 32, 128, 512]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in MODEL_SHAPES),
                    help="comma-separated KxN weight shapes")
    ap.add_argument("--ms", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes M")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    args = parse_native_args(ap)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(v) for v in args.ms.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernel path {cpu_native.isa()}, "
          f"{args.stat} of {args.repeats} interleaved runs")
    hdr = (f"{'K x N':>11} {'M':>4} | {'ours ms':>8} {'GF/s':>6} {'GB/s':>6} | {'f32 ms':>8} {'GF/s':>6} "
           f"{'GB/s':>6} | {'bf16 ms':>8} {'GF/s':>6} {'GB/s':>6} | {'ours/f32':>8} {'ours/bf16':>9}")
    print(hdr)
    print("-" * len(hdr))
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen)
        wb = w.bfloat16()
        reps = max(5, args.repeats // 4) if n * k > 8_000_000 else args.repeats
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            xb = x.bfloat16()
            flop = 2.0 * m * n * k
            fns = (lambda: cpu_native.linear_f32(x, w), lambda: F.linear(x, w), lambda: F.linear(xb, wb))
            stat = statistics.median if args.stat == "median" else min
            row = []
            for ts, esize in zip(times_ms(fns, reps), (4, 4, 2)):
                ms = stat(ts)
                nbytes = esize * (m * k + n * k + m * n)
                row.append((ms, flop / ms / 1e6, nbytes / ms / 1e6))
            cells = " | ".join(f"{ms:8.3f} {gf:6.1f} {gb:6.1f}" for ms, gf, gb in row)
            print(f"{k:>5} x {n:<5} {m:>4} | {cells} | {row[0][0] / row[1][0]:8.2f} {row[0][0] / row[2][0]:9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
