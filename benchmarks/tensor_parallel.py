"""Tensor parallelism on this CPU: TP=2 against TP=1, with gloo's all-reduce and with
DeepSpeed's shared-memory one (``tp_all_reduce="shm"``), for single-stream and 32-request decode.

Each configuration runs in a fresh process (``LLM(...)``, greedy, EOS ignored): one request of a
64-token prompt generating 128 tokens (tok/s), then 32 requests of 64-token prompts generating
64 each (output tok/s, prefill included). The configurations take turns for ``--rounds`` rounds,
so drift of the machine spreads over all of them; the medians and the ratios to TP=1 are
printed, and with ``--out`` written as JSON with the CPU named.

    .venv/bin/python benchmarks/tensor_parallel.py --rounds 3 --out tp.json

``shm`` needs DeepSpeed (``pip install --no-deps deepspeed==0.19.8 hjson einops``; scripts/setup.sh
installs it) and is skipped with a message without it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {"tp1": (1, "gloo"), "tp2-gloo": (2, "gloo"), "tp2-shm": (2, "shm")}


def measure(tp: int, all_reduce: str, model: str, dtype: str) -> dict:
    """One configuration's figures (run in a child process)."""
    from fastinfer import LLM, SamplingParams

    options = dict(dtype=dtype, device="cpu", kv_cache_memory="512MiB")
    if tp > 1:
        options.update(tensor_parallel_size=tp, tp_all_reduce=all_reduce)
    llm = LLM(model, **options)
    try:
        single = [[100 + j for j in range(64)]]
        batch = [[(i * 37 + j) % 5000 + 100 for j in range(64)] for i in range(32)]
        llm.generate(single, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        t = time.perf_counter()
        llm.generate(single, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)
        single_tok_s = 128 / (time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate(batch, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), use_tqdm=False)
        batch_tok_s = 32 * 64 / (time.perf_counter() - t)
    finally:
        llm.shutdown()
    return {"single_stream_tok_s": single_tok_s, "batch32_tok_s": batch_tok_s}


def run_child(name: str, args: argparse.Namespace) -> dict | None:
    tp, all_reduce = CONFIGS[name]
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--dtype", args.dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"{name}: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items() if rs}
    base = medians.get("tp1")
    ratios = {name: {k: m[k] / base[k] for k in m} for name, m in medians.items()} if base else {}
    return {"medians": medians, "ratios_to_tp1": ratios}


def cpu_name() -> str:
    from fastinfer.bench.schema import collect_env

    env = collect_env(1)
    import os

    return f"{env['cpu']}, kernels {env.get('cpu_isa')}, {os.cpu_count()} logical CPUs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*CONFIGS[args.child], args.model, args.dtype)))
        return
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            result = run_child(name, args)
            if result is not None:
                runs[name].append(result)
                print(f"round {r + 1} {name}: {result}", file=sys.stderr, flush=True)
    doc = {"cpu": cpu_name(), "model": args.model, "dtype": args.dtype, "rounds": args.rounds, "runs": runs,
           **summarize(runs)}
    print(json.dumps({k: doc[k] for k in ("cpu", "medians", "ratios_to_tp1")}, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
