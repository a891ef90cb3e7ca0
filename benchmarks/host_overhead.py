"""The engine's host time per decode step, with the model taken out.

On a GPU, whatever the host does between two decode steps (scheduling, packing the batch,
sampling bookkeeping, detokenizing, stop checks, building outputs) is time the GPU idles unless
it overlaps the GPU's work (``EngineConfig.async_scheduling``). This measures that host time on
any machine: the runner's model call is replaced by a stub that packs the batch as usual and
returns fixed logits, so what is left is the engine's own work. Each batch size runs

- ``step()``: every request's cumulative output built each step (what ``AsyncEngine`` streams);
- ``drain``'s steps (``step(finals_only=True)``): only final outputs (``LLM.generate``);
- ``drain`` with ``async_scheduling=True`` (the same host work, reordered; on a CPU there is no
  device to overlap with, so this only shows its bookkeeping costs nothing).

Usage: ``.venv/bin/python benchmarks/host_overhead.py [--batch-sizes 1,32,256] [--steps 200]``.
A tiny random Llama (``fastinfer.bench.random_model``, vocabulary 4096) stands in for the model;
times are the best of three runs of ``--steps`` steps, after ``--warmup`` steps.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from fastinfer import SamplingParams
from fastinfer.bench.random_model import save_random_llama
from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def stub_engine(folder: str, batch: int, steps: int, asynchronous: bool) -> Engine:
    engine = Engine(EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_memory="1GiB",
                                 max_num_seqs=max(batch, 8), async_scheduling=asynchronous))
    runner, vocab = engine.runner, engine.loaded.config.vocab_size
    logits = torch.randn(max(batch, 8), vocab, generator=torch.Generator().manual_seed(0))

    def execute(inp, all_logits=False, feed=None):
        runner.pack(inp)  # the host's packing stays; only the model is gone
        return logits[: sum(inp.needs_logits) if inp.needs_logits else len(inp.token_ids)]

    runner.execute = execute
    for i in range(batch):
        engine.add_request([5 + i % 50, 6, 7, 8] * 8,
                           SamplingParams(max_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True))
    return engine


def time_steps(engine: Engine, steps: int, finals_only: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(finals_only=finals_only)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_llama(f"{tmp}/tiny", "tiny", torch.float32, seed=0)
        print(f"host time per decode step, model stubbed ({cpu_name()}, torch {torch.__version__}, 1 thread); "
              f"steps {a.warmup}..{a.warmup + 3 * a.steps} of each request")
        print(f"{'batch':>5}  {'step() us':>10}  {'drain us':>10}  {'drain async us':>14}  {'us/seq (drain)':>14}")
        for batch in (int(b) for b in a.batch_sizes.split(",")):
            row = []
            for finals_only, asynchronous in ((False, False), (True, False), (True, True)):
                engine = stub_engine(folder, batch, a.steps, asynchronous)
                for _ in range(a.warmup):
                    engine.step()
                row.append(min(time_steps(engine, a.steps, finals_only) for _ in range(3)) * 1e6)
            print(f"{batch:>5}  {row[0]:>10.0f}  {row[1]:>10.0f}  {row[2]:>14.0f}  {row[1] / batch:>14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
