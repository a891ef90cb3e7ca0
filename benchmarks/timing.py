"""Timing helper shared by the kernel benchmark scripts."""
from __future__ import annotations

import argparse
import time

import torch

from fastinfer.ops.backends import cpu_native


def times_ms(fns, repeats: int, warmup: int = 3) -> list[list[float]]:
    """Per-function wall times in ms; the functions are interleaved within each repeat so that
    noise from other processes hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def parse_native_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds ``--threads``, parses, applies the thread count and checks the native kernels exist."""
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_native.available():
        raise SystemExit("fastinfer._C_cpu is not built")
    return args
