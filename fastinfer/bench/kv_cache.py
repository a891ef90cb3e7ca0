"""``fastinfer bench kv-cache``: the KV-cache management of issue 22, each workload run with the
cache on and off (or the host tier on and off) in the same process, side by side, so that the
ratios hold on a noisy machine.

- ``multiturn``: conversations of several turns, each turn resending the whole history (earlier
  prompts and the model's own outputs, as token ids) plus a new user message; the turns of all
  conversations run together. TTFT per turn index, cache on and off.
- ``offload``: a long prefix evicted from a small device pool by unrelated requests, then hit
  again: its TTFT with a host tier (blocks loaded back) and without one (recomputed).
- ``mixed``: one long prompt arrives among decoding requests: the decoders' time per output
  token (inter-token gaps) and the long prompt's TTFT.
- ``sched``: one scheduling step without a model (the scheduler and the block manager), at
  several numbers of running sequences.

The result document (``schema_version`` 1, ``command`` ``"kv-cache"``; not the throughput
schema of ``bench compare``): ``{"schema_version", "command", "model", "dtype", "device", "cpu",
"env", "workloads": {"<workload>": {"config", "systems": {...}, "targets", "met", ...}}}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from fastinfer.bench import report
from fastinfer.bench.schema import collect_env, machine_line, percentiles
from fastinfer.bench.systems import KV_COUNTERS, RequestRecord, SystemRun, timed_run
from fastinfer.bench.workload import mixed_workload
from fastinfer.engine.config import QUANT_FIELDS, EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.kv_cache.block_manager import BlockManager
from fastinfer.kv_cache.cache import bytes_per_block
from fastinfer.model.loader import LoadedModel, load_model
from fastinfer.sampling.params import SamplingParams
from fastinfer.scheduler.scheduler import Scheduler
from fastinfer.scheduler.sequence import Sequence

WORKLOADS = ("multiturn", "offload", "mixed", "sched")  # cli/bench.py's KV_WORKLOADS
ON, OFF = "prefix-cache", "no-prefix-cache"
HOST, RECOMPUTE = "host-tier", "recompute"
TARGETS = {
    "multiturn": {"last_over_first_ttft_p50_max": 1.5},
    "offload": {"reload_speedup_min": 3.0},
    "sched": {"p50_ms_max": {256: 1.0, 1024: 3.0}},
}
"""Issue 22's targets (on the default sizes); each workload reports whether it met them."""


def run_kv_cache_bench(args: argparse.Namespace, command_line: str | None = None) -> int:
    """Runs the workloads of ``args`` (the options of ``fastinfer bench kv-cache``, every size
    set), prints their tables, writes --json/--markdown; returns 0."""
    wanted = WORKLOADS if args.workload == "all" else (args.workload,)
    env = collect_env(torch.get_num_threads())
    base = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
                        **{f: getattr(args, f) for f in QUANT_FIELDS})
    loaded = None
    if any(w != "sched" for w in wanted):
        loaded = load_model(base.model, base.torch_dtype(), base.torch_device(), base.quantization,
                            base.quant_group_size, base.quant_method)
    doc = {"schema_version": 1, "command": "kv-cache", "model": args.model,
           "dtype": str(base.torch_dtype()).removeprefix("torch."), "device": str(base.torch_device()),
           "cpu": env["cpu"], "env": env, "workloads": {}}
    print(f"fastinfer bench kv-cache: {doc['model']}, {doc['dtype']}, {doc['device']}; "
          f"CPU {machine_line(env)}")
    runners = {"multiturn": run_multiturn, "offload": run_offload, "mixed": run_mixed}
    for name in wanted:
        if name == "sched":
            result = run_sched(args)
        else:
            result = runners[name](_Bench(args, base, loaded))
        doc["workloads"][name] = result
        print("\n" + to_text(name, result))
    report.emit(doc, args, command_line, to_markdown)
    return 0


# --------------------------------------------------------------------------- engines
class _Bench:
    """What the engine workloads share: the options, the base config and the loaded model."""

    def __init__(self, args: argparse.Namespace, base: EngineConfig, loaded: LoadedModel) -> None:
        self.args, self.base, self.loaded = args, base, loaded
        cfg = loaded.config
        self.token_bytes = bytes_per_block(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, base.kv_torch_dtype())

    def engine(self, tokens: int, caching: bool = True, **options) -> Engine:
        """An engine on the shared weights whose device pool holds ``tokens`` tokens, warmed up
        on one short request, its prefix cache then emptied."""
        bs = self.base.block_size
        config = dataclasses.replace(self.base, model=self.loaded.path, enable_prefix_caching=caching,
                                     kv_cache_memory=-(-tokens // bs) * bs * self.token_bytes, **options)
        engine = Engine(config, self.loaded)
        serve(engine, [[self.loaded.tokenizer.eos_token_id or 0] * 8], [2])
        engine.reset_prefix_cache()
        return engine

    def prompts(self, count: int, length: int, tag: int = 0) -> list[list[int]]:
        """``count`` distinct prompts of ``length`` tokens from the English corpus."""
        w = mixed_workload(self.loaded.tokenizer, count, (length, length), (1, 1), self.args.seed * 7919 + tag)
        return w.prompts


def serve(engine: Engine, prompts: list[list[int]], output_lens: list[int],
          finals: list | None = None) -> SystemRun:
    """Serves the requests, all arriving now, greedy and exactly ``output_lens`` tokens each
    (:func:`timed_run`); their final outputs, in order, are appended to ``finals``."""
    def run(ps, ns, arrival):
        ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
               for p, n in zip(ps, ns)]
        done = engine.drain(ids)
        outs = [done[rid] for rid in ids]
        if finals is not None:
            finals.extend(outs)
        return [_record(o, arrival) for o in outs]

    return timed_run("fastinfer", engine.device, prompts, output_lens, run, chunk=None)


def _record(out, arrival: float) -> RequestRecord:
    return RequestRecord(arrival, out.metrics.first_token_time, out.metrics.finished_time,
                         len(out.outputs[0].token_ids))


def _delta(engine: Engine, before: dict) -> dict[str, int]:
    after = engine.stats()
    return {k: after[k] - before[k] for k in KV_COUNTERS}


# --------------------------------------------------------------------------- multiturn
def run_multiturn(bench: _Bench) -> dict:
    """Every conversation's turn k together, on both engines in turn (cache on, then off):
    TTFT p50 per turn, prompt tokens sent and read from the cache."""
    a = bench.args
    conv, turns, out_len = a.conversations, a.turns, a.turn_output_len
    messages = bench.prompts(conv * turns, a.message_len, tag=1)
    longest = turns * (a.message_len + out_len)
    engines = {ON: bench.engine(2 * conv * longest + 64, True, max_model_len=longest + 16),
               OFF: bench.engine(2 * conv * longest + 64, False, max_model_len=longest + 16)}
    history = {name: [[] for _ in range(conv)] for name in engines}
    rows = {name: [] for name in engines}
    before = {name: e.stats() for name, e in engines.items()}
    for t in range(turns):
        for name, engine in engines.items():
            prompts = [history[name][c] + messages[c * turns + t] for c in range(conv)]
            finals: list = []
            run = serve(engine, prompts, [out_len] * conv, finals)
            for c, out in enumerate(finals):
                history[name][c] = prompts[c] + list(out.outputs[0].token_ids)
            rows[name].append({"turn": t + 1, "ttft_ms": percentiles([r.ttft_ms for r in run.records]),
                               "prompt_tokens": sum(len(p) for p in prompts),
                               "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in finals)})
    systems = {}
    for name, engine in engines.items():
        first, last = rows[name][0]["ttft_ms"]["p50"], rows[name][-1]["ttft_ms"]["p50"]
        systems[name] = {"turns": rows[name], "last_over_first_ttft_p50": last / first,
                         "counters": _delta(engine, before[name])}
    limit = TARGETS["multiturn"]["last_over_first_ttft_p50_max"]
    return {"config": {"conversations": conv, "turns": turns, "message_len": a.message_len,
                       "output_len": out_len}, "systems": systems, "targets": TARGETS["multiturn"],
            "met": {"last_over_first_ttft_p50_max": systems[ON]["last_over_first_ttft_p50"] <= limit}}


# --------------------------------------------------------------------------- offload
def run_offload(bench: _Bench) -> dict:
    """A prefix request, unrelated requests (of at most 512 tokens, one at a time) that push the
    prefix out of a device pool of about 2.5 prefixes, then the prefix again (a new question
    after it): its TTFT with a host tier (loaded back) and without (recomputed), each
    repetition on both engines in turn."""
    a = bench.args
    plen, qlen = a.offload_prefix_len, a.offload_question_len
    pool = int(2.5 * (plen + qlen))
    fill_len = min(plen + qlen, 512)  # short fills: less attention to compute, the same blocks
    texts = bench.prompts(3 + -(-(pool + (plen + qlen) // 2) // fill_len), plen + qlen, tag=2)
    prefix, questions = texts[0][:plen], [t[plen:] for t in texts[:3]]
    fills = [t[:fill_len] for t in texts[3:]]  # more tokens than the pool holds
    engines = {HOST: bench.engine(pool, True, kv_offload_memory=4 * (pool + 64) * bench.token_bytes,
                                  max_model_len=plen + qlen + 16),
               RECOMPUTE: bench.engine(pool, True, max_model_len=plen + qlen + 16)}
    trials = {name: [] for name in engines}
    for _ in range(a.offload_reps):
        for name, engine in engines.items():
            trials[name].append(_offload_trial(engine, prefix, questions, fills))
    systems = {}
    for name, ts in trials.items():
        systems[name] = {k: [t[k] for t in ts] for k in ts[0]}
        systems[name]["rehit_ttft_ms_p50"] = statistics.median(systems[name]["rehit_ttft_ms"])
        systems[name]["device_blocks"] = engines[name].stats()["kv_blocks_total"]
        systems[name]["host_blocks"] = engines[name].stats()["kv_offload_blocks_total"]
    speedup = systems[RECOMPUTE]["rehit_ttft_ms_p50"] / systems[HOST]["rehit_ttft_ms_p50"]
    return {"config": {"prefix_len": plen, "question_len": qlen, "device_pool_tokens": pool,
                       "fill_requests": len(fills), "fill_len": fill_len, "reps": a.offload_reps},
            "systems": systems, "reload_speedup": speedup, "targets": TARGETS["offload"],
            "met": {"reload_speedup_min": speedup >= TARGETS["offload"]["reload_speedup_min"]}}


def _offload_trial(engine: Engine, prefix: list[int], questions: list[list[int]],
                   fills: list[list[int]]) -> dict:
    """One repetition from an empty cache: the prefix cold, hit on the device at once, pushed
    out by ``fills`` (one at a time), then hit again."""
    engine.reset_prefix_cache()
    cold = serve(engine, [prefix + questions[0]], [1]).records[0].ttft_ms
    device_hit = serve(engine, [prefix + questions[1]], [1]).records[0].ttft_ms
    before = engine.stats()
    for f in fills:
        serve(engine, [f], [1])
    filled = engine.stats()
    finals: list = []
    rehit = serve(engine, [prefix + questions[2]], [1], finals).records[0].ttft_ms
    after = engine.stats()
    return {"cold_ttft_ms": cold, "device_hit_ttft_ms": device_hit, "rehit_ttft_ms": rehit,
            "rehit_cached_tokens": finals[0].num_cached_tokens or 0,
            "stores_during_fill": filled["kv_offload_stores"] - before["kv_offload_stores"],
            "loads_on_rehit": after["kv_offload_loads"] - filled["kv_offload_loads"]}


# --------------------------------------------------------------------------- mixed
def run_mixed(bench: _Bench) -> dict:
    """Decoders already decoding when one long prompt arrives: their inter-token gaps
    (percentiles, the p99 being the steps that also read the long prompt) and its TTFT; the
    cache on, then off."""
    a = bench.args
    n, dlen, out, plen = a.mixed_decoders, a.mixed_decoder_prompt_len, a.mixed_output_len, a.mixed_prompt_len
    texts = bench.prompts(n + 1, max(plen, dlen), tag=3)
    decoders, long_prompt = [t[:dlen] for t in texts[:n]], texts[n][:plen]
    tokens = n * (dlen + out) + plen + 16
    max_len = max(plen, dlen + out) + 32
    systems, budget = {}, None
    for name, caching in ((ON, True), (OFF, False)):
        engine = bench.engine(tokens + tokens // 2, caching, max_model_len=max_len)
        budget = engine.scheduler.max_num_batched_tokens
        systems[name] = _mixed_trial(engine, decoders, long_prompt, out, start_after=min(8, out // 4))
        del engine
    return {"config": {"decoders": n, "decoder_prompt_len": dlen, "decoder_output_len": out,
                       "long_prompt_len": plen, "long_output_len": 8, "max_num_batched_tokens": budget},
            "systems": systems}


def _mixed_trial(engine: Engine, decoders: list[list[int]], long_prompt: list[int], out: int,
                 start_after: int) -> dict:
    """Steps the engine by hand, stamping each decoder's tokens as they come; the long prompt
    is added once every decoder has ``start_after`` tokens."""
    greedy = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
    stamps = {engine.add_request(p, greedy): [] for p in decoders}
    long_id, long_out, added_at, prefill_steps = None, None, 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.monotonic()
        for o in outputs:
            if o.request_id in stamps:
                got = stamps[o.request_id]
                got += [now] * (len(o.outputs[0].token_ids) - len(got))
            elif o.request_id == long_id:
                prefill_steps = prefill_steps or engine.num_steps - added_at  # its first output: its first token
                long_out = o
        if long_id is None and all(len(s) >= start_after for s in stamps.values()):
            long_id = engine.add_request(long_prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
            added_at = engine.num_steps
    if long_out is None or not all(len(s) == out for s in stamps.values()):
        raise RuntimeError("internal error: the mixed workload's requests did not all finish")
    gaps = [(b - a) * 1e3 for s in stamps.values() for a, b in zip(s, s[1:])]
    tpot = [(s[-1] - s[0]) * 1e3 / (len(s) - 1) for s in stamps.values() if len(s) > 1]
    return {"itl_ms": percentiles(gaps), "itl_max_ms": max(gaps), "tpot_ms": percentiles(tpot),
            "long_ttft_ms": long_out.metrics.ttft * 1e3, "long_prefill_steps": prefill_steps,
            "long_cached_tokens": long_out.num_cached_tokens or 0, "decoder_tokens_before_long": start_after}


# --------------------------------------------------------------------------- sched
def run_sched(args: argparse.Namespace) -> dict:
    """:func:`sched_step_times` at each ``--sched-seqs``, prefix caching on and off."""
    systems = {}
    for name, caching in ((ON, True), (OFF, False)):
        systems[name] = {}
        for n in args.sched_seqs:
            times = sched_step_times(n, caching, args.sched_prompt_len, args.sched_steps, args.seed)
            systems[name][str(n)] = {"schedule_ms": percentiles(times["schedule"]),
                                     "step_ms": percentiles(times["step"])}
    limits = TARGETS["sched"]["p50_ms_max"]
    met = {str(n): systems[ON][str(n)]["schedule_ms"]["p50"] < limits[n] for n in args.sched_seqs if n in limits}
    return {"config": {"seqs": args.sched_seqs, "steps": args.sched_steps, "prompt_len": args.sched_prompt_len,
                       "block_size": 16, "max_num_batched_tokens": 2048},
            "systems": systems, "targets": {"p50_ms_max": {str(k): v for k, v in limits.items()}}, "met": met}


def sched_step_times(num_seqs: int, caching: bool, prompt_len: int, steps: int, seed: int = 0,
                     block_size: int = 16, budget: int = 2048) -> dict[str, list[float]]:
    """A ``Scheduler`` over a ``BlockManager`` and no model: ``num_seqs`` sequences with
    ``prompt_len``-token prompts (groups of 8 share their first half) are admitted and
    prefilled, then ``steps`` decode steps are timed: ``schedule`` (ms of ``schedule()``,
    block bookkeeping included) and ``step`` (that plus marking the step computed and
    appending one token to each sequence, what the engine does between two schedules)."""
    rng = random.Random(seed)
    shared = [[rng.randrange(49152) for _ in range(prompt_len // 2)] for _ in range(-(-num_seqs // 8))]
    prefill_steps = num_seqs * prompt_len // max(budget - num_seqs, 1) + 1  # others decode meanwhile
    per_seq = -(-(prompt_len + 2 * prefill_steps + steps + 16) // block_size)
    blocks = BlockManager(num_seqs * per_seq + 64, block_size, enable_caching=caching)
    sched = Scheduler(blocks, max_num_seqs=num_seqs, max_num_batched_tokens=budget)
    for i in range(num_seqs):
        own = [rng.randrange(49152) for _ in range(prompt_len - prompt_len // 2)]
        sched.add(Sequence(i, shared[i // 8] + own, prompt_len, arrival=i))
    for _ in range(num_seqs * prompt_len):  # prefill everyone (a bound, never reached)
        if not sched.waiting and all(seq.output_token_ids for seq in sched.running):
            break
        _advance(sched.schedule(), rng)
    times: dict[str, list[float]] = {"schedule": [], "step": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        _advance(out, rng)
        t2 = time.perf_counter()
        if len(out.scheduled) != num_seqs:
            raise RuntimeError(f"internal error: a decode step scheduled {len(out.scheduled)} of {num_seqs}")
        times["schedule"].append((t1 - t0) * 1e3)
        times["step"].append((t2 - t0) * 1e3)
    return times


def _advance(out, rng: random.Random) -> None:
    """Marks a scheduled step computed and appends a token to each sequence that completed."""
    for s in out.scheduled:
        s.seq.num_computed = s.start + s.num_tokens
        if s.completes:
            s.seq.append(rng.randrange(49152))


# --------------------------------------------------------------------------- tables
def _ok(met: bool) -> str:
    return "met" if met else "NOT met"


def _multiturn_rows(r: dict) -> tuple[list[list[str]], list[str]]:
    on, off = r["systems"][ON], r["systems"][OFF]
    rows = [["turn", "TTFT p50 ms (cache)", "TTFT p50 ms (no cache)", "no cache / cache", "cached / prompt tokens"]]
    for a, b in zip(on["turns"], off["turns"]):
        ta, tb = a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]
        rows.append([str(a["turn"]), report.fmt(ta), report.fmt(tb), f"{tb / ta:.2f}x",
                     f"{a['cached_prompt_tokens']} / {a['prompt_tokens']}"])
    limit = r["targets"]["last_over_first_ttft_p50_max"]
    return rows, [f"last turn / first turn TTFT p50: {on['last_over_first_ttft_p50']:.2f}x with the cache "
                  f"(target <= {limit:g}x: {_ok(r['met']['last_over_first_ttft_p50_max'])}), "
                  f"{off['last_over_first_ttft_p50']:.2f}x without"]


def _offload_rows(r: dict) -> tuple[list[list[str]], list[str]]:
    rows = [["system", "cold TTFT ms", "device-hit TTFT ms", "re-hit TTFT p50 ms", "re-hit cached tokens",
             "stores (fill)", "loads (re-hit)"]]
    for name, s in r["systems"].items():
        rows.append([name, report.fmt(statistics.median(s["cold_ttft_ms"])),
                     report.fmt(statistics.median(s["device_hit_ttft_ms"])), report.fmt(s["rehit_ttft_ms_p50"]),
                     str(s["rehit_cached_tokens"][-1]), str(s["stores_during_fill"][-1]), str(s["loads_on_rehit"][-1])])
    target = r["targets"]["reload_speedup_min"]
    return rows, [f"re-hit after eviction: reload from the host tier {r['reload_speedup']:.2f}x faster than "
                  f"recompute (target >= {target:g}x: {_ok(r['met']['reload_speedup_min'])})"]


def _mixed_rows(r: dict) -> tuple[list[list[str]], list[str]]:
    rows = [["system", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "ITL max ms", "TPOT p99 ms", "long TTFT ms",
             "long prefill steps"]]
    for name, s in r["systems"].items():
        rows.append([name, *(report.fmt(s["itl_ms"][k]) for k in ("p50", "p90", "p99")), report.fmt(s["itl_max_ms"]),
                     report.fmt(s["tpot_ms"]["p99"]), report.fmt(s["long_ttft_ms"]), str(s["long_prefill_steps"])])
    c = r["config"]
    return rows, [f"{c['decoders']} decoders ({c['decoder_prompt_len']}-token prompts, {c['decoder_output_len']} "
                  f"tokens each); one {c['long_prompt_len']}-token prompt arrives once they decode; "
                  f"{c.get('max_num_batched_tokens')} tokens per step at most"]


def _sched_rows(r: dict) -> tuple[list[list[str]], list[str]]:
    rows = [["sequences", "system", "schedule p50 ms", "schedule p99 ms", "step p50 ms", "step p99 ms", "target"]]
    limits = r["targets"]["p50_ms_max"]
    for name, by_n in r["systems"].items():
        for n, s in by_n.items():
            target = f"< {limits[n]:g} ms: {_ok(s['schedule_ms']['p50'] < limits[n])}" if n in limits else "-"
            rows.append([n, name, *(report.fmt(s[k][p]) for k in ("schedule_ms", "step_ms") for p in ("p50", "p99")),
                         target])
    return rows, [f"{r['config']['steps']} decode steps of {r['config']['prompt_len']}-token prompts, no model; "
                  "step = schedule plus marking it computed and appending one token per sequence"]


_ROWS = {"multiturn": _multiturn_rows, "offload": _offload_rows, "mixed": _mixed_rows, "sched": _sched_rows}


def to_text(name: str, result: dict) -> str:
    """One workload's table and summary lines for the terminal."""
    rows, lines = _ROWS[name](result)
    return "\n".join([f"[{name}]", report.text_table(rows), *lines])


def to_markdown(doc: dict, command_line: str | None = None) -> str:
    """Every workload's table in Markdown, under the configuration (and the command)."""
    out = report.markdown_head(doc, command_line)
    for name, result in doc["workloads"].items():
        rows, lines = _ROWS[name](result)
        out += [f"### {name}", "", *report.markdown_table(rows), "", *lines, ""]
    return "\n".join(out)
