"""xgrammar vs llguidance on this CPU: which grammar engine should structured outputs use?

Both engines constrain decoding the same way: each step they fill a next-token bitmask (one bit
per vocabulary id) that the sampler applies to the logits, then accept the sampled token. This
measures, on the default model's tokenizer (smollm2-135m, vocabulary 49152) and the JSON schemas
of ``fastinfer.bench.json_schemas`` (compact JSON, no flexible whitespace):

- import time and what each import drags in, and the one-time tokenizer setup;
- compile time per schema, cold (a fresh compiler, no cache), median of ``--repeats``, and the
  time to a first mask (compile + matcher + first fill);
- mask time per token at batch 1: each schema's example is tokenized and, token by token, the
  bitmask filled and the token accepted; a last fill must allow only EOS;
- batch 32: 32 requests cycling over the schemas (a finished request is replaced by the next),
  one step = fill all 32 rows, then accept one token each: in a Python loop, and with the
  engine's parallel calls (xgrammar ``BatchGrammarMatcher``, llguidance ``LLExecutor``) at each
  ``--threads`` count;
- whether compiling releases the GIL: the main thread's progress and longest stall while
  another thread compiles the largest schema, and the ``anyOf`` of all of them, next to the
  same figures for a C call that holds the GIL and one that releases it;
- applying a [32, 49152] float32 bitmask on the CPU: each engine's function and plain torch;
- a sanity check that both engines allow the same tokens along every example, with each
  difference put down to a known semantic difference or reported as unexplained;
- which JSON-schema features each engine enforces, ignores or rejects.

Usage: ``.venv/bin/python benchmarks/grammar_engines.py --out /tmp/grammar_engines.json``
(under a minute; llguidance's ``torch.compile``-d apply function takes 1-20 s to compile once,
depending on the inductor cache). Torch runs one thread: its OpenMP threads spin, and on
shared cores that slowed every other figure. Batch runs and warm passes keep the best of
``--repeats`` (load from other processes only ever slows them).

Measured 2026-12-07 on an AMD EPYC (2 vCPUs), xgrammar 0.2.9 against llguidance 1.9.1, 29 schemas
(ranges over 3 runs; the ratios held, absolute figures moved by up to 2x with the machine's load):

==========================================  ======================  ====================
figure                                      xgrammar                llguidance
==========================================  ======================  ====================
import; Python dependencies                 2.3-3.7 s; torch,       0.05 s; none
                                            transformers, triton,
                                            pydantic, tvm-ffi
tokenizer setup (once)                      130-190 ms              230-320 ms
cold compile, all 29 schemas                183-262 ms              15-18 ms
batch 1: mask fill per token, mean / p99    4-10 / 16-26 us         52-70 / 290-370 us
batch 32: one step (parallel API, 1 thread) 133-244 us              863-1443 us
GIL while compiling                         released                released
features                                    ignores maxLength next  enforces them; refuses
                                            to a pattern, allOf,    ``not`` and ``uniqueItems``
                                            ``not``, uniqueItems;   with an error
                                            allows raw control
                                            characters in strings
==========================================  ======================  ====================

The choice: llguidance. Its masks cost 6-8x xgrammar's, but that is about 1 ms of a batch-32
step that takes tens of ms on this CPU, and the fill runs on its own thread beside the forward
pass; it compiles 12-15x faster (under 1 ms a schema, so a new schema costs no visible delay),
has no dependencies, and refuses what it does not enforce instead of ignoring it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import requires, version
from typing import Any

import numpy as np
import torch

from fastinfer.bench.json_schemas import SCHEMAS
from fastinfer.model.gguf_loader import open_gguf, read_metadata
from fastinfer.model.registry import resolve_model_path
from fastinfer.model.tokenizer import Tokenizer

MODEL = "smollm2-135m"
NO_WS_XGR = {"any_whitespace": False, "separators": (",", ":")}
NO_WS_LLG = {"whitespace_flexible": False}


# ----------------------------------------------------------------------------- engines

class XGrammarEngine:
    """xgrammar behind the few calls the benchmark makes."""

    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        start = time.perf_counter()
        self.info = xgr_tokenizer_info(tok)
        self.setup_s = time.perf_counter() - start
        self.vocab_size = self.info.vocab_size
        self.set_threads(1)

    def set_threads(self, threads: int) -> None:
        """Threads of the parallel fill (``auto`` would be half the hardware threads)."""
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict, threads: int = 8) -> Any:
        """Cold: a fresh compiler with its cache off each time."""
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        return compiler.compile_json_schema(schema, **NO_WS_XGR)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int = 0) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def complete(self, matcher: Any) -> bool:
        return matcher.is_completed()

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidanceEngine:
    """llguidance behind the same calls. Its compile is the ``LLMatcher`` constructor (part of
    the lexer is built lazily, on the first masks); a request's matcher is a deep copy."""

    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance
        self.llg = llguidance
        start = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                                eos_token=sorted(tok.eos_token_ids))
        self.setup_s = time.perf_counter() - start
        self.vocab_size = self.tokenizer.vocab_size
        import llguidance.torch as llg_torch
        self.llg_torch = llg_torch
        self.set_threads(1)

    def set_threads(self, threads: int) -> None:
        """Threads of the parallel fill (default: 80% of the CPUs, at most 32)."""
        self.executor = self.llg.LLExecutor(num_threads=threads)

    def compile(self, schema: dict, threads: int = 8) -> Any:
        """Grammar text + ``LLMatcher`` (which drops the GIL); ``threads`` is xgrammar's."""
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=NO_WS_LLG)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int = 0) -> None:
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def complete(self, matcher: Any) -> bool:
        return matcher.is_accepting()

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llg_torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.executor.consume_token_par(list(zip(matchers, tokens)))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llg_torch.apply_token_bitmask_inplace(logits, bitmask)


Engine = XGrammarEngine | LLGuidanceEngine


def xgr_tokenizer_info(tok: Tokenizer) -> Any:
    """``xgrammar.TokenizerInfo`` straight from the ``tokenizers`` backend, without transformers.

    Special tokens get an empty string: xgrammar then lists them as special and never lets them
    match text (given as their text, ``<|endoftext|>`` could appear inside a JSON string)."""
    import xgrammar as xgr
    backend = tok.backend
    vocab = [""] * tok.vocab_size
    for text, i in backend.get_vocab(with_added_tokens=True).items():
        if i < tok.vocab_size:
            vocab[i] = text
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < tok.vocab_size:
            vocab[i] = ""
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eos_token_ids),
                             add_prefix_space=meta["add_prefix_space"])


# ----------------------------------------------------------------------------- helpers

def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def load_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(read_metadata(open_gguf(resolve_model_path(MODEL))))


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"mean_us": float(us.mean()), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max()), "count": len(us)}


def import_cost(module: str) -> dict[str, Any]:
    """Seconds to import ``module`` in a fresh interpreter, and the heavy packages it loads."""
    code = ("import json, sys, time; t = time.perf_counter(); import " + module + "; "
            "d = time.perf_counter() - t; heavy = ['torch', 'transformers', 'triton', 'numpy', "
            "'pydantic']; print(json.dumps([d, [m for m in heavy if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return {"import_s": seconds, "loads": heavy}


# ----------------------------------------------------------------------------- measurements

def compile_times(engine: Engine, repeats: int) -> dict[str, Any]:
    """Cold compile and time to first mask per schema (median of ``repeats``), in ms."""
    compile_ms, first_mask_ms, errors = {}, {}, {}
    bitmask = torch.full((1, (engine.vocab_size + 31) // 32), -1, dtype=torch.int32)
    for ns in SCHEMAS:
        runs, firsts = [], []
        try:
            for _ in range(repeats):
                start = time.perf_counter()
                compiled = engine.compile(ns.schema)
                mid = time.perf_counter()
                engine.fill(engine.matcher(compiled), bitmask)
                runs.append(mid - start)
                firsts.append(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - an unsupported schema is a result
            errors[ns.name] = f"{type(e).__name__}: {e}"[:300]
            continue
        compile_ms[ns.name] = statistics.median(runs) * 1e3
        first_mask_ms[ns.name] = statistics.median(firsts) * 1e3
    return {"compile_ms": compile_ms, "compile_total_ms": sum(compile_ms.values()),
            "first_mask_ms": first_mask_ms, "first_mask_total_ms": sum(first_mask_ms.values()),
            "errors": errors}


def mask_pass(engine: Engine, matcher: Any, ids: list[int], eos: int, fills: list[int],
              accepts: list[int]) -> bool:
    """Fill + accept along ``ids``, then one last fill; True if that fill allows only EOS."""
    vocab = engine.vocab_size
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    for token in ids:
        t0 = time.perf_counter_ns()
        engine.fill(matcher, bitmask)
        t1 = time.perf_counter_ns()
        ok = engine.accept(matcher, token)
        accepts.append(time.perf_counter_ns() - t1)
        fills.append(t1 - t0)
        if not ok:
            raise RuntimeError(f"{engine.name} rejected token {token}")
    t0 = time.perf_counter_ns()
    engine.fill(matcher, bitmask)
    fills.append(time.perf_counter_ns() - t0)
    return list(allowed_ids(bitmask[0], vocab)) == [eos] and engine.complete(matcher)


def batch1(engine: Engine, compiled: dict[str, Any], tokens: dict[str, list[int]],
           eos: int, repeats: int) -> dict[str, Any]:
    """Per-token fill/accept times over every example. Cold: the first pass of a fresh matcher
    (llguidance builds lexer states lazily); warm: the best of ``repeats`` passes after reset()."""
    cold_fill, cold_accept, eos_only, matchers = [], [], [], {}
    for name, ids in tokens.items():
        matchers[name] = engine.matcher(compiled[name])
        if mask_pass(engine, matchers[name], ids, eos, cold_fill, cold_accept):
            eos_only.append(name)
    passes = []
    for _ in range(repeats):
        fills, accepts = [], []
        for name, ids in tokens.items():
            matchers[name].reset()
            mask_pass(engine, matchers[name], ids, eos, fills, accepts)
        passes.append((float(np.mean(fills)), fills, accepts))
    _, warm_fill, warm_accept = min(passes, key=lambda p: p[0])
    return {"fill": summary_us(cold_fill), "accept": summary_us(cold_accept),
            "fill_warm": summary_us(warm_fill), "accept_warm": summary_us(warm_accept),
            "final_mask_is_eos_only": len(eos_only), "schemas": len(tokens)}


def batch_run(engine: Engine, compiled: dict[str, Any], tokens: dict[str, list[int]], eos: int,
              batch: int, steps: int, parallel: bool) -> dict[str, Any]:
    """``batch`` requests cycling over the schemas; per step: fill every row, accept one token
    each (a request's last token is EOS, then the next request takes its slot)."""
    names = list(tokens)
    bitmask = torch.full((batch, (engine.vocab_size + 31) // 32), -1, dtype=torch.int32)
    slots: list[list] = [[None, [], 0] for _ in range(batch)]  # matcher, tokens, position
    next_request, fill_ns, accept_ns = 0, [], []
    for _ in range(steps):
        for slot in slots:
            if slot[2] >= len(slot[1]):
                name = names[next_request % len(names)]
                next_request += 1
                slot[:] = [engine.matcher(compiled[name]), tokens[name] + [eos], 0]
        matchers = [s[0] for s in slots]
        step_tokens = [s[1][s[2]] for s in slots]
        t0 = time.perf_counter_ns()
        if parallel:
            engine.fill_batch(matchers, bitmask)
        else:
            for row, m in enumerate(matchers):
                engine.fill(m, bitmask, row)
        t1 = time.perf_counter_ns()
        ok = engine.accept_batch(matchers, step_tokens) if parallel else \
            [engine.accept(m, t) for m, t in zip(matchers, step_tokens)]
        accept_ns.append(time.perf_counter_ns() - t1)
        fill_ns.append(t1 - t0)
        if not all(ok):
            raise RuntimeError(f"{engine.name}: a token was rejected at batch {batch}")
        for slot in slots:
            slot[2] += 1
    step = np.asarray(fill_ns) + np.asarray(accept_ns)
    return {"fill_step": summary_us(fill_ns), "accept_step": summary_us(accept_ns),
            "step": summary_us(step.tolist()), "per_token_us": float(step.mean() / 1e3 / batch),
            "requests": next_request, "steps": steps, "batch": batch}


def best_batch_run(engine: Engine, compiled: dict[str, Any], tokens: dict[str, list[int]],
                   eos: int, a: argparse.Namespace, parallel: bool) -> dict[str, Any]:
    """The ``batch_run`` with the lowest mean step of ``a.repeats`` (other load only slows)."""
    batch_run(engine, compiled, tokens, eos, a.batch, 20, parallel)  # warm-up
    runs = [batch_run(engine, compiled, tokens, eos, a.batch, a.steps, parallel)
            for _ in range(a.repeats)]
    return min(runs, key=lambda r: r["step"]["mean_us"])


def gil_progress(body: Callable[[], None], seconds: float = 0.5) -> dict[str, float]:
    """The main thread's loop rate while ``body`` repeats in another thread for ``seconds``, over
    its rate while that thread only sleeps, and the main thread's longest stall. Holding the GIL
    through a C call stalls the main thread for the whole call; releasing it, only for what the
    OS scheduler takes (read both against ``gil_controls``: the cores may be shared)."""
    def spin(work: Callable[[], None]) -> tuple[float, float]:
        def loop() -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                work()
        thread = threading.Thread(target=loop)
        start = last = time.perf_counter()
        n, stall = 0, 0.0
        thread.start()
        while thread.is_alive():
            now = time.perf_counter()
            stall, last, n = max(stall, now - last), now, n + 1
        return n / (time.perf_counter() - start), stall

    idle_rate, idle_stall = spin(lambda: time.sleep(0.001))
    busy_rate, busy_stall = spin(body)
    return {"progress": busy_rate / idle_rate, "max_stall_ms": busy_stall * 1e3,
            "idle_max_stall_ms": idle_stall * 1e3}


def gil_controls() -> dict[str, dict[str, float]]:
    """The same measures for a C call that holds the GIL and one that releases it."""
    data = os.urandom(16 << 20)
    return {"holds GIL: sum(range(3e6))": gil_progress(lambda: sum(range(3_000_000))),
            "releases GIL: sha256(16 MiB)": gil_progress(lambda: hashlib.sha256(data).digest())}


def union_schema() -> dict[str, Any]:
    """Every schema as one ``anyOf`` (one tool call among many): a long compile."""
    defs, branches = {}, []
    for ns in SCHEMAS:
        schema = dict(ns.schema)
        defs.update(schema.pop("$defs", {}))
        branches.append(schema)
    return {"$defs": defs, "anyOf": branches}


def gil_checks(engine: Engine, schema: dict) -> dict[str, Any]:
    """Compile (single-threaded compiler, so that cores are not what is measured) and
    compile + first mask of ``schema``, each in a thread."""
    bitmask = torch.full((1, (engine.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def first_mask() -> None:
        engine.fill(engine.matcher(engine.compile(schema, threads=1)), bitmask)

    start = time.perf_counter()
    first_mask()
    single = time.perf_counter() - start
    return {"compile_first_mask_ms": single * 1e3,
            "compile": gil_progress(lambda: engine.compile(schema, threads=1)),
            "compile_first_mask": gil_progress(first_mask)}


def apply_times(engines: dict[str, Engine], batch: int, vocab: int, reps: int) -> dict[str, Any]:
    """Microseconds to apply a [batch, vocab] bitmask to float32 logits, CPU, median of ``reps``."""
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(batch, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), generator=gen,
                            dtype=torch.int32)
    # blocked[byte] = the 8 tokens of a mask byte that are not allowed (little-endian bits)
    blocked = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) == 0

    def plain_torch(logits: torch.Tensor, mask: torch.Tensor) -> None:
        rows = blocked.index_select(0, mask.view(torch.uint8).view(-1).int())
        logits.masked_fill_(rows.view(mask.shape[0], -1)[:, :logits.shape[1]], float("-inf"))

    import llguidance.numpy as llg_numpy
    variants = {"torch (byte LUT unpack + masked_fill_)": plain_torch,
                "xgrammar (cpu kernel)": engines["xgrammar"].apply,
                "llguidance.torch (torch.compile)": engines["llguidance"].apply,
                "llguidance.numpy": lambda lg, m: llg_numpy.apply_token_bitmask_inplace(
                    lg.numpy(), m.numpy())}
    expected = source.clone()
    plain_torch(expected, bitmask)
    out: dict[str, Any] = {"shape": [batch, vocab]}
    for name, fn in variants.items():
        logits = source.clone()
        start = time.perf_counter()
        fn(logits, bitmask)
        first = time.perf_counter() - start
        same = bool(torch.equal(logits, expected))
        samples = []
        for _ in range(reps):
            logits.copy_(source)
            t0 = time.perf_counter_ns()
            fn(logits, bitmask)
            samples.append(time.perf_counter_ns() - t0)
        out[name] = {"median_us": statistics.median(samples) / 1e3, "first_call_s": first,
                     "matches_torch": same}
    return out


# ----------------------------------------------------------------------------- correctness

def mask_agreement(xe: XGrammarEngine, le: LLGuidanceEngine, compiled: dict[str, dict],
                   tokens: dict[str, list[int]]) -> dict[str, Any]:
    """Compare the two engines' allowed sets at every position of every example. Known
    differences: llguidance allows only the canonical token where bytes are forced (``{"name":"``
    -> one token, xgrammar also allows ``{`` ...); inside strings with ``maxLength`` xgrammar
    allows raw control characters (invalid JSON) and no escapes, llguidance the reverse."""
    decoded = xe.info.decoded_vocab
    vocab = xe.info.vocab_size
    rows = {e.name: torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32) for e in (xe, le)}
    counts = {"positions": 0, "identical": 0, "llg_forced_canonical": 0,
              "string_chars (xgr control chars / llg escapes)": 0}
    unexplained = []
    for name, ids in tokens.items():
        if name not in compiled["xgrammar"] or name not in compiled["llguidance"]:
            continue
        xm, lm = xe.matcher(compiled["xgrammar"][name]), le.matcher(compiled["llguidance"][name])
        for i in range(len(ids) + 1):
            xe.fill(xm, rows["xgrammar"])
            le.fill(lm, rows["llguidance"])
            a = set(allowed_ids(rows["xgrammar"][0], vocab).tolist())
            b = set(allowed_ids(rows["llguidance"][0], vocab).tolist())
            counts["positions"] += 1
            kind = difference_kind(a, b, decoded)
            if kind is None:
                unexplained.append({"schema": name, "position": i,
                                    "only_xgrammar": [decoded[t].decode(errors="replace")
                                                      for t in sorted(a - b)[:8]],
                                    "only_llguidance": [decoded[t].decode(errors="replace")
                                                        for t in sorted(b - a)[:8]]})
            else:
                counts[kind] += 1
            if i < len(ids):
                xe.accept(xm, ids[i])
                le.accept(lm, ids[i])
    return {**counts, "unexplained": len(unexplained), "unexplained_examples": unexplained[:10]}


def difference_kind(a: set[int], b: set[int], decoded: list[bytes]) -> str | None:
    """Which known difference explains xgrammar's set ``a`` vs llguidance's ``b``; None: none."""
    if a == b:
        return "identical"
    if len(b) == 1 and b <= a:
        return "llg_forced_canonical"
    only_x = {t for t in a - b if not any(c < 0x20 or c == 0x7F for c in decoded[t])}
    only_l = {t for t in b - a if b"\\" not in decoded[t]}
    if not only_x and not only_l:
        return "string_chars (xgr control chars / llg escapes)"
    return None


_INT = {"type": "integer"}
FEATURES: list[tuple[str, dict, Any, Any]] = [
    # (feature, schema, a valid instance, an invalid one)
    ("format date", {"type": "string", "format": "date"}, "2025-03-14", "2025-13-40"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2025-03-14T09:30:00Z",
     "2025-03-14 09:30"),
    ("format time", {"type": "string", "format": "time"}, "09:30:00Z", "9:30"),
    ("format email", {"type": "string", "format": "email"}, "ana@example.com", "ana.example.com"),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000",
     "123e4567"),
    ("format ipv4", {"type": "string", "format": "ipv4"}, "192.168.0.1", "192.168.0"),
    ("minLength", {"type": "string", "minLength": 3, "maxLength": 5}, "abc", "ab"),
    ("pattern + maxLength", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "abc",
     "abcd"),
    ("pattern unanchored (JSON Schema: search)", {"type": "string", "pattern": "[0-9]{3}",
                                                  "maxLength": 10}, "a123b", "abc"),
    ("pattern \\d \\w", {"type": "string", "pattern": "^\\d{3}\\w$"}, "123a", "12ab"),
    ("uniqueItems", {"type": "array", "items": _INT, "maxItems": 3, "uniqueItems": True}, [1, 2],
     [1, 1]),
    ("multipleOf", {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}, 15, 12),
    ("exclusiveMaximum", {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, 0.5, 1),
    ("integer exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}, 1, 0),
    ("oneOf", {"oneOf": [_INT, {"type": "string", "maxLength": 5}]}, 3, True),
    ("allOf", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 10}]}, 5, 11),
    ("not", {"type": "integer", "not": {"const": 3}}, 4, 3),
    ("enum of mixed types", {"enum": ["a", 1, None, True]}, None, False),
    ("const object", {"const": {"a": 1}}, {"a": 1}, {"a": 2}),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string", "maxLength": 5}, _INT],
                     "items": False}, ["a", 1], [1, "a"]),
    ("minProperties", {"type": "object", "properties": {"a": _INT, "b": _INT},
                       "minProperties": 1, "additionalProperties": False}, {"a": 1}, {}),
    ("additionalProperties schema", {"type": "object", "additionalProperties": _INT,
                                     "maxProperties": 3}, {"x": 1}, {"x": "s"}),
    ("recursive $ref", {"type": "object", "properties": {"v": _INT, "kids": {
        "type": "array", "maxItems": 2, "items": {"$ref": "#"}}}, "required": ["v", "kids"],
        "additionalProperties": False}, {"v": 1, "kids": [{"v": 2, "kids": []}]},
     {"v": 1, "kids": [{"v": 2}]}),
]


def feature_support(engine: Engine, tok: Tokenizer) -> dict[str, str]:
    """Per feature: enforced, ignored (the invalid instance passes), rejects valid, or the
    compile error."""
    out = {}
    for feature, schema, valid, invalid in FEATURES:
        try:
            compiled = engine.compile(schema)
        except Exception as e:  # noqa: BLE001 - an unsupported feature is a result
            out[feature] = f"compile error: {str(e).splitlines()[0][:120]}"
            continue
        ok = [accepts(engine, compiled, tok.encode(compact(x), add_special_tokens=False))
              for x in (valid, invalid)]
        out[feature] = ("enforced" if ok == [True, False] else "ignored" if ok == [True, True]
                        else "rejects valid")
    return out


def accepts(engine: Engine, compiled: Any, ids: list[int]) -> bool:
    matcher = engine.matcher(compiled)
    return all(engine.accept(matcher, t) for t in ids) and engine.complete(matcher)


# ----------------------------------------------------------------------------- report

def measure_engine(engine: Engine, tokens: dict[str, list[int]], eos: int,
                   a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every figure for one engine; also its compiled schemas (for the agreement check)."""
    print(f"[{engine.name}] compile ...", flush=True)
    result: dict[str, Any] = {"tokenizer_setup_s": engine.setup_s,
                              "compile": compile_times(engine, a.repeats)}
    compiled = {ns.name: engine.compile(ns.schema) for ns in SCHEMAS
                if ns.name not in result["compile"]["errors"]}
    usable = {n: t for n, t in tokens.items() if n in compiled}
    print(f"[{engine.name}] masks ...", flush=True)
    result["batch1"] = batch1(engine, compiled, usable, eos, a.repeats)
    result[f"batch{a.batch}_serial"] = best_batch_run(engine, compiled, usable, eos, a, False)
    for threads in a.threads:
        engine.set_threads(threads)
        result[f"batch{a.batch}_parallel_t{threads}"] = best_batch_run(
            engine, compiled, usable, eos, a, True)
    largest = max(SCHEMAS, key=lambda ns: len(compact(ns.schema)))
    result["gil"] = {f"largest ({largest.name})": gil_checks(engine, largest.schema),
                     "anyOf of all": gil_checks(engine, union_schema())}
    return result, compiled


def table_rows(report: dict[str, Any]) -> list[tuple[str, Callable[[dict, str], str]]]:
    """(label, figure of one engine) for each row of the printed table."""
    b = f"batch{report['batch']}"

    def gil(schema: str, key: str) -> Callable[[dict, str], str]:
        return lambda r, n: "{progress:.0%} ({vs_controls:.2f}); {max_stall_ms:.0f}".format(
            **r["gil"][schema][key])

    def step(key: str) -> Callable[[dict, str], str]:
        return lambda r, n: "{mean_us:.0f} / {p50_us:.0f} / {p99_us:.0f}".format(**r[key]["step"])

    rows = [
        ("import (fresh interpreter), s", lambda r, n: f"{report['imports'][n]['import_s']:.2f}"),
        ("  loads", lambda r, n: ",".join(report["imports"][n]["loads"]) or "-"),
        ("tokenizer setup, ms", lambda r, n: f"{r['tokenizer_setup_s'] * 1e3:.0f}"),
        ("compile, all schemas, ms", lambda r, n: f"{r['compile']['compile_total_ms']:.1f}"),
        ("compile, slowest schema, ms",
         lambda r, n: f"{max(r['compile']['compile_ms'].values()):.2f}"),
        ("compile+first mask, all, ms", lambda r, n: f"{r['compile']['first_mask_total_ms']:.1f}"),
        ("schemas that failed", lambda r, n: str(len(r["compile"]["errors"]))),
        ("b1 fill mean/p50/p99, us", lambda r, n: "{mean_us:.1f} / {p50_us:.1f} / {p99_us:.0f}"
         .format(**r["batch1"]["fill"])),
        ("b1 fill, reset matcher, mean/p99", lambda r, n: "{mean_us:.1f} / {p99_us:.0f}"
         .format(**r["batch1"]["fill_warm"])),
        ("b1 accept mean, us", lambda r, n: f"{r['batch1']['accept']['mean_us']:.1f}"),
        ("b1 last mask is {EOS}", lambda r, n: "{final_mask_is_eos_only}/{schemas}"
         .format(**r["batch1"])),
        (f"{b} step mean/p50/p99, us:", lambda r, n: ""),
        ("  serial fill loop + accept loop", step(f"{b}_serial")),
    ]
    for t in report["threads"]:
        rows.append((f"  parallel fill+accept, {t} thread(s)", step(f"{b}_parallel_t{t}")))
        rows.append(("    per token, us",
                     lambda r, n, t=t: f"{r[f'{b}_parallel_t{t}']['per_token_us']:.1f}"))
    rows += [
        ("GIL: main-thread progress (vs controls)", lambda r, n: ""),
    ]
    for schema in report["engines"]["xgrammar"]["gil"]:
        rows += [(f"  {schema}: one compile+first mask, ms",
                  lambda r, n, s=schema: f"{r['gil'][s]['compile_first_mask_ms']:.1f}"),
                 ("    in compile; longest stall ms", gil(schema, "compile")),
                 ("    in compile+first mask", gil(schema, "compile_first_mask"))]
    return rows


def print_report(report: dict[str, Any]) -> None:
    engines = report["engines"]
    print(f"\n{report['cpu']} ({report['cores']} cores), {MODEL} tokenizer, "
          f"{len(SCHEMAS)} schemas, {report['tokens']} example tokens")
    print(f"{'':38s}" + "".join(f"{n:>24s}" for n in engines))
    for label, fn in table_rows(report):
        print(f"{label:38s}" + "".join(f"{fn(r, n):>24s}" for n, r in engines.items()))
    print("GIL controls: " + ", ".join(f"{k} {v['progress']:.0%}, stall {v['max_stall_ms']:.0f} ms"
                                       for k, v in report["gil_controls"].items())
          + "; (x): 0 = like the first, 1 = like the second")
    print(f"\napply bitmask to {report['apply']['shape']} float32 logits (median us):")
    for name, r in report["apply"].items():
        if name != "shape":
            print(f"  {name:36s} {r['median_us']:9.0f}  first call {r['first_call_s']:.2f} s"
                  f"{'' if r['matches_torch'] else '  RESULT DIFFERS'}")
    agree = report["mask_agreement"]
    print("\nallowed-token sets, xgrammar vs llguidance, at every example position: "
          + ", ".join(f"{k} {v}" for k, v in agree.items() if k != "unexplained_examples"))
    print("JSON-schema features (xgrammar | llguidance):")
    for feature, verdict in report["features"]["xgrammar"].items():
        print(f"  {feature:42s} {verdict:28s} | {report['features']['llguidance'][feature]}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/grammar_engines.json")
    p.add_argument("--repeats", type=int, default=3,
                   help="compiles per schema (median); warm mask passes and batch runs (best)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=400, help="decode steps at --batch")
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                   help="thread counts of the parallel fill (BatchGrammarMatcher, LLExecutor)")
    p.add_argument("--apply-reps", type=int, default=30)
    a = p.parse_args(argv)
    a.threads = sorted({int(t) for t in a.threads.split(",")})
    torch.set_num_threads(1)  # torch's spinning OpenMP threads slow everything on shared cores
    tok = load_tokenizer()
    tokens = {ns.name: tok.encode(compact(ns.example), add_special_tokens=False) for ns in SCHEMAS}
    report: dict[str, Any] = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
        "versions": {m: version(m) for m in ("xgrammar", "llguidance", "torch")},
        "requires": {m: requires(m) or [] for m in ("xgrammar", "llguidance")},
        "model": MODEL, "vocab_size": tok.vocab_size, "eos": tok.eos_token_id,
        "batch": a.batch, "threads": a.threads, "tokens": sum(map(len, tokens.values())),
        "imports": {m: import_cost(m) for m in ("xgrammar", "llguidance", "llguidance.torch")},
        "engines": {}, "compiled_with": {"xgrammar": NO_WS_XGR, "llguidance": NO_WS_LLG}}
    engines = {"xgrammar": XGrammarEngine(tok), "llguidance": LLGuidanceEngine(tok)}
    compiled = {}
    for name, engine in engines.items():
        report["engines"][name], compiled[name] = measure_engine(engine, tokens,
                                                                 tok.eos_token_id, a)
    report["gil_controls"] = controls = gil_controls()
    hold, release = (c["progress"] for c in controls.values())
    for r in report["engines"].values():
        for check in r["gil"].values():
            for k in ("compile", "compile_first_mask"):
                check[k]["vs_controls"] = (check[k]["progress"] - hold) / (release - hold)
    report["mask_agreement"] = mask_agreement(engines["xgrammar"], engines["llguidance"],
                                              compiled, tokens)
    report["features"] = {n: feature_support(e, tok) for n, e in engines.items()}
    print("apply (llguidance.torch compiles its kernel once) ...", flush=True)
    report["apply"] = apply_times(engines, a.batch, tok.vocab_size, a.apply_reps)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print_report(report)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
