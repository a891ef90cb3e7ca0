"""Single-stream decode of the quantized models against bf16, alternating in one process (issue
25's target: int4 and GGUF kept at least 2x bf16):

    .venv/bin/python benchmarks/quant_decode.py [--rounds 3] [--new 128] [--json out.json]

Loads the default model four ways (bf16 dense; int4 RTN with the CPU's default float32
activations, as ``LLM(..., quantization="int4")`` runs, and with bf16 ones; GGUF blocks kept)
and, round after round, decodes ``--new`` tokens greedily after the same 128-token prompt with
each (tokens/s after the first token); prints each round, the medians and their ratios to bf16.
"""
from __future__ import annotations

import json
import statistics
import sys

from decode_vs_llamacpp import fastinfer_decode as decode, round_args  # benchmarks/ (run as a script)

from fastinfer import EngineConfig
from fastinfer.bench.perplexity import default_text
from fastinfer.bench.schema import collect_env
from fastinfer.engine.engine import Engine

CONFIGS = {"bf16": dict(quantization="none", dtype="bfloat16"), "int4": dict(quantization="int4"),
           "int4-bf16": dict(quantization="int4", dtype="bfloat16"), "gguf-kept": dict(quantization="gguf")}


def main() -> int:
    args = round_args(__doc__.splitlines()[0], depth=128)
    engines = {k: Engine(EngineConfig(kv_cache_memory="256MiB", max_model_len=1024, **v)) for k, v in CONFIGS.items()}
    prompt = engines["bf16"].tokenizer.encode(default_text())[10000:10000 + max(1, args.depth)]
    for engine in engines.values():
        decode(engine, prompt[:16], 4)  # warm-up
    rounds: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(args.rounds):
        for name, engine in engines.items():
            rounds[name].append(decode(engine, prompt, args.new))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rounds.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratios = {k: v / med["bf16"] for k, v in med.items()}
    print("median: " + ", ".join(f"{k} {med[k]:.1f} tok/s ({ratios[k]:.2f}x bf16)" for k in med))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": collect_env(), "new": args.new, "rounds": rounds, "median": med, "ratio_to_bf16": ratios},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
