"""The quantization table of issue 11, measured in one process on this machine, one command:

    .venv/bin/python benchmarks/quant_table.py --json bench_out/quant.json --markdown bench_out/quant.md

For each setting of the default model: perplexity (CPython's pydoc_data text, windows of 512
with stride 256, through the engine's own path) and its change against float32 dequantized,
``weight_bytes``, KV bytes per token, single-stream decode tokens/s (128-token prompt, 128 new
tokens, greedy, best of ``--repeats``), and the throughput of 32 mixed requests (16-512 prompt
tokens, 16-256 new, seed 0) in output tokens/s. Settings the library does not offer yet are
listed as such, not skipped silently.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.bench.perplexity import default_text, perplexity
from fastinfer.bench.schema import collect_env
from fastinfer.bench.workload import mixed_workload
from fastinfer.engine.engine import Engine
from fastinfer.errors import ConfigError, InvalidArgumentError

SETTINGS = [  # label, engine options
    ("bfloat16 dequantized", {"dtype": "bfloat16", "quantization": "none"}),
    ("float32 dequantized", {"dtype": "float32", "quantization": "none"}),
    ("int8 (per channel)", {"quantization": "int8"}),
    ("int4 RTN, group 32", {"quantization": "int4", "quant_group_size": 32}),
    ("int4 RTN, group auto", {"quantization": "int4", "quant_group_size": "auto"}),
    ("int4 AWQ, group auto", {"quantization": "int4", "quant_group_size": "auto", "quant_method": "awq"}),
    ("fp8 e4m3 (per channel)", {"quantization": "fp8"}),
    ("GGUF kept (Q4_1 + Q8_0)", {"quantization": "gguf"}),
    ("bfloat16, int8 KV cache", {"dtype": "bfloat16", "quantization": "none", "kv_cache_dtype": "int8"}),
    ("bfloat16, fp8 KV cache", {"dtype": "bfloat16", "quantization": "none", "kv_cache_dtype": "fp8"}),
]
BASELINE = "float32 dequantized"


def decode_tok_s(engine: Engine, prompt: list[int], repeats: int) -> float:
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    best = float("inf")
    for _ in range(repeats):
        rid = engine.add_request(prompt, params)
        final = engine.drain()[rid]
        m = final.metrics
        best = min(best, (m.finished_time - m.first_token_time) / 127)
    return 1.0 / best


def throughput_tok_s(engine: Engine, workload) -> float:
    start = time.perf_counter()
    for p, n in zip(workload.prompts, workload.output_lens):
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    finals = engine.drain()
    elapsed = time.perf_counter() - start
    return sum(len(f.outputs[0].token_ids) for f in finals.values()) / elapsed


def measure(label: str, options: dict, args) -> dict:
    row = {"setting": label, "options": options}
    try:
        engine = Engine(EngineConfig(kv_cache_memory="1GiB", max_model_len=2048, **options))
    except (ConfigError, InvalidArgumentError) as exc:
        return {**row, "unavailable": str(exc)}
    tok = engine.tokenizer
    ids = tok.encode(default_text())[: args.ppl_tokens]
    ppl = perplexity(engine, ids, 512, 256)
    row.update(perplexity=ppl.perplexity, ppl_tokens=ppl.num_tokens, weight_bytes=engine.weight_bytes,
               kv_bytes_per_token=engine.kv_bytes_per_token)
    prompt = tok.encode(default_text())[10000:10128]
    engine.add_request(prompt[:16], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    engine.drain()
    row["decode_tok_s"] = decode_tok_s(engine, prompt, args.repeats)
    if args.num_prompts:
        row["throughput_tok_s"] = throughput_tok_s(
            engine, mixed_workload(tok, args.num_prompts, (16, 512), (16, 256), seed=0))
    return row


def markdown(rows: list[dict], env: dict) -> str:
    base = next((r for r in rows if r["setting"] == BASELINE and "perplexity" in r), None)
    bf16 = next((r for r in rows if r["setting"] == "bfloat16 dequantized" and "decode_tok_s" in r), None)
    out = [f"CPU: {env['cpu']} ({env.get('cpu_features', '')}), {env['threads']} threads, torch {env['torch']}", "",
           "| setting | perplexity | vs float32 | weight MB | KV bytes/token | decode tok/s | vs bf16 | "
           "32-request tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "unavailable" in r:
            out.append(f"| {r['setting']} | not yet: {r['unavailable'].split(';')[0]} | | | | | | |")
            continue
        rel = f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.2f}%" if base else ""
        speed = f"{r['decode_tok_s'] / bf16['decode_tok_s']:.2f}x" if bf16 else ""
        tput = f"{r['throughput_tok_s']:.1f}" if "throughput_tok_s" in r else ""
        out.append(f"| {r['setting']} | {r['perplexity']:.4f} | {rel} | {r['weight_bytes'] / 1e6:.1f} | "
                   f"{r['kv_bytes_per_token']} | {r['decode_tok_s']:.1f} | {speed} | {tput} |")
    return "\n".join(out) + "\n"


def cpu_features() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return ""
    return ", ".join(f for f in ("avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16") if f in flags)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--num-prompts", type=int, default=32, help="0 skips the throughput column")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    env = {**collect_env(), "cpu_features": cpu_features()}
    rows = []
    for label, options in SETTINGS:
        if args.only and label not in args.only:
            continue
        rows.append(measure(label, options, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = markdown(rows, env)
    print(text)
    command = "python benchmarks/quant_table.py " + " ".join(sys.argv[1:])
    for path, content in ((args.json, json.dumps({"env": env, "rows": rows, "command": command}, indent=2)),
                          (args.markdown, text)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
