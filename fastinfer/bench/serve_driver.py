"""Runs ``fastinfer bench serve``: a request-rate sweep of the same workload against the OpenAI
server (a ``fastinfer serve`` child process), the in-process ``AsyncEngine`` (the server's
overhead baseline, same engine options) and ``llama-server`` on the same GGUF file.

At each rate every system gets a warm-up request, then the workload with the same Poisson send
times; the systems take turns, in reverse order at every other rate, so that drift of the
machine does not favour one. The result document is schema 1 with one ``results`` entry per
``SYSTEM@RATE`` (so ``bench compare`` reads it) and the sweep's settings and ratios under
``serve``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

import torch

from fastinfer.bench import llamacpp, report
from fastinfer.bench.process import ServerProcess
from fastinfer.bench.schema import build_result, collect_env
from fastinfer.bench.serving import (LoadRun, Slo, pair_ratios, poisson_arrivals, rate_label, run_load,
                                     summarize_load, timed_request)
from fastinfer.bench.serving_targets import SERVED_NAME, CompletionsTarget, EngineTarget, fastinfer_server
from fastinfer.bench.workload import Workload, mixed_workload, shared_prefix_workload
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine

SERVER, ENGINE, LLAMA = "fastinfer-server", "fastinfer-engine", "llama-server"
R1, R2_PREFIX, R2_RANDOM = "replicas-1", "replicas-2-prefix", "replicas-2-random"
# fastinfer serve --replicas N on Ray Serve: (replicas, routing). Each replica computes with its
# share of this process's threads, so every system uses the same cores.
REPLICA_SYSTEMS = {R1: (1, "prefix"), R2_PREFIX: (2, "prefix"), R2_RANDOM: (2, "random")}
SYSTEMS = (SERVER, ENGINE, LLAMA, *REPLICA_SYSTEMS)  # also cli/bench.py's SERVE_SYSTEMS + REPLICA_SYSTEMS
RATIO_PAIRS = ((SERVER, ENGINE), (SERVER, LLAMA), (R2_PREFIX, R2_RANDOM), (R2_PREFIX, R1))
WARMUP_TOKENS = 2


def run_serve_benchmark(args: argparse.Namespace, command_line: str | None = None) -> dict:
    """Runs the sweep of ``args``, prints the tables, writes --json/--markdown; returns the doc."""
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                 kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                                 seed=args.seed))
    workloads = [_workload(args, engine, i) for i in range(len(args.request_rates))]
    workload = workloads[0]
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    servers, skipped = start_servers(args, engine, workload)
    try:
        entries = asyncio.run(_sweep(args, engine, servers, workloads, slo))
    finally:
        for server in servers.values():
            server.close()
    doc = build_serve_result(args, engine, workload, entries, skipped)
    print("\n" + to_text(doc))
    report.emit(doc, args, command_line, to_markdown)
    return doc


def _workload(args: argparse.Namespace, engine: Engine, index: int) -> Workload:
    """The workload of the ``index``-th rate: the same mixed one at every rate, or shared
    prefixes that no earlier rate used (so that no replica starts a rate with them cached)."""
    if getattr(args, "shared_prefixes", None):
        return shared_prefix_workload(engine.tokenizer, args.num_prompts, args.shared_prefixes, args.prefix_len,
                                      args.input_len, args.output_len, args.seed + index)
    return mixed_workload(engine.tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed, "serve")


def start_servers(args: argparse.Namespace, engine: Engine,
                  workload: Workload) -> tuple[dict[str, ServerProcess], dict[str, str]]:
    """The HTTP servers among ``args.systems``, started and ready; and the systems skipped here,
    with why (llama-server without its binary or a GGUF file)."""
    servers: dict[str, ServerProcess] = {}
    skipped: dict[str, str] = {}
    threads = torch.get_num_threads()
    try:
        options = dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                       max_num_seqs=args.max_num_seqs, seed=args.seed)
        if SERVER in args.systems:
            servers[SERVER] = fastinfer_server(args.model, options, threads)
        for name, (n, routing) in REPLICA_SYSTEMS.items():
            if name in args.systems:
                servers[name] = fastinfer_server(args.model, options | dict(
                    replicas=n, routing=routing, replica_cpus=0, replica_threads=max(1, threads // n)), threads)
        if LLAMA in args.systems:
            reason = llamacpp.unavailable_reason(engine.loaded.path)
            if reason is None:
                servers[LLAMA] = _llama_server(engine.loaded.path, threads, args.max_num_seqs, workload)
            else:
                skipped[LLAMA] = reason
                print(f"llama-server skipped: {reason}", file=sys.stderr)
    except BaseException:
        for server in servers.values():
            server.close()
        raise
    return servers, skipped


def _llama_server(path: str, threads: int, max_num_seqs: int, workload: Workload) -> ServerProcess:
    """``llama-server`` with one slot per concurrent sequence (``-np``), each long enough for
    the longest request."""
    longest = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))
    system = llamacpp.LlamaCppServerSystem(path, threads, _llama_parallel(max_num_seqs, workload), longest + 16)
    system.start()
    server, system.server = system.server, None  # the process is ours now; the system is done
    return server


def _llama_parallel(max_num_seqs: int, workload: Workload) -> int:
    return min(max_num_seqs, len(workload.prompts))


def _targets(args: argparse.Namespace, engine: Engine, servers: dict[str, ServerProcess]) -> list:
    """The targets in ``SYSTEMS`` order (call inside the event loop that will use them)."""
    targets = []
    for name in SYSTEMS:
        if name not in args.systems:
            continue
        if name == ENGINE:
            targets.append(EngineTarget(AsyncEngine.from_engine(engine)))
        elif name in servers:
            extra = {"cache_prompt": False} if name == LLAMA else None  # no reuse of a prompt's KV across runs
            targets.append(CompletionsTarget(name, servers[name].base_url, SERVED_NAME, extra))
    return targets


async def _sweep(args: argparse.Namespace, engine: Engine, servers: dict[str, ServerProcess],
                 workloads: list[Workload], slo: Slo) -> list[dict]:
    """Every (rate, system) run's result entry, in the order they ran (``workloads``: one per rate)."""
    targets = _targets(args, engine, servers)
    entries = []
    try:
        for i, (rate, workload) in enumerate(zip(args.request_rates, workloads)):
            offsets = poisson_arrivals(len(workload.prompts), rate, args.seed)
            for target in targets if i % 2 == 0 else targets[::-1]:
                server = servers.get(target.name)
                run, extra = await _run_one(target, workload, offsets, rate, server)
                entries.append(summarize_load(run, slo, server.peak_rss_mb() if server else None) | extra)
                print(_progress(entries[-1]), file=sys.stderr, flush=True)
    finally:
        for target in targets:
            await target.aclose()
    return entries


async def _run_one(target, workload: Workload, offsets: list[float], rate: float,
                   server: ServerProcess | None) -> tuple[LoadRun, dict]:
    """The run after a warm-up request, and what the server reported of it: the share of
    prompt tokens it read from its prefix cache, and for replicas the router's hit rate."""
    warm = await timed_request(target, workload.prompts[0], WARMUP_TOKENS)
    if not warm.ok:
        raise RuntimeError(f"{target.name}: the warm-up request failed: {warm.error}")
    usage = (getattr(target, "prompt_tokens", None), getattr(target, "cached_tokens", None))
    routed = _router_counts(server) if target.name in REPLICA_SYSTEMS else None
    run = await run_load(target, workload.prompts, workload.output_lens, offsets, rate)
    extra = {}
    if usage[0] is not None and target.prompt_tokens > usage[0]:
        extra["cached_prompt_share"] = (target.cached_tokens - usage[1]) / (target.prompt_tokens - usage[0])
    if routed is not None:
        extra["router_prefix_hit_rate"] = _hit_rate(routed, _router_counts(server))
    return run, extra


def _router_counts(server: ServerProcess) -> tuple[float, float]:
    """(requests routed, those sent to a replica holding part of their prompt) so far, from
    the server's ``/metrics``."""
    import httpx

    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    routed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("fastinfer:router_requests_total{"))
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fastinfer:router_prefix_hits_total{"))
    return routed, hits


def _hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    routed = after[0] - before[0]
    return (after[1] - before[1]) / routed if routed else None


def _progress(e: dict) -> str:
    rate = e["request_rate_req_s"]
    return (f"{e['system']} @ {'inf' if rate is None else f'{rate:g}'} req/s: {e['completed']}/{e['num_requests']} ok, "
            f"{e['output_throughput_tok_s']:.1f} out tok/s, TTFT p50 {report.fmt(e['ttft_ms']['p50'])} ms, "
            f"TPOT p50 {report.fmt(e['tpot_ms']['p50'])} ms")


def build_serve_result(args: argparse.Namespace, engine: Engine, workload: Workload, entries: list[dict],
                       skipped: dict[str, str]) -> dict:
    """The schema-1 document: ``results["SYSTEM@RATE"]`` and the sweep under ``serve``."""
    results = {f"{e['system']}@{_label(e)}": e for e in entries}
    w = {"name": workload.name, "num_prompts": len(workload.prompts), "seed": workload.seed,
         "input_lens": workload.input_lens, "output_lens": workload.output_lens}
    env = collect_env(torch.get_num_threads())
    env["logical_cpus"] = os.cpu_count()
    doc = build_result("serve", args.model, str(engine.dtype).removeprefix("torch."), str(engine.device), w,
                       results, env)
    labels = [rate_label(r) for r in args.request_rates]
    doc["serve"] = {
        "systems": [s for s in SYSTEMS if s in args.systems and s not in skipped],
        "skipped": skipped,
        "request_rates": labels,
        "arrivals": f"poisson, seed {args.seed} (inf: all at once)",
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "goodput": f"completed requests/s with TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms",
        "engine_options": {"max_num_seqs": args.max_num_seqs, "kv_cache_memory": args.kv_cache_memory},
        "shared_prefixes": (None if not getattr(args, "shared_prefixes", None) else
                            {"groups": args.shared_prefixes, "prefix_len": args.prefix_len,
                             "note": "new prefixes at every rate (workload seed + rate index)"}),
        "server": "fastinfer serve in a child process, client in this one (httpx, one connection a request)",
        "ratios": {label: _ratios(results, label) for label in labels},
    }
    if LLAMA in doc["serve"]["systems"]:
        doc["serve"]["llama_server"] = {"parallel": _llama_parallel(args.max_num_seqs, workload),
                                        "threads": env["threads"]}
    return doc


def _label(entry: dict) -> str:
    rate = entry["request_rate_req_s"]
    return rate_label(float("inf") if rate is None else rate)


def _ratios(results: dict, label: str) -> dict:
    out = {}
    for num, den in RATIO_PAIRS:
        a, b = results.get(f"{num}@{label}"), results.get(f"{den}@{label}")
        if a is not None and b is not None:
            out[f"{num}/{den}"] = pair_ratios(a, b)
    return out


_COLUMNS = (("req/s", "request_throughput_req_s"), ("goodput req/s", "goodput_req_s"),
            ("out tok/s", "output_throughput_tok_s"),
            *((f"{name} {q} ms", (key, q)) for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
              for q in ("p50", "p90", "p99")),
            ("ITL p50 ms", ("itl_ms", "p50")), ("E2E p50 ms", ("e2e_ms", "p50")), ("E2E p99 ms", ("e2e_ms", "p99")))


def metric_rows(doc: dict) -> list[list[str]]:
    """Header plus one row per (rate, system), rates in sweep order, systems in ``SYSTEMS`` order."""
    routed = any("router_prefix_hit_rate" in e for e in doc["results"].values())
    extra = ["prompt tokens cached", "router: to the prefix's replica"] if routed else []
    rows = [["rate req/s", "system", "ok", *(name for name, _ in _COLUMNS), *extra]]
    for label in doc["serve"]["request_rates"]:
        for system in doc["serve"]["systems"]:
            e = doc["results"].get(f"{system}@{label}")
            if e is None:
                continue
            cells = [report.fmt(e[k[0]][k[1]] if isinstance(k, tuple) else e[k]) for _, k in _COLUMNS]
            if routed:
                cells += ["-" if e.get(k) is None else f"{e[k]:.0%}" for k in ("cached_prompt_share",
                                                                             "router_prefix_hit_rate")]
            rows.append([label, system, f"{e['completed']}/{e['num_requests']}", *cells])
    return rows


def ratio_rows(doc: dict) -> list[list[str]]:
    """Header plus one row per (rate, pair) of systems: throughput and p50 latency ratios."""
    rows = [["rate req/s", "ratio", "out tok/s", "req/s", "TTFT p50", "TPOT p50"]]
    for label, pairs in doc["serve"]["ratios"].items():
        for pair, r in pairs.items():
            rows.append([label, pair, *("-" if r[k] is None else f"{r[k]:.2f}x"
                                        for k in ("output_throughput", "request_throughput", "ttft_p50", "tpot_p50"))])
    return rows


def _header(doc: dict) -> str:
    w, env, s = doc["workload"], doc["env"], doc["serve"]
    ins, outs = w["input_lens"], w["output_lens"]
    lens = f"input {min(ins)}-{max(ins)}, output {min(outs)}-{max(outs)}"
    if s.get("shared_prefixes"):
        lens += f"; {s['shared_prefixes']['groups']} shared prefixes of {s['shared_prefixes']['prefix_len']}"
    skipped = "".join(f"; {k} skipped: {v}" for k, v in s["skipped"].items())
    return (f"serve — model {doc['model']}, {doc['dtype']}, {doc['device']}; {w['num_prompts']} requests ({lens} "
            f"tokens, seed {w['seed']}), {s['arrivals']}; {env['cpu']}, {env['threads']} threads of "
            f"{env['logical_cpus']} logical CPUs; goodput = {s['goodput']}{skipped}")


RATIO_NOTE = "ratios A/B: throughput above 1x and latency below 1x favour A"


def to_text(doc: dict) -> str:
    """The header, the metrics table and the ratios table, for the terminal."""
    parts = [_header(doc), "", report.text_table(metric_rows(doc))]
    if len(ratio_rows(doc)) > 1:
        parts += ["", RATIO_NOTE, report.text_table(ratio_rows(doc))]
    return "\n".join(parts)


def to_markdown(doc: dict, command_line: str | None = None) -> str:
    """The same in Markdown, with the command that reproduces it."""
    lines = [_header(doc), ""]
    if command_line:
        lines += [f"`{command_line}`", ""]
    lines += report.markdown_table(metric_rows(doc))
    if len(ratio_rows(doc)) > 1:
        lines += ["", RATIO_NOTE + ":", "", *report.markdown_table(ratio_rows(doc))]
    return "\n".join(lines) + "\n"
