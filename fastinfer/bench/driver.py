"""Runs one benchmark command: builds the workload and the systems, runs each system on the
same workload in this process, and writes the result document and its renderings."""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from fastinfer.bench import llamacpp, report
from fastinfer.bench.schema import build_result, collect_env
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


def build_systems(args: argparse.Namespace, engine: Engine, workload: Workload | None = None) -> list:
    """fastinfer first, then the requested baselines (sharing one transformers model). The
    optional llama.cpp baseline is skipped, with a message, where it cannot run."""
    systems: list = [FastinferSystem(engine)]
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
                          seed=args.seed, enable_prefix_caching=getattr(args, "enable_prefix_caching", False),
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
    if any(s.name == "llama.cpp" for s in systems):  # its single-stream figures on the same file
        try:
            doc["llama_cpp_bench"] = llamacpp.llama_bench(engine.loaded.path, torch.get_num_threads())
        except (RuntimeError, OSError, ValueError) as exc:  # keep the runs: report what failed
            doc["llama_cpp_bench"] = {"error": str(exc)}
    print(report.to_text(doc))
    if command_line:
        print(f"\nreproduce: {command_line}")
    _write_outputs(doc, runs, args, command_line)
    return doc


def _write_outputs(doc: dict, runs, args: argparse.Namespace, command_line: str | None) -> None:
    if args.json:
        report.dump_json(doc, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.to_markdown(doc, command_line))
    if args.plot:
        report.plot(doc, runs, args.plot)
