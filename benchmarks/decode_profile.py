"""Where a step's time goes on the CPU: the profile that guides the kernel work (issue 25).

    .venv/bin/python benchmarks/decode_profile.py [--quantization gguf] [--batch 1] [--tokens 1]

Runs ``--batch`` greedy requests (a 128-token prompt each) to the decode phase, then profiles
``--steps`` engine steps with ``torch.profiler``, the decoder's layers run module by module
(``fused_layers = False``) so that each op is seen; ``--tokens 5`` makes each step verify four
n-gram drafts per sequence, as speculative decoding does. Printed: the step's wall time with the
fused native layers and with the module loop, and per op its share of the profiled steps
(self CPU time), so the part outside every op (Python, scheduling, sampling) shows too.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.bench.perplexity import default_text
from fastinfer.engine.engine import Engine


def start(engine: Engine, batch: int, prompt: list[int], new: int) -> None:
    """``batch`` requests, stepped until every one has its first token (decoding from then on)."""
    for i in range(batch):
        engine.add_request(prompt[i:i + 128], SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    while any(s.num_computed < len(s.token_ids) - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def step_ms(engine: Engine, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default="gguf",
                    help="EngineConfig.quantization ('none': the dequantized float weights)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per sequence and step (>1: verify drafts)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    spec = None
    if args.tokens > 1:  # drafts always there: the prompt repeats one sentence, the n-gram copies it
        spec = {"method": "ngram", "num_speculative_tokens": args.tokens - 1, "prompt_lookup_min": 2}
    engine = Engine(EngineConfig(quantization=args.quantization, dtype=args.dtype, kv_cache_memory="512MiB", max_model_len=1024,
                                 speculative_config=spec))
    if engine.speculator is not None:
        engine.speculator._worth = lambda *a, **k: True  # profile verify steps, whatever they cost
    text = default_text() if spec is None else " The quick brown fox jumps over the lazy dog." * 60
    prompt = engine.tokenizer.encode(text)[:128 + args.batch]
    new = args.tokens * (3 * args.steps + 8) + 16  # every profiled step decodes
    model = engine.runner.model
    start(engine, args.batch, prompt, new)
    step_ms(engine, 3)
    fused = step_ms(engine, args.steps)
    model.fused_layers = False
    loop = step_ms(engine, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step_ms(engine, args.steps)
        wall = (time.perf_counter() - t) * 1e6
    model.fused_layers = True
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
        calls[e.key] += e.count
    total_ops = sum(self_us.values())
    threads = torch.get_num_threads()
    print(f"{args.batch} x {args.tokens} tokens a step, quantization {args.quantization}, dtype {args.dtype}, "
          f"{threads} threads: step {fused:.2f} ms fused, {loop:.2f} ms module loop, "
          f"{wall / args.steps / 1e3:.2f} ms profiled")
    print(f"{'op':44s} {'calls/step':>10s} {'us/step':>9s} {'share':>6s}")
    for key in sorted(self_us, key=self_us.get, reverse=True)[:args.top]:
        print(f"{key[:44]:44s} {calls[key] / args.steps:10.1f} {self_us[key] / args.steps:9.1f} "
              f"{self_us[key] / wall:6.1%}")
    print(f"{'outside ops (Python, scheduling, sampling)':44s} {'':10s} {(wall - total_ops) / args.steps:9.1f} "
          f"{(wall - total_ops) / wall:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
