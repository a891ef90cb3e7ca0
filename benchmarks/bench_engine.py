"""fastinfer beside Hugging Face ``transformers`` on the same model, dtype and workload,
measured in the same run (issue 2's figures).

  .venv/bin/python benchmarks/bench_engine.py --dtype float32 bfloat16 --json bench_out/engine.json

Rows: single-request decode tokens/s (128-token prompt, 128 new tokens) and output tokens/s on
32 mixed requests (16-512 prompt tokens, 16-256 new tokens, seed 0). Greedy, EOS ignored, so
every system generates exactly the same number of tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.bench.baselines import (load_transformers_model, time_transformers_one_at_a_time,
                                       transformers_generate)
from fastinfer.bench.workload import mixed_workload
from fastinfer.engine.engine import Engine
from fastinfer.model.registry import resolve_model_path


def run_engine(engine: Engine, prompts, output_lens) -> tuple[float, list]:
    """Submits everything at once, steps to the end; returns (seconds, final outputs)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
           for p, n in zip(prompts, output_lens)]
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return time.perf_counter() - start, [finals[i] for i in ids]


def decode_rate_fastinfer(engine: Engine, prompt, n: int) -> float:
    _, (out,) = run_engine(engine, [prompt], [n])
    m = out.metrics
    return (n - 1) / (m.finished_time - m.first_token_time)


def decode_rate_transformers(model, prompt, n: int, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        transformers_generate(model, prompt, 1)
        t1 = time.perf_counter()
        transformers_generate(model, prompt, n)
        t2 = time.perf_counter()
        best = min(best, (t2 - t1) - (t1 - t0))
    return (n - 1) / best


def bench_dtype(model: str, dtype: str, args) -> dict:
    path = resolve_model_path(model)
    engine = Engine(EngineConfig(model=path, dtype=dtype, device="cpu", kv_cache_memory=args.kv_cache_memory))
    tok = engine.tokenizer
    single = mixed_workload(tok, 1, (128, 128), (128, 128), seed=args.seed, name="single")
    mixed = mixed_workload(tok, args.num_prompts, (16, 512), (16, 256), seed=args.seed)
    run_engine(engine, single.prompts, [8])  # warm-up
    fi_decode = max(decode_rate_fastinfer(engine, single.prompts[0], 128) for _ in range(2))
    fi_time, outs = run_engine(engine, mixed.prompts, mixed.output_lens)
    assert [len(o.outputs[0].token_ids) for o in outs] == mixed.output_lens
    hf = load_transformers_model(path, engine.dtype)
    transformers_generate(hf, single.prompts[0], 8)  # warm-up
    hf_decode = decode_rate_transformers(hf, single.prompts[0], 128)
    hf_time = time_transformers_one_at_a_time(hf, mixed.prompts, mixed.output_lens)
    out_tokens = sum(mixed.output_lens)
    return {
        "dtype": dtype,
        "single_decode_tok_s": {"fastinfer": fi_decode, "transformers": hf_decode},
        "mixed": {
            "num_prompts": args.num_prompts, "input_tokens": sum(mixed.input_lens), "output_tokens": out_tokens,
            "fastinfer": {"time_s": fi_time, "output_tok_s": out_tokens / fi_time},
            "transformers": {"time_s": hf_time, "output_tok_s": out_tokens / hf_time},
            "speedup": hf_time / fi_time,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_dtype(args.model, d, args) for d in args.dtype]
    print(f"\nmodel={args.model} threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")
    print("| dtype | system | decode tok/s (1 req, 128+128) | mixed 32 req: output tok/s | mixed: time s |")
    print("|---|---|---|---|---|")
    for r in rows:
        for system in ("fastinfer", "transformers"):
            m = r["mixed"][system]
            print(f"| {r['dtype']} | {system} | {r['single_decode_tok_s'][system]:.1f} | "
                  f"{m['output_tok_s']:.1f} | {m['time_s']:.1f} |")
        print(f"| {r['dtype']} | speedup (mixed) | | {r['mixed']['speedup']:.2f}x | |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
