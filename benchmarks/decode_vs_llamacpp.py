"""Single-stream decode, fastinfer (GGUF blocks kept) against llama.cpp on the same file, measured
in alternation in one run (these shared machines drift by tens of percent within minutes):

    FASTINFER_LLAMA_CPP=<llama.cpp>/build/bin .venv/bin/python benchmarks/decode_vs_llamacpp.py --rounds 3

Each round measures the machine's memory read bandwidth (fastinfer.bench.cpu_roofline), runs
``llama-bench -p 0 -n 128`` (tg128: decoding from an empty context) and then fastinfer on the
same positions: a 1-token prompt and 128 new tokens (tokens/s after the first token, as
benchmarks/quant_table.py measures it). ``--depth 128`` runs both after 128 tokens of context
instead (``llama-bench -d 128``; fastinfer on a 128-token prompt), where attention reads more of
the KV cache (fastinfer's is float32 for this float32 model, llama.cpp's float16). Printed per round and
as medians: the ratio, and each system's fraction of its own roofline in that round (its weight
bytes read once per token at the measured bandwidth: fastinfer's packed weights, llama.cpp's GGUF
tensors); written as JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.bench.cpu_roofline import decode_roofline, read_bandwidth
from fastinfer.bench.llamacpp import llama_bench
from fastinfer.bench.perplexity import default_text
from fastinfer.bench.schema import collect_env
from fastinfer.engine.engine import Engine


def fastinfer_decode(engine: Engine, prompt: list[int], new: int) -> float:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    m = engine.drain()[rid].metrics
    return (new - 1) / (m.finished_time - m.first_token_time)


def gguf_tensor_bytes(path: str) -> int:
    """Bytes of a GGUF file's tensors (what llama.cpp reads per token; the tied embedding's one
    row aside)."""
    from gguf import GGUFReader
    return int(sum(t.n_bytes for t in GGUFReader(path).tensors))


def round_args(description: str, depth: int = 0) -> argparse.Namespace:
    """``--rounds``, ``--new``, ``--json`` and ``--depth`` (default ``depth``) of the alternating
    decode benchmarks."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--depth", type=int, default=depth, help="tokens of context before the timed decode")
    return ap.parse_args()


def main() -> int:
    args = round_args(__doc__.splitlines()[0])
    engine = Engine(EngineConfig(quantization="gguf", kv_cache_memory="256MiB", max_model_len=1024))
    path, threads = engine.loaded.path, torch.get_num_threads()
    prompt = engine.tokenizer.encode(default_text())[10000:10000 + max(1, args.depth)]
    fastinfer_decode(engine, prompt[:16], 4)  # warm-up
    our_bytes, their_bytes = engine.weight_bytes, gguf_tensor_bytes(path)
    rounds = []
    for i in range(args.rounds):
        bw = read_bandwidth()
        ours = fastinfer_decode(engine, prompt, args.new)
        theirs = llama_bench(path, threads, prompt=0, new=args.new, depth=args.depth)["tg_tok_s"]
        r = {"fastinfer_tok_s": ours, "llama_cpp_tok_s": theirs, "ratio": ours / theirs, "read_GBps": bw["read_GBps"],
             "fastinfer_roofline_fraction": ours / decode_roofline(our_bytes, bw)["tok_s"],
             "llama_cpp_roofline_fraction": theirs / decode_roofline(their_bytes, bw)["tok_s"]}
        rounds.append(r)
        print(f"round {i + 1}: read {bw['read_GBps']} GB/s; fastinfer {ours:.1f} tok/s "
              f"({r['fastinfer_roofline_fraction']:.0%} of its roofline), llama.cpp tg{args.new} {theirs:.1f} tok/s "
              f"({r['llama_cpp_roofline_fraction']:.0%}), ratio {ours / theirs:.2f}", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"median: fastinfer {med['fastinfer_tok_s']:.1f} ({med['fastinfer_roofline_fraction']:.0%}), llama.cpp "
          f"{med['llama_cpp_tok_s']:.1f} ({med['llama_cpp_roofline_fraction']:.0%}), ratio {med['ratio']:.2f}; "
          f"read {med['read_GBps']} GB/s, weights read per token: fastinfer {our_bytes / 1e6:.1f} MB, llama.cpp "
          f"{their_bytes / 1e6:.1f} MB ({threads} threads, {os.path.basename(path)}, depth {args.depth})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": collect_env(), "model": path, "threads": threads, "depth": args.depth, "weight_bytes":
                       {"fastinfer": our_bytes, "llama_cpp": their_bytes}, "rounds": rounds, "median": med}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
