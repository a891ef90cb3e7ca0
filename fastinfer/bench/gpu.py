"""GPU benchmark of fastinfer on random-weight Llama models of real shapes, against
``transformers`` and a ``torch.compile``d plain decode loop measured in the same run.

    fastinfer bench gpu --out bench_out/gpu                     # both shapes, ~5 min on an H100
    fastinfer bench gpu --shapes llama-3.2-1b --quick           # a quicker look
    fastinfer bench gpu --budget-s 200                          # skip what would run past 200 s

(``python3 benchmarks/gpu_bench.py`` takes the same options: ``scripts/gpu-check.sh`` runs it.)

For each shape (``llama-3.2-1b``, and ``llama-3.1-8b`` where the GPU has the memory) the
folder is built on the GPU (:mod:`fastinfer.bench.random_model`; no download; kept under
``--model-dir`` for later runs), then:

- single-stream decode (128-token prompt, 256 new tokens, greedy, EOS ignored, after a warm-up
  run) in tokens/s after the first token, and its fraction of the HBM roofline
  ``weight_bytes x tok/s / peak bandwidth`` against both the GPU's data-sheet peak (a table by
  name) and the device-to-device copy bandwidth measured here;
- a mixed workload (256 requests, prompts 32-1024 tokens, outputs 32-512, seeded, all
  submitted at once): output and total tokens/s, TTFT and TPOT p50/p90/p99;
- the same through ``transformers`` (``generate``; single-stream, and static batches with left
  padding on a fixed subset of the workload, as it is far slower) and through a plain Llama
  forward written in torch with a static KV cache under ``torch.compile(mode="reduce-overhead")``
  (gpt-fast style; single-stream, and batched on the subset when the budget allows); fastinfer's
  ratio to each, fastinfer's figure on the same subset where the baseline ran on a subset;
- each op's kernels (``fastinfer.ops.implementations``: triton, cuda and the torch reference)
  at decode-relevant sizes of the 1B shape, timed with ``triton.testing.do_bench`` (median,
  L2 flushed) and by CUDA-graph replay, as bytes moved / time.

Every section runs in its own try/except: a failure is recorded (error text in the JSON and
the Markdown) and the rest goes on. ``--budget-s`` skips what would start past the budget and
says so. Results: ``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md`` (rewritten after every
section, so a run cut short keeps what it measured); a summary table is printed at the end.
Without a GPU it exits with status 2 and a one-line message.

The parts: :mod:`~fastinfer.bench.gpu_run` (sections, budget, the document),
:mod:`~fastinfer.bench.gpu_measure` (one shape's measurements, on ``fastinfer.bench``'s
systems and workload), :mod:`~fastinfer.bench.compiled` (the ``torch.compile`` baseline),
:mod:`~fastinfer.bench.gpu_hardware` (environment, bandwidth), :mod:`~fastinfer.bench.gpu_kernels`,
:mod:`~fastinfer.bench.gpu_profile` (the decode step profile) and
:mod:`~fastinfer.bench.gpu_report` (Markdown and summary).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

DEFAULT_SHAPES = "llama-3.2-1b,llama-3.1-8b"
NO_GPU = "gpu_bench: no CUDA GPU is available (torch.cuda.is_available() is False); nothing to measure"
DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = __doc__.split("\n\n", 1)[1].split("\n\nThe parts:")[0]


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench_out", "gpu"),
                   help="output folder (default: $OUT or bench_out/gpu)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated shapes (default {DEFAULT_SHAPES})")
    p.add_argument("--quick", action="store_true",
                   help="smaller runs: 128 new tokens single-stream, 64 requests, subsets of 32")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="skip sections that would start past this many seconds (default 300)")
    p.add_argument("--model-dir", default=os.environ.get("FASTINFER_BENCH_MODELS", "/tmp/fastinfer_random_models"),
                   help="where the random model folders are built (not under --out: they are large)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=None, help="mixed workload size (default 256; --quick 64)")
    p.add_argument("--num-requests-8b", type=int, default=None,
                   help="mixed workload size for the 8B shape (default 256 when the budget allows, else 128)")
    p.add_argument("--input-range", default="32,1024", help="prompt lengths, inclusive (default 32,1024)")
    p.add_argument("--output-range", default="32,512", help="output lengths, inclusive (default 32,512)")
    p.add_argument("--prompt-len", type=int, default=128, help="single-stream prompt tokens (default 128)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="single-stream new tokens (default 256; --quick 128)")
    p.add_argument("--baseline-requests", type=int, default=None,
                   help="requests of the workload the baselines run (its first ones; default 64, 8B 32; --quick 32)")
    p.add_argument("--baseline-requests-8b", type=int, default=None,
                   help="the same for the 8B shape (default 32; --quick 16)")
    p.add_argument("--baseline-batch", type=int, default=32, help="static batch of the batched baselines (default 32)")
    p.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                   help="transformers' KV cache for generate (default dynamic)")
    p.add_argument("--no-baselines", action="store_true", help="fastinfer only")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--no-kernels", action="store_true", help="leave out the per-kernel bandwidth section")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="fastinfer without CUDA graphs")
    p.add_argument("--ops-backend", default=None, help="force fastinfer's ops backend (reference|triton|cuda)")
    # debugging the benchmark itself where there is no GPU: tiny shape, CPU, small sizes
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    """Adds the GPU benchmark's options to ``p`` (``fastinfer bench gpu`` and
    ``benchmarks/gpu_bench.py`` share them)."""
    _add_run_args(p)
    _add_engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``benchmarks/gpu_bench.py``."""
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpu_args(p)
    return p


def option_names() -> set[str]:
    """The names of the GPU benchmark's options (what the result document's ``args`` holds)."""
    return set(vars(build_parser().parse_args([])))


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the sizes left unset (``--quick`` or the full run's), parses the length ranges
    and the shape list; returns ``args``."""
    q = args.quick
    args.num_requests = args.num_requests or (64 if q else 256)
    args.decode_tokens = args.decode_tokens or (128 if q else 256)
    args.baseline_requests = args.baseline_requests or (32 if q else 64)
    args.baseline_requests_8b = args.baseline_requests_8b or (16 if q else 32)
    args.input_range = _int_pair(args.input_range)
    args.output_range = _int_pair(args.output_range)
    if isinstance(args.shapes, str):
        args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    return args


def _int_pair(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"32,1024"`` -> (32, 1024); a pair already parsed stays as it is."""
    if isinstance(text, tuple):
        return text
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and completed options of ``benchmarks/gpu_bench.py``."""
    return finish_args(build_parser().parse_args(argv))


def _stop(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_gpu_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark of ``args`` (parsed by a parser with :func:`add_gpu_args`); returns
    the exit status: 0, 2 without a GPU, 130 when interrupted (what was measured is kept)."""
    import torch

    from fastinfer.bench.gpu_report import summary
    from fastinfer.bench.gpu_run import GpuBench

    args = finish_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    bench = GpuBench(args, option_names())
    signal.signal(signal.SIGTERM, _stop)  # `timeout` stops it: keep what was measured, say so
    try:
        doc = bench.run()
    except KeyboardInterrupt as exc:
        why = f"interrupted ({exc or 'SIGINT'}) at {bench.elapsed():.0f} s; the sections before it stand"
        bench.doc["errors"].append({"section": "run", "error": why})
        bench.write()
        print(f"\ngpu_bench: interrupted ({exc or 'SIGINT'}); partial results in {bench.json_path}", file=sys.stderr)
        print(summary(bench.doc))
        return 130
    print()
    print(summary(doc))
    print(f"\nwrote {bench.json_path} and {bench.md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/gpu_bench.py [options]``: the same as ``fastinfer bench gpu [options]``."""
    return run_gpu_bench(build_parser().parse_args(argv))
