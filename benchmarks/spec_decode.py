"""Speculative decoding against plain decoding, measured side by side in one run (issue 25):

    .venv/bin/python benchmarks/spec_decode.py --rounds 3 --json spec.json

Single stream: each prompt alone (in the chat template), greedy, up to ``--new`` tokens; decode
tokens/s after the first token, each system in turn within a round (these shared machines drift within minutes), medians
over rounds. Workloads: ``grounded`` (copying, editing and quoting passages of CPython's
language reference: the output repeats the prompt) and ``free`` (open continuations: little to
look up). Systems: n-gram drafts, and the target's own int4 copy as its draft model. The
greedy tokens of every system must equal plain decoding's (checked). Under load:
``--load N`` requests at once, output tokens/s with speculation on and off (the backoff).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from fastinfer import EngineConfig, SamplingParams
from fastinfer.bench.perplexity import default_text
from fastinfer.bench.schema import collect_env
from fastinfer.engine.engine import Engine

TASKS = ("Repeat the following passage exactly, word for word.\n\nPassage:\n{p}\n\nRepeated passage:\n",
         "Rewrite the following passage with every sentence on its own line.\n\nPassage:\n{p}\n\nRewritten:\n",
         "Quote the first three sentences of the following passage.\n\nPassage:\n{p}\n\nQuote:\n")
FREE = ("Once upon a time, in a small village by the sea, there lived",
        "The most important lesson I learned in my first year as an engineer was",
        "Here is a short essay about the history of the bicycle.\n\n",
        "Dear diary, today was a strange day because")


def grounded_prompts(n: int) -> list[str]:
    paragraphs = [p.strip() for p in default_text().split("\n\n") if 300 < len(p.strip()) < 700]
    return [TASKS[i % len(TASKS)].format(p=paragraphs[7 * i + 3]) for i in range(n)]


def chat(engine: Engine, prompt: str) -> list[int]:
    """The prompt as the user's message in the model's chat template (an instruct model)."""
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)


def decode(engine: Engine, prompt: str, new: int) -> tuple[list[int], float, float]:
    """Greedy, up to ``new`` tokens (or the end of the answer): the tokens, decode tokens/s after
    the first, and the time to the first token (a draft model reads the prompt then too)."""
    rid = engine.add_request(chat(engine, prompt), SamplingParams(max_tokens=new, temperature=0.0))
    out = engine.drain([rid])[rid]
    m, tokens = out.metrics, out.outputs[0].token_ids
    return tokens, (len(tokens) - 1) / (m.finished_time - m.first_token_time), m.first_token_time - m.arrival_time


def load_run(engine: Engine, prompts: list[str], new: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0)
    start = time.perf_counter()
    ids = [engine.add_request(chat(engine, p), params) for p in prompts]
    outs = engine.drain(ids)
    return sum(len(o.outputs[0].token_ids) for o in outs.values()) / (time.perf_counter() - start)


def spec_counts(engine: Engine) -> dict[str, float]:
    return {k: v for k, v in engine.stats().items() if k.startswith("spec_")}


def single_stream(engines: dict[str, Engine], workloads: dict[str, list[str]], rounds: int, new: int) -> dict:
    out: dict = {}
    for wname, prompts in workloads.items():
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        ttfts: dict[str, list[float]] = {name: [] for name in engines}
        before = {name: spec_counts(e) for name, e in engines.items()}
        for _ in range(rounds):
            for prompt in prompts:
                tokens = {}
                for name, engine in engines.items():
                    tokens[name], tok_s, ttft = decode(engine, prompt, new)
                    speeds[name].append(tok_s)
                    ttfts[name].append(ttft)
                plain = tokens["plain"]
                assert all(t == plain for t in tokens.values()), f"greedy tokens differ from plain decoding ({wname})"
        out[wname] = {}
        for name, engine in engines.items():
            after = spec_counts(engine)
            drafted = after.get("spec_draft_tokens", 0) - before[name].get("spec_draft_tokens", 0)
            accepted = after.get("spec_accepted_tokens", 0) - before[name].get("spec_accepted_tokens", 0)
            drafts = after.get("spec_num_drafts", 0) - before[name].get("spec_num_drafts", 0)
            tok_s = statistics.median(speeds[name])
            out[wname][name] = {"tok_s": tok_s, "ratio": tok_s / statistics.median(speeds["plain"]),
                                "ttft_ms": 1e3 * statistics.median(ttfts[name]),
                                "acceptance_rate": accepted / drafted if drafted else None,
                                "mean_accepted_length": 1 + accepted / drafts if drafts else None}
            r = out[wname][name]
            print(f"{wname:9s} {name:20s} {tok_s:7.1f} tok/s  x{r['ratio']:.2f}  TTFT {r['ttft_ms']:.0f} ms  acceptance "
                  f"{r['acceptance_rate'] if r['acceptance_rate'] is None else round(r['acceptance_rate'], 2)}  "
                  f"mean accepted length {r['mean_accepted_length'] and round(r['mean_accepted_length'], 2)}",
                  flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per workload")
    ap.add_argument("--quantization", default=None, help="the target's: none (float), int8, int4, gguf (default: "
                                                         "the file's blocks kept)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens of n-gram drafts")
    ap.add_argument("--draft-k", type=int, default=3, help="num_speculative_tokens of the int4 self-draft")
    ap.add_argument("--systems", default="ngram,self-draft", help="among ngram, self-draft (plain always runs)")
    ap.add_argument("--load", type=int, default=32, help="requests at once under load (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = dict(quantization=args.quantization, dtype=args.dtype, kv_cache_memory="512MiB", max_model_len=2048)
    configs = {f"ngram-k{args.k}": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 1,
                                     "prompt_lookup_max": 3},
               f"self-draft-int4-k{args.draft_k}": {"method": "draft_model", "quantization": "int4",
                                                    "num_speculative_tokens": args.draft_k}}
    wanted = args.systems.split(",")
    engines = {"plain": Engine(EngineConfig(**base))}
    for name, spec in configs.items():
        if name.rsplit("-k", 1)[0].removesuffix("-int4") in wanted:
            engines[name] = Engine(EngineConfig(**base, speculative_config=spec))
    workloads = {"grounded": grounded_prompts(args.prompts), "free": list(FREE[:args.prompts])}
    for engine in engines.values():
        decode(engine, "warm up", 8)
    result = {"env": collect_env(), "config": vars(args), "single_stream": single_stream(engines, workloads,
                                                                                          args.rounds, args.new)}
    if args.load:
        prompts = [*grounded_prompts(args.load // 2), *(FREE * args.load)[:args.load - args.load // 2]]
        load = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                load[name].append(load_run(engine, prompts, args.new))
        result["load"] = {name: statistics.median(v) for name, v in load.items()}
        print(f"load {args.load}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in result["load"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
