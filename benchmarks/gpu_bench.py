#!/usr/bin/env python3
"""GPU benchmark of fastinfer on random-weight Llama models of real shapes, against
``transformers`` and a ``torch.compile``d plain decode loop measured in the same run.

    python3 benchmarks/gpu_bench.py --out bench_out/gpu                 # both shapes, ~5 min on an H100
    python3 benchmarks/gpu_bench.py --shapes llama-3.2-1b --quick       # a quicker look
    python3 benchmarks/gpu_bench.py --budget-s 200                      # skip what would run past 200 s

For each shape (``llama-3.2-1b``, and ``llama-3.1-8b`` where the GPU has the memory) the
folder is built on the GPU (:mod:`fastinfer.bench.random_model`; no download; kept under
``--model-dir`` for later runs), then:

- single-stream decode (128-token prompt, 256 new tokens, greedy, EOS ignored, after a warm-up
  run) in tokens/s after the first token, and its fraction of the HBM roofline
  ``weight_bytes x tok/s / peak bandwidth`` against both the GPU's data-sheet peak (a table by
  name) and the device-to-device copy bandwidth measured here;
- a mixed workload (256 requests, prompts 32-1024 tokens, outputs 32-512, seeded, all
  submitted at once): output and total tokens/s, TTFT and TPOT p50/p90/p99;
- the same through ``transformers`` (``generate``; single-stream, and static batches with left
  padding on a fixed subset of the workload, as it is far slower) and through a plain Llama
  forward written in torch with a static KV cache under ``torch.compile(mode="reduce-overhead")``
  (gpt-fast style; single-stream, and batched on the subset when the budget allows); fastinfer's
  ratio to each, fastinfer's figure on the same subset where the baseline ran on a subset;
- each op's kernels (``fastinfer.ops.implementations``: triton, cuda and the torch reference)
  at decode-relevant sizes of the 1B shape, timed with ``triton.testing.do_bench`` (median,
  L2 flushed) and by CUDA-graph replay, as bytes moved / time.

Every section runs in its own try/except: a failure is recorded (error text in the JSON and
the Markdown) and the rest goes on. ``--budget-s`` skips what would start past the budget and
says so. Results: ``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md`` (rewritten after every
section, so a run cut short keeps what it measured); a summary table is printed at the end.
Without a GPU it exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NO_GPU = "gpu_bench: no CUDA GPU is available (torch.cuda.is_available() is False); nothing to measure"

# Data-sheet HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name (first match).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),            # H100 SXM5 (NVIDIA H100 80GB HBM3)
    ("A100 80GB PCIe", 1.935e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 2.039e12),
    ("A100", 1.555e12),           # 40 GB
]
DEFAULT_SHAPES = "llama-3.2-1b,llama-3.1-8b"


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench_out", "gpu"),
                   help="output folder (default: $OUT or bench_out/gpu)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated shapes (default {DEFAULT_SHAPES})")
    p.add_argument("--quick", action="store_true",
                   help="smaller runs: 128 new tokens single-stream, 64 requests, subsets of 32")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="skip sections that would start past this many seconds (default 300)")
    p.add_argument("--model-dir", default=os.environ.get("FASTINFER_BENCH_MODELS", "/tmp/fastinfer_random_models"),
                   help="where the random model folders are built (not under --out: they are large)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=None, help="mixed workload size (default 256; --quick 64)")
    p.add_argument("--num-requests-8b", type=int, default=None,
                   help="mixed workload size for the 8B shape (default 256 when the budget allows, else 128)")
    p.add_argument("--input-range", default="32,1024", help="prompt lengths, inclusive (default 32,1024)")
    p.add_argument("--output-range", default="32,512", help="output lengths, inclusive (default 32,512)")
    p.add_argument("--prompt-len", type=int, default=128, help="single-stream prompt tokens (default 128)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="single-stream new tokens (default 256; --quick 128)")
    p.add_argument("--baseline-requests", type=int, default=None,
                   help="requests of the workload the baselines run (its first ones; default 64, 8B 32; --quick 32)")
    p.add_argument("--baseline-requests-8b", type=int, default=None,
                   help="the same for the 8B shape (default 32; --quick 16)")
    p.add_argument("--baseline-batch", type=int, default=32, help="static batch of the batched baselines (default 32)")
    p.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                   help="transformers' KV cache for generate (default dynamic)")
    p.add_argument("--no-baselines", action="store_true", help="fastinfer only")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--no-kernels", action="store_true", help="leave out the per-kernel bandwidth section")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="fastinfer without CUDA graphs")
    p.add_argument("--ops-backend", default=None, help="force fastinfer's ops backend (reference|triton|cuda)")
    # debugging the script itself where there is no GPU: tiny shape, CPU, small sizes
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.num_requests = args.num_requests or (64 if q else 256)
    args.decode_tokens = args.decode_tokens or (128 if q else 256)
    args.baseline_requests = args.baseline_requests or (32 if q else 64)
    args.baseline_requests_8b = args.baseline_requests_8b or (16 if q else 32)
    args.input_range = tuple(int(x) for x in args.input_range.split(","))
    args.output_range = tuple(int(x) for x in args.output_range.split(","))
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    return args


# ----------------------------------------------------------------------------- helpers

def now() -> float:
    return time.perf_counter()


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def pct(values) -> dict:
    from fastinfer.bench.schema import percentiles

    return percentiles(list(values))


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def peak_from_table(name: str) -> tuple[float | None, str | None]:
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw, key
    return None, None


class Bench:
    """The run: a result document filled section by section, written after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = now()
        self.device = args.device
        os.makedirs(args.out, exist_ok=True)
        self.json_path = os.path.join(args.out, "gpu_bench.json")
        self.md_path = os.path.join(args.out, "gpu_bench.md")
        self.doc: dict[str, Any] = {
            "schema": "fastinfer-gpu-bench/1",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "env": {}, "bandwidth": {}, "kernels": {}, "shapes": {}, "sections": [], "errors": [], "skipped": [],
        }

    # --------------------------------------------------------------- bookkeeping
    def elapsed(self) -> float:
        return now() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def section(self, name: str, fn: Callable[[], Any], store: Callable[[Any], None] | None = None,
                needs_s: float = 0.0) -> Any:
        """Runs ``fn`` unless fewer than ``needs_s`` seconds of the budget are left; records its
        time, its error (and goes on), or why it was skipped. ``store`` puts its result in the doc."""
        if self.left() < needs_s:
            why = (f"skipped: {max(self.left(), 0):.0f} s of the {self.args.budget_s:.0f} s budget left, "
                   f"about {needs_s:.0f} s needed")
            self.doc["skipped"].append({"section": name, "reason": why})
            print(f"[{self.elapsed():6.1f}s] {name}: {why}", flush=True)
            if store is not None:
                store({"skipped": why})
            self.write()
            return None
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        start = now()
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - one failure must not lose the rest
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = {"section": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
            self.doc["errors"].append(error)
            print(f"[{self.elapsed():6.1f}s] {name}: FAILED {error['error'][:300]}", flush=True)
            free_memory()
        took = now() - start
        self.doc["sections"].append({"section": name, "seconds": round(took, 2), "ok": error is None})
        if store is not None:
            store({"error": error["error"]} if error else result)
        self.write()
        return result

    def write(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, self.json_path)
        try:
            md = to_markdown(self.doc)
        except Exception as exc:  # noqa: BLE001 - a report bug must not stop the measurements
            md = (f"# fastinfer GPU benchmark\n\nthe Markdown report failed ({type(exc).__name__}: {exc}); "
                  "see gpu_bench.json\n")
        with open(self.md_path, "w") as f:
            f.write(md)

    # --------------------------------------------------------------- the run
    def run(self) -> dict:
        self.section("environment", self.environment, lambda r: self.doc["env"].update(r or {}))
        if self.device == "cuda":
            self.section("copy bandwidth", self.copy_bandwidth, lambda r: self.doc["bandwidth"].update(r or {}))
        self.peak, self.peak_source = self._choose_peak()
        if self.device == "cuda" and not self.args.no_kernels:
            self.section("kernels", self.kernels, lambda r: self.doc.__setitem__("kernels", r), needs_s=20)
        for shape in self.args.shapes:
            self.run_shape(shape)
        self.doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.write()
        return self.doc

    def _choose_peak(self) -> tuple[float | None, str]:
        bw = self.doc["bandwidth"]
        if bw.get("table_bytes_per_s"):
            return bw["table_bytes_per_s"], f"data sheet ({bw.get('table_entry')})"
        if bw.get("copy_bytes_per_s"):
            return bw["copy_bytes_per_s"], "measured device copy (GPU not in the table)"
        return None, "none"

    # --------------------------------------------------------------- environment
    def environment(self) -> dict:
        import torch

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda_runtime": torch.version.cuda, "device": self.device}
        for mod in ("triton", "transformers", "tokenizers", "safetensors"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as exc:  # noqa: BLE001
                env[mod] = f"unavailable ({type(exc).__name__})"
        try:
            import fastinfer
            from fastinfer.ops import cuda_native

            env["fastinfer"] = fastinfer.__version__
            env["fastinfer_cuda_extension"] = cuda_native.built()
        except Exception as exc:  # noqa: BLE001
            env["fastinfer"] = f"import failed: {type(exc).__name__}: {exc}"
        env["git_sha"] = _git(["rev-parse", "HEAD"])
        env["git_dirty"] = bool(_git(["status", "--porcelain", "--untracked-files=no"]))
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0),
                       capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
            try:
                env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                env["driver"] = None
        else:
            env["gpu"] = None
        env["cpu_count"] = os.cpu_count()
        return env

    def copy_bandwidth(self) -> dict:
        """Device-to-device ``copy_`` of a 1 GiB tensor: bytes read + written / time (median of 20)."""
        import torch

        n = 2**30
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        times.sort()
        t = times[len(times) // 2]
        del src, dst
        free_memory()
        name = torch.cuda.get_device_name(0)
        table, entry = peak_from_table(name)
        out = {"copy_bytes_per_s": 2 * n / t, "copy_GBps": round(2 * n / t / 1e9, 1), "copy_seconds": t,
               "table_bytes_per_s": table, "table_entry": entry, "gpu": name}
        if table:
            out["copy_fraction_of_table"] = round(2 * n / t / table, 3)
        return out

    # --------------------------------------------------------------- kernels
    def kernels(self) -> dict:
        import torch

        from fastinfer.bench.random_model import SHAPES

        s = SHAPES["llama-3.2-1b"]
        results: dict[str, Any] = {"shape": "llama-3.2-1b", "dtype": "bfloat16", "rows": []}
        for case in kernel_cases(s, torch.bfloat16):
            for row in time_kernel_case(case, self.peak_bw_for_kernels()):
                results["rows"].append(row)
                self.doc["kernels"] = results
        return results

    def peak_bw_for_kernels(self) -> float | None:
        bw = self.doc["bandwidth"]
        return bw.get("table_bytes_per_s") or bw.get("copy_bytes_per_s")

    # --------------------------------------------------------------- one shape
    def run_shape(self, shape: str) -> None:
        import torch

        from fastinfer.bench.random_model import SHAPES, shape_config, weight_bytes_per_token

        a = self.args
        res: dict[str, Any] = {"sections": {}}
        self.doc["shapes"][shape] = res
        if shape not in SHAPES:
            res["error"] = f"unknown shape {shape!r}; known: {', '.join(SHAPES)}"
            self.doc["errors"].append({"section": shape, "error": res["error"]})
            return
        cfg = shape_config(shape)
        wbytes = weight_bytes_per_token(cfg, 2)
        res["weight_bytes_per_token"] = wbytes
        res["params_per_token_read"] = wbytes // 2
        big = shape == "llama-3.1-8b"
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            if total < 2.5 * wbytes:
                why = (f"skipped: {total / 2**30:.0f} GiB of GPU memory is too little for {wbytes / 2**30:.1f} GiB of "
                       "weights and room to run")
                res["skipped"] = why
                self.doc["skipped"].append({"section": shape, "reason": why})
                print(f"{shape}: {why}")
                return
        need_build = 90 if big else 30
        state: dict[str, Any] = {}

        def put(key):
            return lambda r: res["sections"].__setitem__(key, r)

        self.section(f"{shape}: build", lambda: self.build(shape, state), put("build"),
                     needs_s=need_build + (60 if big else 20))
        folder = state.get("folder")
        if folder is None:
            return
        # fastinfer
        fi_ok = self.section(f"{shape}: fastinfer start-up", lambda: self.fi_start(folder, state),
                             put("fastinfer_startup"), needs_s=30 if big else 15)
        workload = self.section(f"{shape}: workload", lambda: self.make_workload(folder, state),
                                lambda r: res.__setitem__("workload", r))
        if fi_ok is not None:
            self.section(f"{shape}: fastinfer single-stream decode", lambda: self.fi_decode(state, wbytes),
                         put("fastinfer_decode"), needs_s=15)
            self.section(f"{shape}: fastinfer single-stream decode, async scheduling",
                         lambda: self.fi_decode(state, wbytes, asynchronous=True), put("fastinfer_decode_async"),
                         needs_s=15)
            self.section(f"{shape}: fastinfer decode step profile", lambda: self.fi_step_profile(state),
                         put("fastinfer_step_profile"), needs_s=10)
            n_req = a.num_requests
            if big:
                n_req = a.num_requests_8b or (a.num_requests if self.left() > 200 else min(128, a.num_requests))
            state["n_req"] = n_req
            if workload is not None:
                self.section(f"{shape}: fastinfer throughput ({n_req} requests)",
                             lambda: self.fi_throughput(state, n_req), put("fastinfer_throughput"),
                             needs_s=40 if big else 25)
                self.section(f"{shape}: fastinfer throughput ({n_req} requests), async scheduling",
                             lambda: self.fi_throughput(state, n_req, asynchronous=True),
                             put("fastinfer_throughput_async"),
                             needs_s=(40 if big else 25) + 240)  # only with time to spare for the baselines
                if not a.no_baselines:
                    self.section(f"{shape}: fastinfer throughput on the baselines' subset",
                                 lambda: self.fi_throughput(state, self.baseline_n(big)), put("fastinfer_subset"),
                                 needs_s=15)
        state.pop("llm", None)
        free_memory()
        res["memory_after_fastinfer"] = _gpu_memory()
        if a.no_baselines:
            self.ratios(res)
            return
        # transformers
        have_hf = self.section(f"{shape}: transformers load", lambda: self.hf_load(folder, state), None,
                               needs_s=20 if big else 10)
        if have_hf is not None:
            self.section(f"{shape}: transformers single-stream decode", lambda: self.hf_decode(state, wbytes),
                         put("transformers_decode"), needs_s=25)
            if workload is not None:
                self.section(f"{shape}: transformers batched throughput ({self.baseline_n(big)} requests)",
                             lambda: self.hf_throughput(state, self.baseline_n(big)), put("transformers_throughput"),
                             needs_s=60 if big else 40)
        # torch.compile plain loop
        if not a.no_compile and have_hf is not None:
            self.section(f"{shape}: torch.compile single-stream decode", lambda: self.compiled_decode(state, wbytes),
                         put("compiled_decode"), needs_s=90 if big else 60)
            later = 150 if (not big and "llama-3.1-8b" in a.shapes) else 0  # keep time for the 8B shape
            if workload is not None:
                self.section(f"{shape}: torch.compile batched throughput ({self.baseline_n(big)} requests)",
                             lambda: self.compiled_throughput(state, self.baseline_n(big)),
                             put("compiled_throughput"), needs_s=(120 if big else 80) + later)
        for key in ("hf", "plain", "llm"):
            state.pop(key, None)
        CompiledDecoder.reset()
        free_memory()
        self.ratios(res)
        self.write()

    def baseline_n(self, big: bool) -> int:
        return self.args.baseline_requests_8b if big else self.args.baseline_requests

    # --------------------------------------------------------------- build
    def build(self, shape: str, state: dict) -> dict:
        import torch

        from fastinfer.bench.random_model import build_random_llama, is_built, write_folder

        folder = os.path.join(self.args.model_dir, shape)
        t = now()
        if is_built(folder, shape, torch.bfloat16, self.args.seed):
            state["folder"] = folder
            return {"folder": folder, "reused": True, "seconds": round(now() - t, 1)}
        model = build_random_llama(shape, torch.bfloat16, self.args.seed, self.device)
        sync(self.device)
        built = now() - t
        write_folder(model, folder, shape, self.args.seed)
        saved = now() - t - built
        # kept for the baselines, off the GPU while fastinfer runs
        state["hf"] = model.to("cpu") if self.device == "cuda" else model
        free_memory()
        state["folder"] = folder
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        return {"folder": folder, "reused": False, "build_seconds": round(built, 1), "save_seconds": round(saved, 1),
                "folder_bytes": size}

    # --------------------------------------------------------------- fastinfer
    def fi_start(self, folder: str, state: dict) -> dict:
        from fastinfer import LLM

        a = self.args
        opts = dict(device=self.device, dtype="bfloat16" if self.device == "cuda" else "float32",
                    max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)
        if self.device == "cuda":
            opts.update(gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager)
        else:
            opts.update(kv_cache_memory="512MiB")
        if a.max_num_batched_tokens:
            opts["max_num_batched_tokens"] = a.max_num_batched_tokens
        if a.ops_backend:
            opts["ops_backend"] = a.ops_backend
        t = now()
        llm = LLM(folder, **opts)
        sync(self.device)
        state["llm"] = llm
        out = {"seconds": round(now() - t, 1), "options": opts, "stats": llm.stats()}
        cfg = llm.config
        keys = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization", "block_size",
                "enable_chunked_prefill")
        out["config"] = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
        out["config"]["enforce_eager"] = getattr(cfg, "enforce_eager", None)
        out["config"]["ops_backend"] = getattr(cfg, "ops_backend", None)
        runner = getattr(llm.engine, "runner", None)
        graphs = getattr(runner, "graphs", None)
        out["cuda_graphs"] = None if graphs is None else len(getattr(graphs, "graphs", {}) or {}) or "emulated"
        out["activation_bytes"] = getattr(llm.engine, "activation_bytes", None)
        out["memory"] = _gpu_memory()
        return out

    def make_workload(self, folder: str, state: dict) -> dict:
        """The mixed workload of ``fastinfer.bench.workload`` (prompts cut from CPython's
        ``pydoc_data`` text; where a Python lacks it, from the standard library's docstrings)
        and the single-stream prompt."""
        from fastinfer.bench import workload as wl
        from fastinfer.model.tokenizer import Tokenizer

        a = self.args
        tok = Tokenizer.from_folder(folder)
        n = max(a.num_requests, a.num_requests_8b or 0, a.baseline_requests)
        source = "pydoc_data"
        try:
            import pydoc_data.topics  # noqa: F401
        except ImportError:
            from fastinfer.bench.random_model import _corpus

            text_ids = tok.encode(_corpus())

            def corpus_token_ids(_tok, min_tokens: int) -> list[int]:
                ids = list(text_ids)
                while len(ids) < min_tokens:
                    ids += ids
                return ids

            wl.corpus_token_ids = corpus_token_ids  # mixed_workload reads it from its module
            source = "standard library docstrings (no pydoc_data here)"
        state["workload"] = wl.mixed_workload(tok, n, a.input_range, a.output_range, a.seed, "mixed")
        state["decode_prompt"] = wl.corpus_token_ids(tok, a.prompt_len)[:a.prompt_len]
        return {"num_requests": n, "input_range": a.input_range, "output_range": a.output_range, "seed": a.seed,
                "text": source}

    def fi_decode(self, state: dict, wbytes: int, asynchronous: bool = False) -> dict:
        """Batch-1 decode; ``asynchronous`` switches the same engine to async scheduling for it."""
        with async_scheduling(state["llm"], asynchronous):
            return self._fi_decode(state, wbytes)

    def _fi_decode(self, state: dict, wbytes: int) -> dict:
        from fastinfer import SamplingParams

        llm, prompt, n = state["llm"], state["decode_prompt"], self.args.decode_tokens
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        llm.generate([prompt], SamplingParams(max_tokens=min(n, 32), temperature=0.0, ignore_eos=True), use_tqdm=False)
        runs = []
        for _ in range(2):
            out = llm.generate([prompt], sp, use_tqdm=False)[0]
            m = out.metrics
            got = len(out.outputs[0].token_ids)
            runs.append({"tokens": got, "ttft_ms": (m.first_token_time - m.arrival_time) * 1e3,
                         "decode_s": m.finished_time - m.first_token_time,
                         "tok_s": (got - 1) / (m.finished_time - m.first_token_time)})
        best = max(runs, key=lambda r: r["tok_s"])
        return self.decode_result(best["tok_s"], best["ttft_ms"], wbytes, runs=runs)

    def fi_step_profile(self, state: dict, steps: int = 48) -> dict:
        """Where a batch-1 decode step's time goes: the wall time per step, the time the host
        spends in the runner (graph replay and LM head enqueued), in the sampler (which waits for
        the GPU) and elsewhere (scheduling, detokenizing, outputs), and the GPU's busy time per
        step from torch.profiler with its top kernels."""
        import time as _time

        import torch

        from fastinfer import SamplingParams

        llm, prompt = state["llm"], state["decode_prompt"]
        engine = llm.engine
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
        for _ in range(4):  # the prefill and a few decode steps first
            engine.step()
        spent = {"runner": 0.0, "sampler": 0.0}

        def timed(name, fn):
            def wrapper(*a, **k):
                t0 = _time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += _time.perf_counter() - t0
            return wrapper

        real_exec, real_sampler = engine.runner.execute, engine.sampler
        engine.runner.execute, engine.sampler = timed("runner", real_exec), timed("sampler", real_sampler)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if str(self.device).startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            sync(self.device)
            with torch.profiler.profile(activities=activities) as prof:
                t0 = _time.perf_counter()
                for _ in range(steps):
                    engine.step()
                sync(self.device)
                wall = _time.perf_counter() - t0
        finally:
            engine.runner.execute, engine.sampler = real_exec, real_sampler
            while engine.has_unfinished():
                engine.step()
        kernels = []
        for ev in prof.key_averages():
            dev_us = getattr(ev, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(ev, "self_cuda_time_total", 0)
            if dev_us and dev_us > 0:
                kernels.append((ev.key, dev_us, ev.count))
        kernels.sort(key=lambda k: -k[1])
        gpu_us = sum(k[1] for k in kernels)
        per = 1e3 / steps
        return {"steps": steps, "wall_ms_per_step": wall * per,
                "host_runner_ms_per_step": spent["runner"] * per, "host_sampler_ms_per_step": spent["sampler"] * per,
                "host_other_ms_per_step": (wall - spent["runner"] - spent["sampler"]) * per,
                "gpu_busy_ms_per_step": gpu_us / 1e3 / steps,
                "top_kernels": [{"name": n[:120], "us_per_step": us / steps, "calls_per_step": c / steps}
                                for n, us, c in kernels[:10]],
                "note": "host times include the profiler's own overhead; the sampler's time includes its wait for "
                        "the GPU (the token ids are read back)"}

    def decode_result(self, tok_s: float, ttft_ms: float | None, wbytes: int, **extra) -> dict:
        bw = self.doc["bandwidth"]
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

    def fi_throughput(self, state: dict, n: int, asynchronous: bool = False) -> dict:
        with async_scheduling(state["llm"], asynchronous):
            return self._fi_throughput(state, n)

    def _fi_throughput(self, state: dict, n: int) -> dict:
        from fastinfer import SamplingParams

        llm, w = state["llm"], state["workload"]
        prompts, outs = w.prompts[:n], w.output_lens[:n]
        if not state.get("fi_warm"):  # prefill/chunk shapes compiled outside the timing
            llm.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
            state["fi_warm"] = True
        params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outs]
        _reset_peak()
        sync(self.device)
        t = now()
        results = llm.generate(prompts, params, use_tqdm=False)
        sync(self.device)
        wall = now() - t
        got = [len(r.outputs[0].token_ids) for r in results]
        if got != list(outs):
            raise RuntimeError(f"fastinfer generated {sum(got)} tokens, expected {sum(outs)} (ignore_eos)")
        ttft = [(r.metrics.first_token_time - r.metrics.arrival_time) * 1e3 for r in results]
        tpot = [(r.metrics.finished_time - r.metrics.first_token_time) * 1e3 / (k - 1)
                for r, k in zip(results, got) if k > 1]
        e2e = [(r.metrics.finished_time - r.metrics.arrival_time) * 1e3 for r in results]
        return throughput_result(n, sum(len(p) for p in prompts), sum(got), wall, ttft, tpot, e2e,
                                 stats=llm.stats(), peak_allocated_gib=_peak_gib())

    # --------------------------------------------------------------- transformers
    def hf_load(self, folder: str, state: dict) -> dict:
        import torch

        t = now()
        if state.get("hf") is None:
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            state["hf"] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        hf = state["hf"].to(self.device)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        state["hf"] = hf
        sync(self.device)
        return {"seconds": round(now() - t, 1)}

    def hf_generate(self, hf, ids, mask, n: int, streamer=None):
        kwargs = {}
        if self.args.hf_cache == "static":
            kwargs["cache_implementation"] = "static"
        from fastinfer.bench.systems import hf_generate

        if kwargs:
            import torch

            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                                   do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                   pad_token_id=0, streamer=streamer, **kwargs)
        return hf_generate(hf, ids, mask, n, streamer)

    def hf_decode(self, state: dict, wbytes: int) -> dict:
        import torch

        from fastinfer.bench.systems import _StepClock

        hf, n = state["hf"], self.args.decode_tokens
        ids = torch.tensor([state["decode_prompt"]], device=self.device)
        self.hf_generate(hf, ids, None, 8)  # warm-up
        clock = _StepClock()
        t = time.monotonic()
        self.hf_generate(hf, ids, None, n, clock)
        times = clock.times
        tok_s = (len(times) - 1) / (times[-1] - times[0])
        return self.decode_result(tok_s, (times[0] - t) * 1e3, wbytes, cache=self.args.hf_cache)

    def hf_throughput(self, state: dict, n: int) -> dict:
        """Static batches of ``baseline_batch`` requests, left-padded; a batch runs until its
        longest request is done and each request counts only its own tokens (as
        ``fastinfer.bench.systems.TransformersBatchedSystem``)."""
        import torch

        from fastinfer.bench.systems import _StepClock

        w, b = state["workload"], self.args.baseline_batch
        prompts, outs = w.prompts[:n], w.output_lens[:n]
        self.hf_generate(state["hf"], torch.tensor([prompts[0][:16]], device=self.device), None, 2)  # warm-up
        ttft, tpot, e2e, out_tokens = [], [], [], 0
        _reset_peak()
        sync(self.device)
        t, arrival = now(), time.monotonic()
        for i in range(0, n, b):
            batch, lens = prompts[i:i + b], outs[i:i + b]
            width = max(len(p) for p in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, p in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            clock = _StepClock()
            self.hf_generate(state["hf"], ids.to(self.device), mask.to(self.device), max(lens), clock)
            steps = clock.times
            if len(steps) < max(lens):
                raise RuntimeError(f"transformers generated {len(steps)} steps, expected {max(lens)}")
            for k in lens:
                ttft.append((steps[0] - arrival) * 1e3)
                e2e.append((steps[k - 1] - arrival) * 1e3)
                if k > 1:
                    tpot.append((steps[k - 1] - steps[0]) * 1e3 / (k - 1))
                out_tokens += k
        sync(self.device)
        wall = now() - t
        return throughput_result(n, sum(len(p) for p in prompts), out_tokens, wall, ttft, tpot, e2e, batch=b,
                                 cache=self.args.hf_cache, peak_allocated_gib=_peak_gib())

    # --------------------------------------------------------------- torch.compile
    def plain(self, state: dict, batch: int, max_seq: int):
        """The gpt-fast style model over the transformers model's weights (built once per
        batch size / cache length)."""
        key = (batch, max_seq)
        if state.get("plain_key") != key:
            state.pop("plain", None)
            CompiledDecoder.reset()  # the old graphs hold the old model's memory
            free_memory()
            state["plain"] = PlainLlama(state["hf"], batch, max_seq)
            state["plain_key"] = key
        return state["plain"]

    def compiled_decode(self, state: dict, wbytes: int) -> dict:
        prompt, n = state["decode_prompt"], self.args.decode_tokens
        model = self.plain(state, 1, _round_up(len(prompt) + n, 128))
        runner = CompiledDecoder(model, self.device)
        t = now()
        runner.generate([prompt], [8])  # compiles, records the graphs
        compile_s = now() - t
        runner.generate([prompt], [8])
        res = runner.generate([prompt], [n])
        tok_s = (n - 1) / res["decode_s"]
        return self.decode_result(tok_s, res["prefill_s"] * 1e3, wbytes, compile_seconds=round(compile_s, 1),
                                  mode=runner.mode)

    def compiled_throughput(self, state: dict, n: int) -> dict:
        w = state["workload"]
        prompts, outs = w.prompts[:n], w.output_lens[:n]
        b = self.args.baseline_batch
        max_seq = _round_up(max(len(p) for p in prompts) + max(outs), 128)
        model = self.plain(state, b, max_seq)
        runner = CompiledDecoder(model, self.device)
        t = now()
        runner.generate(prompts[:b], [4] * min(b, len(prompts)))  # compiles for this batch size
        compile_s = now() - t
        _reset_peak()
        sync(self.device)
        t = now()
        ttft, tpot, e2e, out_tokens = [], [], [], 0
        arrival = time.monotonic()
        for i in range(0, n, b):
            res = runner.generate(prompts[i:i + b], outs[i:i + b], arrival=arrival)
            ttft += res["ttft_ms"]
            tpot += res["tpot_ms"]
            e2e += res["e2e_ms"]
            out_tokens += res["output_tokens"]
        sync(self.device)
        wall = now() - t
        return throughput_result(n, sum(len(p) for p in prompts), out_tokens, wall, ttft, tpot, e2e, batch=b,
                                 compile_seconds=round(compile_s, 1), peak_allocated_gib=_peak_gib(),
                                 note="static batches, left padding, eager prefill, compiled decode over the whole "
                                      "static cache")

    # --------------------------------------------------------------- ratios
    def ratios(self, res: dict) -> None:
        s = res["sections"]

        def val(key, field):
            v = s.get(key)
            return v.get(field) if isinstance(v, dict) else None

        r = {}
        fi = val("fastinfer_decode", "tok_s")
        for base in ("transformers", "compiled"):
            other = val(f"{base}_decode", "tok_s")
            if fi and other:
                r[f"decode_vs_{base}"] = fi / other
            theirs = val(f"{base}_throughput", "output_tok_s")
            ours = val("fastinfer_subset", "output_tok_s")
            if ours and theirs:
                r[f"throughput_vs_{base}_same_subset"] = ours / theirs
        res["ratios"] = r


# ----------------------------------------------------------------------------- throughput record

@contextlib.contextmanager
def async_scheduling(llm, on: bool):
    """``llm``'s engine with ``EngineConfig.async_scheduling`` switched to ``on`` for a while."""
    engine = llm.engine
    before, engine.async_scheduling = engine.async_scheduling, on
    try:
        yield
    finally:
        engine.async_scheduling = before


def throughput_result(n, prompt_tokens, output_tokens, wall, ttft, tpot, e2e, **extra) -> dict:
    out = {"requests": n, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "seconds": wall,
           "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
           "request_s": n / wall, "ttft_ms": pct(ttft), "tpot_ms": pct(tpot), "e2e_ms": pct(e2e)}
    out.update(extra)
    return out


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _gpu_memory():
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
            "used_on_device_gib": round((total - free) / 2**30, 2), "total_gib": round(total / 2**30, 2)}


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------- kernels

def kernel_cases(s: dict, dtype) -> list[dict]:
    """Inputs of each op at decode-relevant sizes of a shape (dict of random_model.SHAPES), with
    the bytes an implementation must move (read + write, each tensor once)."""
    import torch

    from fastinfer.ops.metadata import AttentionMetadata

    dev, e = "cuda", torch.finfo(dtype).bits // 8
    H, I = s["hidden_size"], s["intermediate_size"]
    nh, nkv, hd = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt)

    cases = []
    for T in (64, 4096):
        label = f"T={T}" + (" (decode batch)" if T == 64 else " (prefill chunk)")
        x, res, w = rnd(T, H), rnd(T, H), rnd(H)
        cases.append(dict(op="rms_norm", size=label, args=(x, w, 1e-5), bytes=2 * T * H * e + H * e))
        cases.append(dict(op="add_rms_norm", size=label, args=(x, res, w, 1e-5), bytes=4 * T * H * e + H * e))
        cases.append(dict(op="silu_and_mul", size=f"{label}, d={I}", args=(rnd(T, 2 * I),), bytes=3 * T * I * e))
        qkv = rnd(T, (nh + 2 * nkv) * hd)  # q and k as the model has them: strided views of the qkv output
        q = qkv[:, :nh * hd].view(T, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
        v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
        max_pos = 4096
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(max_pos, device=dev, dtype=torch.float32), inv)
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
        positions = torch.randint(0, max_pos, (T,), generator=g, device=dev)
        cases.append(dict(op="rotary_embedding", size=f"{label}, {nh}/{nkv} heads x {hd}",
                          args=(positions, q, k, cos_sin),
                          bytes=2 * T * (nh + nkv) * hd * e + T * hd * 4 + T * 8))
        bs, nblocks = 16, max(T // 16 * 2, 64)
        kc = torch.zeros(nblocks, bs, nkv, hd, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(nblocks * bs, generator=g, device=dev)[:T]
        cases.append(dict(op="reshape_and_cache", size=f"{label}, {nkv} kv heads x {hd}",
                          args=(k, v, kc, vc, slots, None, None), bytes=4 * T * nkv * hd * e + T * 8))
    # decode attention: batch 64, context 2048, paged with shuffled blocks
    B, ctx, bs = 64, 2048, 16
    per = ctx // bs
    nblocks = B * per
    kc = rnd(nblocks, bs, nkv, hd)
    vc = rnd(nblocks, bs, nkv, hd)
    tables = torch.randperm(nblocks, generator=g, device=dev).view(B, per)
    q = rnd(B, nh, hd)
    slots = tables[:, -1] * bs + (bs - 1)
    qsl = list(range(B + 1))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, context_lens=[ctx] * B, block_tables=tables,
                             max_query_len=1,
                             query_start_loc_tensor=torch.tensor(qsl, dtype=torch.int64, device=dev),
                             context_lens_tensor=torch.full((B,), ctx, dtype=torch.int64, device=dev))
    cases.append(dict(op="paged_attention", size=f"decode B={B}, context {ctx}, {nh}/{nkv} heads x {hd}, block {bs}",
                      args=(q, kc, vc, meta, hd ** -0.5, None, None),
                      bytes=2 * B * ctx * nkv * hd * e + 2 * B * nh * hd * e + B * per * 8))
    return cases


def time_kernel_case(case: dict, peak: float | None) -> list[dict]:
    """One row per backend of ``case['op']`` (triton, cuda, reference; others too when
    registered): median time by ``do_bench`` (L2 flushed between runs) and by CUDA-graph replay."""
    import torch
    import triton.testing

    from fastinfer.ops import implementations

    rows = []
    for impl in implementations(case["op"]):
        if impl.backend.startswith("cpu"):
            continue
        row = {"op": case["op"], "backend": impl.backend, "size": case["size"], "bytes": case["bytes"]}
        rows.append(row)
        args = case["args"]
        try:
            if not impl.applies(*args):
                row["note"] = "does not apply to these inputs"
                continue
            fn = (lambda f=impl.fn: f(*args))
            fn()
            torch.cuda.synchronize()
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
            except TypeError:  # older triton: quantiles
                ms = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])[0]
            row["us"] = ms * 1e3
            row["GBps"] = case["bytes"] / (ms * 1e-3) / 1e9
            if peak:
                row["fraction_of_peak"] = case["bytes"] / (ms * 1e-3) / peak
            if impl.backend != "reference":
                try:
                    gms = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                    row["us_graph"] = gms * 1e3
                    row["GBps_graph"] = case["bytes"] / (gms * 1e-3) / 1e9
                except Exception as exc:  # noqa: BLE001 - graph timing is a bonus
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            free_memory()
    return rows


# ----------------------------------------------------------------------------- plain torch Llama

def _plain_classes():
    import torch
    import torch.nn.functional as F

    class Layer(torch.nn.Module):
        pass

    class PlainLlamaImpl(torch.nn.Module):
        """A minimal Llama forward in plain torch (gpt-fast style) over a transformers model's
        weights: fused qkv and gate/up matrices, static KV cache ``[B, Hkv, S, D]`` per layer,
        rotate-half rotary from the model's own (scaled) frequencies, SDPA with a mask
        (left padding: row ``b``'s keys start at ``pad[b]``)."""

        def __init__(self, hf, batch: int, max_seq: int) -> None:
            super().__init__()
            cfg, m = hf.config, hf.model
            self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
            self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
            self.eps, self.batch, self.max_seq = cfg.rms_norm_eps, batch, max_seq
            w = m.embed_tokens.weight
            dev, dt = w.device, w.dtype
            self.register_buffer("embed", w.detach(), persistent=False)
            self.register_buffer("lm_head", hf.lm_head.weight.detach(), persistent=False)
            self.register_buffer("norm", m.norm.weight.detach(), persistent=False)
            self.layers = torch.nn.ModuleList()
            with torch.no_grad():
                for L in m.layers:
                    a, f, mod = L.self_attn, L.mlp, Layer()
                    mod.register_buffer("wqkv", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                                        persistent=False)
                    mod.register_buffer("wo", a.o_proj.weight.detach(), persistent=False)
                    mod.register_buffer("wgu", torch.cat([f.gate_proj.weight, f.up_proj.weight]), persistent=False)
                    mod.register_buffer("wd", f.down_proj.weight.detach(), persistent=False)
                    mod.register_buffer("ln1", L.input_layernorm.weight.detach(), persistent=False)
                    mod.register_buffer("ln2", L.post_attention_layernorm.weight.detach(), persistent=False)
                    mod.register_buffer("k_cache", torch.zeros(batch, self.nkv, max_seq, self.hd, dtype=dt, device=dev),
                                        persistent=False)
                    mod.register_buffer("v_cache", torch.zeros_like(mod.k_cache), persistent=False)
                    self.layers.append(mod)
            rot = m.rotary_emb
            inv = rot.inv_freq.to(device=dev, dtype=torch.float32)
            scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
            freqs = torch.outer(torch.arange(max_seq, device=dev, dtype=torch.float32), inv)
            self.register_buffer("cos", (freqs.cos() * scale).to(dt), persistent=False)
            self.register_buffer("sin", (freqs.sin() * scale).to(dt), persistent=False)
            self.register_buffer("pad", torch.zeros(batch, dtype=torch.int64, device=dev), persistent=False)
            self.register_buffer("kpos", torch.arange(max_seq, device=dev), persistent=False)

        def rms(self, x, w):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

        @staticmethod
        def rope(x, cos, sin):
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

        def forward(self, tokens, input_pos):
            """``tokens [B, T]`` at cache positions ``input_pos [T]`` -> last position's logits
            ``[B, vocab]`` (float32)."""
            B, T = tokens.shape
            nh, nkv, hd = self.nh, self.nkv, self.hd
            h = F.embedding(tokens, self.embed)
            pos = (input_pos[None, :] - self.pad[:, None]).clamp(min=0)  # rotary positions [B, T]
            cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]
            kp, qp = self.kpos[None, None, :], input_pos[None, :, None]
            # keys of the row's own tokens up to the query; a padded query sees only itself
            mask = ((kp <= qp) & (kp >= self.pad[:, None, None])) | (kp == qp)
            mask = mask[:, None]  # [B, 1, T, S]
            for L in self.layers:
                x = self.rms(h, L.ln1)
                q, k, v = F.linear(x, L.wqkv).split([nh * hd, nkv * hd, nkv * hd], -1)
                q = self.rope(q.view(B, T, nh, hd), cos, sin).transpose(1, 2)
                k = self.rope(k.view(B, T, nkv, hd), cos, sin).transpose(1, 2)
                v = v.view(B, T, nkv, hd).transpose(1, 2)
                L.k_cache.index_copy_(2, input_pos, k)
                L.v_cache.index_copy_(2, input_pos, v)
                o = F.scaled_dot_product_attention(q, L.k_cache, L.v_cache, attn_mask=mask, enable_gqa=nh != nkv)
                h = h + F.linear(o.transpose(1, 2).reshape(B, T, nh * hd), L.wo)
                gate, up = F.linear(self.rms(h, L.ln2), L.wgu).chunk(2, -1)
                h = h + F.linear(F.silu(gate) * up, L.wd)
            return F.linear(self.rms(h[:, -1], self.norm), self.lm_head).float()

    return PlainLlamaImpl


def PlainLlama(hf, batch: int, max_seq: int):  # noqa: N802 - a class built lazily (torch imported late)
    return _plain_classes()(hf, batch, max_seq).eval()


def _decode_one(model, cur, input_pos):
    return model(cur[:, None], input_pos).argmax(-1)


class CompiledDecoder:
    """Greedy generation with :func:`PlainLlama`: eager prefill of a left-padded static batch,
    then one compiled decode step per token (``mode="reduce-overhead"``: CUDA graphs; on a CPU,
    inductor's default mode)."""

    _compiled: dict = {}

    @classmethod
    def reset(cls) -> None:
        """Drops the compiled step and its CUDA graphs (their memory pools)."""
        if cls._compiled:
            cls._compiled.clear()
            import torch

            torch._dynamo.reset()

    def __init__(self, model, device: str) -> None:
        import torch

        self.model, self.device = model, torch.device(device)
        self.mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        key = (id(model), self.mode)
        if key not in CompiledDecoder._compiled:
            CompiledDecoder._compiled.clear()  # one model at a time
            CompiledDecoder._compiled[key] = torch.compile(_decode_one, mode=self.mode, fullgraph=True, dynamic=False)
        self.step = CompiledDecoder._compiled[key]

    def generate(self, prompts: list[list[int]], new_tokens: list[int], arrival: float | None = None) -> dict:
        import torch

        m, dev, B = self.model, self.device, self.model.batch
        real = len(prompts)
        prompts = list(prompts) + [prompts[0]] * (B - real)  # pad the batch with copies (not counted)
        lens = list(new_tokens) + [1] * (B - real)
        width = max(len(p) for p in prompts)
        n = max(lens)
        if width + n > m.max_seq:
            raise ValueError(f"{width} + {n} tokens exceed the static cache ({m.max_seq})")
        ids = torch.zeros(B, width, dtype=torch.int64)
        pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        arrival = time.monotonic() if arrival is None else arrival
        with torch.no_grad():
            m.pad.copy_(pad)
            pos = torch.tensor([width - 1], dtype=torch.int64, device=dev)  # advanced on the device
            t0 = time.monotonic()
            logits = m(ids.to(dev), torch.arange(width, device=dev))
            cur = logits.argmax(-1)
            out = torch.empty(B, n, dtype=torch.int64, device=dev)
            out[:, 0] = cur
            sync(dev)
            t_first = time.monotonic()
            for i in range(1, n):
                if self.mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                pos += 1  # the cache position of ``cur``
                nxt = self.step(m, cur, pos)
                out[:, i] = nxt
                cur = nxt.clone()
            sync(dev)
            t_end = time.monotonic()
        # tokens arrive at a steady rate after the first: a request of k tokens ends at step k
        per = (t_end - t_first) / max(n - 1, 1)
        done = [t_first + (k - 1) * per for k in lens[:real]]
        return {"prefill_s": t_first - t0, "decode_s": t_end - t_first, "output_tokens": sum(lens[:real]),
                "ttft_ms": [(t_first - arrival) * 1e3] * real,
                "tpot_ms": [per * 1e3 for k in lens[:real] if k > 1],
                "e2e_ms": [(d - arrival) * 1e3 for d in done], "tokens": out[:real].tolist()}


# ----------------------------------------------------------------------------- reports

def to_markdown(doc: dict) -> str:
    env, bw = doc.get("env", {}), doc.get("bandwidth", {})
    lines = ["# fastinfer GPU benchmark", ""]
    lines.append(f"- GPU: **{env.get('gpu')}** (compute capability {env.get('capability')}, "
                 f"{env.get('gpu_memory_gib')} GiB, {env.get('sm_count')} SMs, driver {env.get('driver')})")
    lines.append(f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), "
                 f"triton {env.get('triton')}, transformers {env.get('transformers')}; "
                 f"fastinfer {env.get('fastinfer')} "
                 f"at {str(env.get('git_sha'))[:12]}{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
                 f"CUDA extension built: {env.get('fastinfer_cuda_extension')}")
    table = bw.get("table_bytes_per_s")
    sheet = f"{fmt(table / 1e9)} GB/s ({bw.get('table_entry')})" if table else "unknown for this GPU"
    frac = bw.get("copy_fraction_of_table")
    lines.append(f"- peak HBM bandwidth: data sheet {sheet}; measured device copy (1 GiB, read + write) "
                 f"{fmt(bw.get('copy_GBps'))} GB/s" + (f" = {frac:.0%} of the data sheet" if frac else ""))
    lines.append(f"- roofline fractions below: weight bytes per token x tok/s / peak, against the data sheet "
                 f"({'used' if table else 'n/a'}) and against the measured copy bandwidth")
    lines.append(f"- command: `{doc.get('command')}`; started {doc.get('started')}, {doc.get('elapsed_s')} s, "
                 f"budget {doc.get('args', {}).get('budget_s')} s")
    lines.append("")

    shapes = doc.get("shapes", {})
    # single-stream decode
    rows = [["shape", "system", "tok/s", "ms/token", "TTFT ms", "% data-sheet peak", "% measured copy", "fastinfer x"]]
    for shape, res in shapes.items():
        s = res.get("sections", {})
        fi = _get(s, "fastinfer_decode", "tok_s")
        for key, name in (("fastinfer_decode", "fastinfer"),
                          ("fastinfer_decode_async", "fastinfer, async scheduling"), ("transformers_decode", "transformers"),
                          ("compiled_decode", "torch.compile plain loop")):
            r = s.get(key)
            if r is None:
                continue
            if "tok_s" not in r:
                rows.append([shape, name, _why(r), "", "", "", "", ""])
                continue
            ratio = "" if key.startswith("fastinfer_decode") or not fi else f"{fi / r['tok_s']:.2f}x"
            rows.append([shape, name, fmt(r["tok_s"]), fmt(r["ms_per_token"]), fmt(r.get("ttft_ms")),
                         _pct(r.get("fraction_of_table_peak")), _pct(r.get("fraction_of_measured_copy")), ratio])
    a = doc.get("args", {})
    lines += [f"## Single-stream decode (batch 1, {a.get('prompt_len')}-token prompt, {a.get('decode_tokens')} new "
              "tokens, greedy, EOS ignored; tok/s after the first token)", ""]
    lines += _md_table(rows) + [""]
    prof_rows = [["shape", "wall ms/step", "GPU busy ms/step", "host: runner ms", "host: sampler (waits) ms",
                  "host: rest ms", "top GPU kernels (us/step)"]]
    for shape, res in shapes.items():
        r = res.get("sections", {}).get("fastinfer_step_profile")
        if not r or "wall_ms_per_step" not in r:
            continue
        top = "; ".join(f"{k['name'][:48]} {k['us_per_step']:.0f}" for k in r["top_kernels"][:5])
        prof_rows.append([shape, fmt(r["wall_ms_per_step"]), fmt(r["gpu_busy_ms_per_step"]),
                          fmt(r["host_runner_ms_per_step"]), fmt(r["host_sampler_ms_per_step"]),
                          fmt(r["host_other_ms_per_step"]), top])
    if len(prof_rows) > 1:
        lines += ["### Where a batch-1 decode step goes (torch.profiler; host times include its overhead)", ""]
        lines += _md_table(prof_rows) + [""]
    # throughput
    rows = [["shape", "system", "requests", "out tok/s", "total tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
             "time s", "peak GiB", "fastinfer x (same requests)"]]
    for shape, res in shapes.items():
        s = res.get("sections", {})
        sub = _get(s, "fastinfer_subset", "output_tok_s")
        for key, name in (("fastinfer_throughput", "fastinfer"),
                          ("fastinfer_throughput_async", "fastinfer, async scheduling"),
                          ("fastinfer_subset", "fastinfer (baselines' subset)"),
                          ("transformers_throughput", "transformers batched"),
                          ("compiled_throughput", "torch.compile plain loop, batched")):
            r = s.get(key)
            if r is None:
                continue
            if "output_tok_s" not in r:
                rows.append([shape, name, _why(r)] + [""] * 7)
                continue
            ratio = f"{sub / r['output_tok_s']:.2f}x" if sub and key in ("transformers_throughput",
                                                                       "compiled_throughput") else ""
            rows.append([shape, name, str(r["requests"]), fmt(r["output_tok_s"]), fmt(r["total_tok_s"]),
                         _p3(r["ttft_ms"]), _p3(r["tpot_ms"]), fmt(r["seconds"]), fmt(r.get("peak_allocated_gib")),
                         ratio])
    lines += [f"## Mixed workload (prompts {a.get('input_range')}, outputs {a.get('output_range')} tokens, seed "
              f"{a.get('seed')}, all submitted at once, greedy, EOS ignored)", "",
              "The baselines run the first requests of the same workload (static batches of "
              f"{a.get('baseline_batch')}, left padding); fastinfer's ratio is taken on those same requests.", ""]
    lines += _md_table(rows) + [""]
    # start-up / build
    rows = [["shape", "weights read per token GB", "build", "fastinfer start-up s", "KV blocks", "KV cache GiB",
             "CUDA graphs", "compile s (b1 / batched)"]]
    for shape, res in shapes.items():
        s = res.get("sections", {})
        b, st = s.get("build") or {}, s.get("fastinfer_startup") or {}
        stats = st.get("stats") or {}
        build = _why(b) if ("error" in b or "skipped" in b) else (
            "reused" if b.get("reused") else f"{fmt(b.get('build_seconds'))} s + save {fmt(b.get('save_seconds'))} s")
        rows.append([shape, fmt((res.get("weight_bytes_per_token") or 0) / 1e9), build,
                     _why(st) if ("error" in st or "skipped" in st) else fmt(st.get("seconds")),
                     fmt(stats.get("kv_blocks_total")),
                     fmt((stats.get("kv_cache_bytes") or 0) / 2**30) if stats else "-",
                     str(st.get("cuda_graphs")), f"{fmt(_get(s, 'compiled_decode', 'compile_seconds'))} / "
                                                 f"{fmt(_get(s, 'compiled_throughput', 'compile_seconds'))}"])
    lines += ["## Models and start-up", ""] + _md_table(rows) + [""]
    # kernels
    k = doc.get("kernels") or {}
    if k.get("rows"):
        rows = [["op", "size", "backend", "us (do_bench median)", "GB/s", "% peak", "us (graph replay)",
                 "GB/s (graph)"]]
        for r in k["rows"]:
            if "us" not in r:
                why = _cell(r.get("error") or r.get("note") or "-")
                rows.append([r["op"], r["size"], r["backend"], why, "", "", "", ""])
                continue
            rows.append([r["op"], r["size"], r["backend"], fmt(r["us"]), fmt(r["GBps"]),
                         _pct(r.get("fraction_of_peak")),
                         fmt(r.get("us_graph")) if "us_graph" in r else _cell(r.get("graph_error") or "-")[:60],
                         fmt(r.get("GBps_graph"))])
        lines += [f"## Kernels ({k.get('shape')} sizes, {k.get('dtype')}): bytes moved / time", "",
                  "do_bench flushes L2 between runs and includes the launch; graph replay has no launch cost and "
                  "may hit L2 for small sizes.", ""]
        lines += _md_table(rows) + [""]
    elif k:
        lines += ["## Kernels", "", f"{_why(k)}", ""]
    # errors / skipped
    if doc.get("errors") or doc.get("skipped"):
        lines += ["## Errors and skipped sections", ""]
        for e in doc.get("errors", []):
            lines.append(f"- **{e['section']}** failed: `{e['error'][:500]}`")
        for s in doc.get("skipped", []):
            lines.append(f"- **{s['section']}** {s['reason']}")
        lines.append("")
    lines += ["## Section times", ""]
    lines += _md_table([["section", "seconds", "ok"]] + [[s["section"], fmt(s["seconds"]), "yes" if s["ok"] else "no"]
                                                         for s in doc.get("sections", [])])
    return "\n".join(lines) + "\n"


def _get(s: dict, key: str, field: str):
    v = s.get(key)
    return v.get(field) if isinstance(v, dict) else None


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:200]


def _why(r) -> str:
    if not isinstance(r, dict):
        return "-"
    if "error" in r:
        return "error: " + str(r["error"])[:120].replace("|", "/")
    if "skipped" in r:
        return str(r["skipped"])[:120]
    return "-"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _p3(p: dict | None) -> str:
    if not p:
        return "-"
    return " / ".join(fmt(p.get(k)) for k in ("p50", "p90", "p99"))


def _md_table(rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]])


def summary(doc: dict) -> str:
    """A short plain-text table of the main figures."""
    rows = [["shape", "figure", "fastinfer", "transformers", "torch.compile", "notes"]]
    for shape, res in doc.get("shapes", {}).items():
        s = res.get("sections", {})
        if res.get("skipped") or res.get("error"):
            rows.append([shape, "-", "-", "-", "-", (res.get("skipped") or res.get("error"))[:70]])
            continue
        fi = (_get(s, "fastinfer_decode", "fraction_of_table_peak")
              or _get(s, "fastinfer_decode", "fraction_of_measured_copy"))
        rows.append([shape, "decode b1 tok/s", fmt(_get(s, "fastinfer_decode", "tok_s")),
                     fmt(_get(s, "transformers_decode", "tok_s")), fmt(_get(s, "compiled_decode", "tok_s")),
                     f"fastinfer at {_pct(fi)} of peak BW" if fi else ""])
        rows.append([shape, "decode b1 tok/s, async scheduling", fmt(_get(s, "fastinfer_decode_async", "tok_s")),
                     "", "", ""])
        rows.append([shape, f"mixed out tok/s ({_get(s, 'fastinfer_throughput', 'requests') or '-'} req)",
                     fmt(_get(s, "fastinfer_throughput", "output_tok_s")), "", "", ""])
        rows.append([shape, "mixed out tok/s, async scheduling",
                     fmt(_get(s, "fastinfer_throughput_async", "output_tok_s")), "", "", ""])
        rows.append([shape, f"subset out tok/s ({_get(s, 'fastinfer_subset', 'requests') or '-'} req)",
                     fmt(_get(s, "fastinfer_subset", "output_tok_s")),
                     fmt(_get(s, "transformers_throughput", "output_tok_s")),
                     fmt(_get(s, "compiled_throughput", "output_tok_s")), ""])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    n_err, n_skip = len(doc.get("errors", [])), len(doc.get("skipped", []))
    env = doc.get("env", {})
    head = (f"GPU {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}; "
            f"{doc.get('elapsed_s')} s; {n_err} section(s) failed, {n_skip} skipped")
    return head + "\n" + "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_bench: torch is not importable ({exc}); nothing to measure", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    bench = Bench(args)

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)  # `timeout` stops it: keep what was measured, say so
    try:
        doc = bench.run()
    except KeyboardInterrupt as exc:
        why = f"interrupted ({exc or 'SIGINT'}) at {bench.elapsed():.0f} s; the sections before it stand"
        bench.doc["errors"].append({"section": "run", "error": why})
        bench.write()
        print(f"\ngpu_bench: interrupted ({exc or 'SIGINT'}); partial results in {bench.json_path}", file=sys.stderr)
        print(summary(bench.doc))
        return 130
    print()
    print(summary(doc))
    print(f"\nwrote {bench.json_path} and {bench.md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
