"""The measurements of one model shape in the GPU benchmark, each a section of the run:
build the random-weight folder, start fastinfer, make the workload, then single-stream decode
and mixed-workload throughput of fastinfer and of the baselines. The timed runs are
``fastinfer.bench.systems``' (and :mod:`fastinfer.bench.compiled`'s) on
``fastinfer.bench.workload``'s workload; this module turns their records into the figures of
``gpu_bench.json``."""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from fastinfer.bench import report
from fastinfer.bench.baselines import load_transformers_model
from fastinfer.bench.compiled import CompiledBatchedSystem, CompiledDecoder, PlainLlama
from fastinfer.bench.gpu_hardware import free_memory, gpu_memory, sync
from fastinfer.bench.gpu_profile import step_profile
from fastinfer.bench.random_model import (build_random_llama, is_built, shape_config, weight_bytes_per_token,
                                          write_folder)
from fastinfer.bench.systems import (FastinferSystem, RequestRecord, SystemRun, TransformersBatchedSystem,
                                     TransformersSystem)
from fastinfer.bench.workload import corpus_source, corpus_token_ids, mixed_workload
from fastinfer.engine.engine import Engine
from fastinfer.model.tokenizer import Tokenizer

CONFIG_KEYS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization", "block_size",
               "enable_chunked_prefill")
COMPILED_NOTE = "static batches, left padding, eager prefill, compiled decode over the whole static cache"


@contextlib.contextmanager
def async_scheduling(engine: Engine, on: bool) -> Iterator[None]:
    """``engine`` with ``EngineConfig.async_scheduling`` switched to ``on`` for a while."""
    before, engine.async_scheduling = engine.async_scheduling, on
    try:
        yield
    finally:
        engine.async_scheduling = before


def decode_rate(rec: RequestRecord) -> float:
    """Tokens/s of a single-stream request after its first token."""
    return (rec.output_tokens - 1) / (rec.finish - rec.first_token)


def throughput_result(run: SystemRun, prompts: list[list[int]], device: str, **extra: Any) -> dict[str, Any]:
    """The figures of a throughput section from a system's run (``report.summarize``'s
    statistics under this file's names), ``extra`` and the GPU allocator's peak in GiB (None
    off the GPU)."""
    s = report.summarize([run])
    prompt_tokens, wall = sum(len(p) for p in prompts), s["total_time_s"]
    out = {"requests": s["num_requests"], "prompt_tokens": prompt_tokens, "output_tokens": s["output_tokens"],
           "seconds": wall, "output_tok_s": s["output_throughput_tok_s"],
           "total_tok_s": (prompt_tokens + s["output_tokens"]) / wall, "request_s": s["request_throughput_req_s"],
           "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "e2e_ms": s["e2e_ms"]}
    out.update(extra)
    on_gpu = torch.device(device).type == "cuda"
    out["peak_allocated_gib"] = round(run.peak_memory_mb / 1024, 2) if on_gpu else None
    return out


def shape_ratios(sections: dict[str, Any]) -> dict[str, float]:
    """fastinfer's single-stream tok/s over each baseline's, and its throughput on the
    baselines' subset over theirs (where both were measured)."""
    def val(key: str, field: str):
        v = sections.get(key)
        return v.get(field) if isinstance(v, dict) else None

    r = {}
    fi, ours = val("fastinfer_decode", "tok_s"), val("fastinfer_subset", "output_tok_s")
    for base in ("transformers", "compiled"):
        other = val(f"{base}_decode", "tok_s")
        if fi and other:
            r[f"decode_vs_{base}"] = fi / other
        theirs = val(f"{base}_throughput", "output_tok_s")
        if ours and theirs:
            r[f"throughput_vs_{base}_same_subset"] = ours / theirs
    return r


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class ShapeRun:
    """The sections of one shape; what one leaves for the next (the folder, the engine, the
    transformers model, the workload) lives here. ``bandwidth`` is the run's bandwidth record
    (data sheet, measured copy), read for the roofline fractions."""

    def __init__(self, args: argparse.Namespace, shape: str, bandwidth: dict[str, Any], peak_source: str) -> None:
        self.args, self.shape, self.device = args, shape, args.device
        self.bandwidth, self.peak_source = bandwidth, peak_source
        self.wbytes = weight_bytes_per_token(shape_config(shape), 2)
        self.big = shape == "llama-3.1-8b"
        self.folder: str | None = None
        self.llm = self.hf = self.workload = self.decode_prompt = None
        self._plain: PlainLlama | None = None
        self._plain_key: tuple[int, int] | None = None
        self._fi_warm = False

    def baseline_n(self) -> int:
        """Requests of the workload (its first ones) the baselines run."""
        return self.args.baseline_requests_8b if self.big else self.args.baseline_requests

    def decode_result(self, tok_s: float, ttft_ms: float | None, **extra: Any) -> dict[str, Any]:
        """A single-stream figure with its achieved weight bandwidth and roofline fractions."""
        bw, wbytes = self.bandwidth, self.wbytes
        out = {"tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "ttft_ms": ttft_ms,
               "prompt_tokens": self.args.prompt_len, "new_tokens": self.args.decode_tokens,
               "weight_bytes_per_token": wbytes, "achieved_bytes_per_s": wbytes * tok_s}
        if bw.get("table_bytes_per_s"):
            out["fraction_of_table_peak"] = wbytes * tok_s / bw["table_bytes_per_s"]
        if bw.get("copy_bytes_per_s"):
            out["fraction_of_measured_copy"] = wbytes * tok_s / bw["copy_bytes_per_s"]
        out["peak_used"] = self.peak_source
        out.update(extra)
        return out

    # ------------------------------------------------------------------ build, start-up, workload
    def build(self) -> dict[str, Any]:
        """The random-weight folder under ``--model-dir``: reused when built before for the same
        shape and seed, else built on the device and saved (the model kept for the baselines,
        off the GPU while fastinfer runs)."""
        folder = os.path.join(self.args.model_dir, self.shape)
        t = time.perf_counter()
        if is_built(folder, self.shape, torch.bfloat16, self.args.seed):
            self.folder = folder
            return {"folder": folder, "reused": True, "seconds": round(time.perf_counter() - t, 1)}
        model = build_random_llama(self.shape, torch.bfloat16, self.args.seed, self.device)
        sync(self.device)
        built = time.perf_counter() - t
        write_folder(model, folder, self.shape, self.args.seed)
        saved = time.perf_counter() - t - built
        self.hf = model.to("cpu") if self.device == "cuda" else model
        free_memory()
        self.folder = folder
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        return {"folder": folder, "reused": False, "build_seconds": round(built, 1), "save_seconds": round(saved, 1),
                "folder_bytes": size}

    def _engine_options(self) -> dict[str, Any]:
        a = self.args
        opts: dict[str, Any] = dict(device=self.device, dtype="bfloat16" if self.device == "cuda" else "float32",
                                    max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)
        if self.device == "cuda":
            opts.update(gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager)
        else:
            opts.update(kv_cache_memory="512MiB")
        if a.max_num_batched_tokens:
            opts["max_num_batched_tokens"] = a.max_num_batched_tokens
        if a.ops_backend:
            opts["ops_backend"] = a.ops_backend
        return opts

    def fi_start(self) -> dict[str, Any]:
        """fastinfer's ``LLM`` on the folder: start-up time, its configuration, KV blocks,
        CUDA graphs and memory."""
        from fastinfer import LLM

        opts = self._engine_options()
        t = time.perf_counter()
        self.llm = LLM(self.folder, **opts)
        sync(self.device)
        out = {"seconds": round(time.perf_counter() - t, 1), "options": opts, "stats": self.llm.stats()}
        cfg, engine = self.llm.config, self.llm.engine
        out["config"] = {k: getattr(cfg, k) for k in CONFIG_KEYS if hasattr(cfg, k)}
        out["config"]["enforce_eager"] = getattr(cfg, "enforce_eager", None)
        out["config"]["ops_backend"] = getattr(cfg, "ops_backend", None)
        graphs = getattr(getattr(engine, "runner", None), "graphs", None)
        out["cuda_graphs"] = None if graphs is None else len(getattr(graphs, "graphs", {}) or {}) or "emulated"
        out["activation_bytes"] = getattr(engine, "activation_bytes", None)
        out["memory"] = gpu_memory()
        return out

    def make_workload(self) -> dict[str, Any]:
        """The mixed workload of ``fastinfer.bench.workload`` (large enough for every section)
        and the single-stream prompt, from the folder's tokenizer."""
        a = self.args
        tok = Tokenizer.from_folder(self.folder)
        n = max(a.num_requests, a.num_requests_8b or 0, a.baseline_requests)
        self.workload = mixed_workload(tok, n, a.input_range, a.output_range, a.seed, "mixed")
        self.decode_prompt = corpus_token_ids(tok, a.prompt_len)[:a.prompt_len]
        return {"num_requests": n, "input_range": a.input_range, "output_range": a.output_range, "seed": a.seed,
                "text": corpus_source()}

    # ------------------------------------------------------------------ fastinfer
    def fi_decode(self, asynchronous: bool = False) -> dict[str, Any]:
        """Batch-1 decode after a warm-up, the better of two runs; ``asynchronous`` switches the
        same engine to async scheduling for it."""
        prompt, n = self.decode_prompt, self.args.decode_tokens
        system = FastinferSystem(self.llm.engine)
        with async_scheduling(self.llm.engine, asynchronous):
            system.run([prompt], [min(n, 32)])
            records = [system.run([prompt], [n]).records[0] for _ in range(2)]
        runs = [{"tokens": r.output_tokens, "ttft_ms": r.ttft_ms, "decode_s": r.finish - r.first_token,
                 "tok_s": decode_rate(r)} for r in records]
        best = max(runs, key=lambda r: r["tok_s"])
        return self.decode_result(best["tok_s"], best["ttft_ms"], runs=runs)

    def fi_step_profile(self) -> dict[str, Any]:
        """Where a batch-1 decode step's time goes (:func:`gpu_profile.step_profile`)."""
        return step_profile(self.llm.engine, self.decode_prompt)

    def fi_throughput(self, n: int, asynchronous: bool = False) -> dict[str, Any]:
        """The first ``n`` requests of the workload, all submitted at once (the prefill and
        chunk shapes compiled by a short warm-up outside the timing, once)."""
        prompts, outs = self.workload.prompts[:n], self.workload.output_lens[:n]
        engine = self.llm.engine
        system = FastinferSystem(engine)
        with async_scheduling(engine, asynchronous):
            if not self._fi_warm:
                system.run(prompts[:8], [4] * len(prompts[:8]))
                self._fi_warm = True
            sync(self.device)
            run = system.run(prompts, outs)
        return throughput_result(run, prompts, self.device, stats=engine.stats())

    def release_fastinfer(self) -> dict[str, float] | None:
        """Drops the engine before the baselines; the GPU memory left afterwards."""
        self.llm = None
        free_memory()
        return gpu_memory()

    # ------------------------------------------------------------------ transformers
    def _hf_cache(self) -> str | None:
        return "static" if self.args.hf_cache == "static" else None

    def hf_load(self) -> dict[str, Any]:
        """The transformers model on the device (the one built in this run, else loaded from
        the folder), generating exactly the tokens asked for."""
        t = time.perf_counter()
        if self.hf is None:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.hf = load_transformers_model(self.folder, dtype)
        self.hf = self.hf.to(self.device)
        self.hf.generation_config.eos_token_id = None
        self.hf.generation_config.pad_token_id = 0
        sync(self.device)
        return {"seconds": round(time.perf_counter() - t, 1)}

    def hf_decode(self) -> dict[str, Any]:
        """``generate`` at batch 1 after a short warm-up."""
        system = TransformersSystem(self.hf, self.device, self._hf_cache())
        system.run([self.decode_prompt], [8])
        rec = system.run([self.decode_prompt], [self.args.decode_tokens]).records[0]
        return self.decode_result(decode_rate(rec), rec.ttft_ms, cache=self.args.hf_cache)

    def hf_throughput(self, n: int) -> dict[str, Any]:
        """Static batches of ``--baseline-batch`` requests, left-padded
        (``TransformersBatchedSystem``)."""
        prompts, outs = self.workload.prompts[:n], self.workload.output_lens[:n]
        b = self.args.baseline_batch
        system = TransformersBatchedSystem(self.hf, self.device, b, 0, self._hf_cache())
        system.run([prompts[0][:16]], [2])
        sync(self.device)
        run = system.run(prompts, outs)
        return throughput_result(run, prompts, self.device, batch=b, cache=self.args.hf_cache)

    # ------------------------------------------------------------------ torch.compile
    def plain(self, batch: int, max_seq: int) -> PlainLlama:
        """The plain Llama over the transformers model's weights (built again only for another
        batch size or cache length; the old graphs hold the old model's memory)."""
        if self._plain_key != (batch, max_seq):
            self._plain = None
            CompiledDecoder.reset()
            free_memory()
            self._plain, self._plain_key = PlainLlama(self.hf, batch, max_seq), (batch, max_seq)
        return self._plain

    def compiled_decode(self) -> dict[str, Any]:
        """Batch-1 greedy decode of the compiled plain loop (compiled and recorded first)."""
        prompt, n = self.decode_prompt, self.args.decode_tokens
        decoder = CompiledDecoder(self.plain(1, _round_up(len(prompt) + n, 128)), self.device)
        t = time.perf_counter()
        decoder.generate([prompt], [8])
        compile_s = time.perf_counter() - t
        decoder.generate([prompt], [8])
        res = decoder.generate([prompt], [n])
        return self.decode_result((n - 1) / res.decode_s, res.prefill_s * 1e3, compile_seconds=round(compile_s, 1),
                                  mode=decoder.mode)

    def compiled_throughput(self, n: int) -> dict[str, Any]:
        """Static batches of ``--baseline-batch`` requests through the compiled plain loop."""
        prompts, outs = self.workload.prompts[:n], self.workload.output_lens[:n]
        b = self.args.baseline_batch
        max_seq = _round_up(max(len(p) for p in prompts) + max(outs), 128)
        decoder = CompiledDecoder(self.plain(b, max_seq), self.device)
        t = time.perf_counter()
        decoder.generate(prompts[:b], [4] * min(b, len(prompts)))  # compiles for this batch size
        compile_s = time.perf_counter() - t
        sync(self.device)
        run = CompiledBatchedSystem(decoder).run(prompts, outs)
        return throughput_result(run, prompts, self.device, batch=b, compile_seconds=round(compile_s, 1),
                                 note=COMPILED_NOTE)

    def release_baselines(self) -> None:
        """Drops every model of this shape and the compiled graphs."""
        self.hf = self.llm = self._plain = self._plain_key = None
        CompiledDecoder.reset()
        free_memory()
