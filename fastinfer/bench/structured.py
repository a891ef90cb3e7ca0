"""``fastinfer bench structured``: what structured outputs cost. JSON-schema requests (the
schemas of ``fastinfer.bench.json_schemas``) against free text of exactly the same lengths, in
the same process, alternating, at batch 1 and 32:

- each constrained pass runs ``batch`` chat requests asking for a schema's JSON (temperature 0.7,
  seeded), every one constrained by its schema, to the grammar's end;
- the free pass right after it runs the same prompts with the same seeds and no constraint, each
  request generating exactly as many tokens as its constrained twin (``ignore_eos``), so both
  passes hold the same batch at every step;
- reported: time per output token (TPOT: a request's time from its first token to its last over
  its tokens after the first; mean over requests, median over repeats) for both, their ratio, and
  the mask overhead per output token (the difference).

Every schema is used once before the timed passes (applications send the same schemas again
and again: their grammars are cached). Also the cold compile time of every schema (past the
cache; the tokenizer built and the engine used once beforehand) and the grammar engine's name and version. The result document
(``schema_version`` 1, ``command`` ``"structured"``): ``{"schema_version", "command", "model",
"dtype", "device", "cpu", "env", "engine", "compile", "batches": {"<batch>": {...}}, "targets"}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from importlib.metadata import version

import torch

from fastinfer.bench import report
from fastinfer.bench.json_schemas import SCHEMAS
from fastinfer.bench.schema import collect_env, machine_line
from fastinfer.engine.config import QUANT_FIELDS, EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.engine.outputs import RequestOutput
from fastinfer.sampling.grammar import StructuredOutputs
from fastinfer.sampling.params import SamplingParams, StructuredOutputsParams

TARGET_TPOT_RATIO = 1.10
"""Issue 23's target: at batch 32, constrained TPOT within 10% of free text's."""
MAX_TOKENS = 256  # a constrained reply that has not ended by then is cut (and its twin matches it)


def run_structured_bench(args: argparse.Namespace, command_line: str | None = None) -> int:
    """Runs the benchmark of ``args`` (``fastinfer bench structured``'s options), prints its table,
    writes --json/--markdown; returns 0."""
    env = collect_env(torch.get_num_threads())
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                          max_num_seqs=max(args.batch), kv_cache_memory=args.kv_cache_memory,
                          **{f: getattr(args, f) for f in QUANT_FIELDS})
    engine = Engine(config)
    doc = {"schema_version": 1, "command": "structured", "model": args.model,
           "dtype": str(config.torch_dtype()).removeprefix("torch."), "device": str(config.torch_device()),
           "cpu": env["cpu"], "env": env, "engine": f"llguidance {version('llguidance')}",
           "compile": compile_times(engine), "batches": {}, "targets": {"tpot_ratio_max_at_32": TARGET_TPOT_RATIO}}
    print(f"fastinfer bench structured: {doc['model']}, {doc['dtype']}, {doc['device']}; CPU {machine_line(env)}; "
          f"{doc['engine']}")
    _warm_up(engine)
    for batch in args.batch:
        doc["batches"][str(batch)] = run_batch(engine, batch, args.repeats, args.seed)
    print("\n" + to_text(doc))
    report.emit(doc, args, command_line, to_markdown)
    return 0


def compile_times(engine: Engine) -> dict:
    """Cold compile time of every schema: a fresh compiler each (no cache), its tokenizer set
    up first (that one-time cost is reported apart)."""
    start = time.perf_counter()
    StructuredOutputs(engine.tokenizer, engine.loaded.config.vocab_size, engine.eos_token_ids, 60.0).setup()
    setup = time.perf_counter() - start
    engine.structured.compile_now(StructuredOutputsParams(json={"type": "object"}))  # llguidance's first use
    times = {}
    for named in SCHEMAS:
        begin = time.perf_counter()
        engine.structured.compile_now(StructuredOutputsParams(json=named.schema))
        times[named.name] = time.perf_counter() - begin
    values = list(times.values())
    return {"tokenizer_setup_s": setup, "schemas": len(values), "total_s": sum(values),
            "p50_ms": statistics.median(values) * 1e3, "max_ms": max(values) * 1e3, "per_schema_s": times}


def run_batch(engine: Engine, batch: int, repeats: int, seed: int) -> dict:
    """``repeats`` alternating pairs (constrained, then free text of the same lengths) of
    ``batch`` requests; the median of each side's mean TPOT."""
    constrained, free, tokens = [], [], 0
    for r in range(repeats):
        picks = [SCHEMAS[(r * batch + i) % len(SCHEMAS)] for i in range(batch)]
        prompts = [engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Give me a {p.name.replace('_', ' ')} as JSON."}]) for p in picks]
        seeds = [seed * 10007 + r * batch + i for i in range(batch)]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=s,
                                 structured_outputs={"json": p.schema}) for p, s in zip(picks, seeds)]
        outs = _serve(engine, prompts, params)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        twins = [dataclasses.replace(p, structured_outputs=None, max_tokens=n, ignore_eos=True)
                 for p, n in zip(params, lengths)]
        free_outs = _serve(engine, prompts, twins)
        constrained.append(_mean_tpot(outs))
        free.append(_mean_tpot(free_outs))
        tokens += sum(lengths)
    c, f = statistics.median(constrained), statistics.median(free)
    return {"requests": batch, "repeats": repeats, "output_tokens": tokens, "tpot_ms_constrained": c * 1e3,
            "tpot_ms_free": f * 1e3, "tpot_ratio": c / f, "mask_overhead_ms_per_token": (c - f) * 1e3,
            "runs_ms": {"constrained": [x * 1e3 for x in constrained], "free": [x * 1e3 for x in free]}}


def _serve(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = engine.drain(ids)
    return [done[i] for i in ids]


def _mean_tpot(outs: list[RequestOutput]) -> float:
    """Mean over requests of (last token time - first token time) / (tokens - 1)."""
    tpots = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
             for o in outs if len(o.outputs[0].token_ids) > 1]
    return statistics.mean(tpots)


def _warm_up(engine: Engine) -> None:
    """One constrained request per schema: what is measured is the steady state of an
    application that sends its schemas again and again (compiled grammars and their lexers are
    cached), not the first use of each."""
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    _serve(engine, [prompt] * len(SCHEMAS), [SamplingParams(max_tokens=MAX_TOKENS, structured_outputs={"json": p.schema})
                                             for p in SCHEMAS])


def _rows(doc: dict) -> list[list[str]]:
    rows = [["batch", "TPOT constrained (ms)", "TPOT free (ms)", "ratio", "mask overhead (ms/token)", "target"]]
    for batch, b in doc["batches"].items():
        target = f"<= {TARGET_TPOT_RATIO:.2f}" + (" met" if b["tpot_ratio"] <= TARGET_TPOT_RATIO else " MISSED") \
            if batch == "32" else ""
        rows.append([batch, f"{b['tpot_ms_constrained']:.2f}", f"{b['tpot_ms_free']:.2f}", f"{b['tpot_ratio']:.3f}",
                     f"{b['mask_overhead_ms_per_token']:.3f}", target])
    return rows


def _compile_line(doc: dict) -> str:
    c = doc["compile"]
    return (f"compile: {c['schemas']} schemas in {c['total_s'] * 1e3:.1f} ms (p50 {c['p50_ms']:.2f} ms, max "
            f"{c['max_ms']:.2f} ms), cold; tokenizer set up once in {c['tokenizer_setup_s'] * 1e3:.0f} ms")


def to_text(doc: dict) -> str:
    """The table and the compile line for the terminal."""
    return "\n".join([report.text_table(_rows(doc)), _compile_line(doc)])


def to_markdown(doc: dict, command_line: str | None = None) -> str:
    """The same in Markdown, under the configuration (and the command)."""
    out = report.markdown_head(doc, command_line, extra=doc["engine"])
    return "\n".join(out + report.markdown_table(_rows(doc)) + ["", _compile_line(doc), ""])
