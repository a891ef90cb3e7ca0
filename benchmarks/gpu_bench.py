#!/usr/bin/env python3
"""GPU benchmark of fastinfer: ``fastinfer bench gpu`` as a script, for machines where
fastinfer is built in place rather than installed (``scripts/gpu-check.sh`` runs it).

    python3 benchmarks/gpu_bench.py --out bench_out/gpu                 # both shapes, ~5 min on an H100
    python3 benchmarks/gpu_bench.py --shapes llama-3.2-1b --quick       # a quicker look

Options, sections and the ``OUT/gpu_bench.{json,md}`` it writes: ``python3 benchmarks/gpu_bench.py
--help`` and :mod:`fastinfer.bench.gpu`. Without torch or a GPU it exits with status 2 and a
one-line message.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    try:
        import torch  # noqa: F401 - fastinfer needs it; say so in one line rather than a traceback
    except ImportError as exc:
        print(f"gpu_bench: torch is not importable ({exc}); nothing to measure", file=sys.stderr)
        return 2
    from fastinfer.bench.gpu import main as gpu_main

    return gpu_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
