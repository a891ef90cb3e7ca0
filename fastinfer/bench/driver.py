"""Runs one benchmark command: builds the workload and the systems, runs each system on the
same workload in this process, and writes the result document and its renderings."""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from fastinfer.bench import llamacpp, report
from fastinfer.bench.cpu_roofline import compute_roofline, gemm_rate
from fastinfer.bench.schema import REFERENCE_SYSTEM, build_result, collect_env, machine_line
from fastinfer.bench.systems import (FastinferSystem, SystemRun, TorchNaiveSystem,
                                     TransformersBatchedSystem, TransformersSystem)
from fastinfer.bench.workload import Workload, dataset_workload, mixed_workload, prefix_workload
from fastinfer.engine.config import QUANT_FIELDS, EngineConfig
from fastinfer.engine.engine import Engine


def build_workload(args: argparse.Namespace, tokenizer, max_model_len: int | None = None) -> Workload:
    """The workload of ``args.bench_command`` from the command-line options."""
    if args.bench_command == "latency":
        return mixed_workload(tokenizer, args.batch_size, args.input_len, args.output_len, args.seed, "latency")
    if args.bench_command == "prefix":
        return prefix_workload(tokenizer, args.num_prompts, args.prefix_len, args.input_len, args.output_len,
                               args.seed)
    if getattr(args, "dataset", None):
        from fastinfer.bench.dataset import load_dataset

        entries = load_dataset(args.dataset, tokenizer)
        return dataset_workload(tokenizer, entries, args.output_len, args.seed, args.num_prompts,
                                max_model_len=max_model_len)
    return mixed_workload(tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed)


NO_PREFIX_CACHE = "fastinfer-no-prefix-cache"
"""``bench prefix``: the same fastinfer engine with its prefix cache turned off for its runs."""
PREFIX_TARGETS = {"ttft_p50_ratio": 4.0, "throughput_ratio": 2.0}
"""The prefix cache's targets on ``bench prefix``'s default workload (issue 22): TTFT p50 at
least 4x lower and output throughput at least 2x higher than with the cache off."""


def build_systems(args: argparse.Namespace, engine: Engine, workload: Workload | None = None) -> list:
    """fastinfer first (for ``prefix``, then the same engine with the prefix cache off, unless
    ``--no-prefix-cache-baseline``), then the requested baselines (sharing one transformers
    model). The optional llama.cpp baseline is skipped, with a message, where it cannot run."""
    systems: list = [FastinferSystem(engine)]
    if args.bench_command == "prefix" and not getattr(args, "no_prefix_cache_baseline", False):
        # the same engine (one KV cache in memory, on a GPU too) with its prefix cache turned off
        systems.append(FastinferSystem(engine, NO_PREFIX_CACHE, prefix_caching=False))
    wanted = [b for b in args.baseline if b != "none"]
    hf = None
    if any(b.startswith("transformers") for b in wanted):
        from fastinfer.bench.baselines import load_transformers_model

        hf = load_transformers_model(engine.loaded.path, engine.dtype).to(engine.device)
    pad = engine.tokenizer.eos_token_id or 0
    for b in wanted:
        if b == "transformers":
            systems.append(TransformersSystem(hf, engine.device))
        elif b == "transformers-batched":
            systems.append(TransformersBatchedSystem(hf, engine.device, args.batch_size, pad))
        elif b == "torch-naive":
            systems.append(TorchNaiveSystem(engine.loaded.model, engine.device, engine.dtype))
        elif b == "llama.cpp":
            reason = llamacpp.unavailable_reason(engine.loaded.path)
            if reason is not None:
                print(f"llama.cpp baseline skipped: {reason}", file=sys.stderr)
                continue
            lens = [len(p) + n for p, n in zip(workload.prompts, workload.output_lens)] if workload else [2048]
            parallel = min(args.max_num_seqs, len(lens))
            systems.append(llamacpp.LlamaCppServerSystem(engine.loaded.path, torch.get_num_threads(), parallel,
                                                         max(lens) + 16))
    return systems


def run_systems(systems: list, workload: Workload, iters: int) -> dict[str, list[SystemRun]]:
    """Warms each system up on one short request, then runs it ``iters`` times."""
    runs: dict[str, list[SystemRun]] = {}
    total = len(workload.prompts) * iters
    for system in systems:
        system.run(workload.prompts[:1], [2])  # warm-up: first-call costs stay out of the figures
        with tqdm(total=total, desc=system.name, unit="req", leave=False) as bar:
            runs[system.name] = [system.run(workload.prompts, workload.output_lens, bar.update)
                                 for _ in range(iters)]
    return runs


def run_benchmark(args: argparse.Namespace, command_line: str | None = None) -> dict:
    """Runs the benchmark of ``args``, prints the table, writes --json/--markdown/--plot."""
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                          kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                          seed=args.seed, enable_prefix_caching=args.bench_command == "prefix",
                          **{f: getattr(args, f) for f in QUANT_FIELDS})
    engine = Engine(config)
    workload = build_workload(args, engine.tokenizer, engine.max_model_len)
    systems = build_systems(args, engine, workload)
    try:
        runs = run_systems(systems, workload, getattr(args, "num_iters", 1))
    finally:
        for system in systems:
            if hasattr(system, "close"):
                system.close()
    results = {name: report.summarize(r) for name, r in runs.items()}
    w = {"name": workload.name, "num_prompts": len(workload.prompts), "seed": workload.seed,
         "input_lens": workload.input_lens, "output_lens": workload.output_lens}
    doc = build_result(args.bench_command, args.model, str(engine.dtype).removeprefix("torch."), str(engine.device),
                       w, results, collect_env(torch.get_num_threads()))
    # fastinfer's quantization settings and the memory they give (extra keys: schema_version 1 allows them)
    doc["quantization"] = {f: getattr(config, f) for f in QUANT_FIELDS}
    doc["weight_bytes"], doc["kv_bytes_per_token"] = engine.weight_bytes, engine.kv_bytes_per_token
    _kv_cache_figures(doc, runs)
    if engine.device.type == "cpu":
        _roofline(doc, engine, workload)
    if any(s.name == "llama.cpp" for s in systems):  # its single-stream figures on the same file
        try:
            doc["llama_cpp_bench"] = llamacpp.llama_bench(engine.loaded.path, torch.get_num_threads())
        except (RuntimeError, OSError, ValueError) as exc:  # keep the runs: report what failed
            doc["llama_cpp_bench"] = {"error": str(exc)}
    print(machine_line(doc["env"]))
    print(report.to_text(doc))
    if "prefix_cache" in doc:
        print(prefix_cache_line(doc["prefix_cache"]))
    if command_line:
        print(f"\nreproduce: {command_line}")
    _write_outputs(doc, runs, args, command_line)
    return doc


def _roofline(doc: dict, engine: Engine, workload) -> None:
    """The in-run compute roofline (``roofline``): the workload's FLOPs at the bf16 GEMM rate
    measured now (F.linear at M = 256 on the model's MLP shape), and each system's
    ``roofline_fraction`` of it (issue 25)."""
    cfg = engine.loaded.config
    rate = gemm_rate(256, cfg.hidden_size, cfg.intermediate_size, torch.bfloat16)
    roof = compute_roofline(cfg, workload.input_lens, workload.output_lens, rate)
    doc["roofline"] = roof
    for result in doc["results"].values():
        result["roofline_fraction"] = result["output_throughput_tok_s"] / roof["output_tok_s"]
    print(f"compute roofline: {roof['workload_flops']['total'] / 1e12:.2f} TFLOP at {rate['GFLOPs']} GFLOP/s "
          f"(bf16 F.linear {'x'.join(map(str, rate['shape']))}) = {roof['output_tok_s']:.0f} output tok/s")


def _kv_cache_figures(doc: dict, runs: dict[str, list[SystemRun]]) -> None:
    """Adds each fastinfer system's KV-cache counters over its timed runs (``kv_cache``) and,
    when the prefix cache ran on and off, the cache's gains (``prefix_cache``)."""
    counted = {name: [r.counters for r in rs] for name, rs in runs.items() if rs and rs[0].counters is not None}
    doc["kv_cache"] = {name: {k: sum(c[k] for c in cs) for k in cs[0]} for name, cs in counted.items()}
    on, off = doc["results"].get(REFERENCE_SYSTEM), doc["results"].get(NO_PREFIX_CACHE)
    if on is None or off is None:
        return
    ttft_on, ttft_off = on["ttft_ms"]["p50"], off["ttft_ms"]["p50"]
    gains = {"ttft_p50_ms_on": ttft_on, "ttft_p50_ms_off": ttft_off,
             "ttft_p50_ratio": ttft_off / ttft_on if ttft_on else None,
             "throughput_tok_s_on": on["output_throughput_tok_s"], "throughput_tok_s_off": off["output_throughput_tok_s"],
             "throughput_ratio": doc["ratios"].get(NO_PREFIX_CACHE), "targets": dict(PREFIX_TARGETS)}
    gains["met"] = {k: gains[k] is not None and gains[k] >= v for k, v in PREFIX_TARGETS.items()}
    doc["prefix_cache"] = gains


def prefix_cache_line(gains: dict) -> str:
    """One line: the prefix cache's TTFT p50 and throughput gains against their targets."""
    def part(label: str, key: str) -> str:
        value = gains[key]
        mark = "met" if gains["met"][key] else "NOT met"
        return f"{label} {'-' if value is None else f'{value:.2f}x'} (target >= {gains['targets'][key]:g}x: {mark})"
    return (f"prefix cache on vs off: {part('TTFT p50 lower by', 'ttft_p50_ratio')}, "
            f"{part('output throughput higher by', 'throughput_ratio')}")


def _write_outputs(doc: dict, runs, args: argparse.Namespace, command_line: str | None) -> None:
    if args.json:
        report.dump_json(doc, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.to_markdown(doc, command_line))
            if "prefix_cache" in doc:
                f.write(f"\n{prefix_cache_line(doc['prefix_cache'])}\n")
    if args.plot:
        report.plot(doc, runs, args.plot)
