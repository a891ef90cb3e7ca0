"""The GPU benchmark's run: a result document filled section by section and written after
each one (``gpu_bench.json`` and ``gpu_bench.md``), so a run cut short keeps what it measured.
Every section runs in its own try/except (a failure is recorded and the rest goes on), and a
section that would start past ``--budget-s`` is skipped with the reason."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from fastinfer.bench.gpu_hardware import copy_bandwidth, environment, free_memory
from fastinfer.bench.gpu_kernels import KERNEL_SHAPE, kernel_cases, time_kernel_case
from fastinfer.bench.gpu_measure import ShapeRun, shape_ratios
from fastinfer.bench.gpu_report import to_markdown
from fastinfer.bench.random_model import SHAPES, shape_config, weight_bytes_per_token

SCHEMA = "fastinfer-gpu-bench/1"
Store = Callable[[Any], None]


def _now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class GpuBench:
    """One run of the GPU benchmark over ``args`` (see ``fastinfer.bench.gpu``); ``doc`` is
    the result document."""

    def __init__(self, args: argparse.Namespace, option_names: set[str] | None = None) -> None:
        self.args, self.device = args, args.device
        self.t0 = time.perf_counter()
        os.makedirs(args.out, exist_ok=True)
        self.json_path = os.path.join(args.out, "gpu_bench.json")
        self.md_path = os.path.join(args.out, "gpu_bench.md")
        names = option_names if option_names is not None else set(vars(args))
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "started": _now_utc(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in names},
            "env": {}, "bandwidth": {}, "kernels": {}, "shapes": {}, "sections": [], "errors": [], "skipped": [],
        }
        self.peak, self.peak_source = None, "none"

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds of ``--budget-s`` left."""
        return self.args.budget_s - self.elapsed()

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def section(self, name: str, fn: Callable[[], Any], store: Store | None = None, needs_s: float = 0.0) -> Any:
        """Runs ``fn`` unless fewer than ``needs_s`` seconds of the budget are left; records its
        time, its error (and goes on), or why it was skipped. ``store`` puts its result (or
        ``{"error": ...}`` / ``{"skipped": ...}``) in the document. Returns the result (None
        when it failed or was skipped)."""
        if self.left() < needs_s:
            return self._skip(name, needs_s, store)
        self.log(f"{name} ...")
        start = time.perf_counter()
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - one failure must not lose the rest
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = {"section": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
            self.doc["errors"].append(error)
            self.log(f"{name}: FAILED {error['error'][:300]}")
            free_memory()
        took = time.perf_counter() - start
        self.doc["sections"].append({"section": name, "seconds": round(took, 2), "ok": error is None})
        if store is not None:
            store({"error": error["error"]} if error else result)
        self.write()
        return result

    def _skip(self, name: str, needs_s: float, store: Store | None) -> None:
        why = (f"skipped: {max(self.left(), 0):.0f} s of the {self.args.budget_s:.0f} s budget left, "
               f"about {needs_s:.0f} s needed")
        self.doc["skipped"].append({"section": name, "reason": why})
        self.log(f"{name}: {why}")
        if store is not None:
            store({"skipped": why})
        self.write()

    def write(self) -> None:
        """Writes the JSON document (atomically) and its Markdown rendering."""
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

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Environment, copy bandwidth and kernels (on a GPU), then every shape."""
        self.section("environment", lambda: environment(self.device), lambda r: self.doc["env"].update(r or {}))
        if self.device == "cuda":
            self.section("copy bandwidth", copy_bandwidth, lambda r: self.doc["bandwidth"].update(r or {}))
        self.peak, self.peak_source = self._choose_peak()
        if self.device == "cuda" and not self.args.no_kernels:
            self.section("kernels", self.kernels, lambda r: self.doc.__setitem__("kernels", r), needs_s=20)
        for shape in self.args.shapes:
            self.run_shape(shape)
        self.doc["finished"] = _now_utc()
        self.write()
        return self.doc

    def _choose_peak(self) -> tuple[float | None, str]:
        bw = self.doc["bandwidth"]
        if bw.get("table_bytes_per_s"):
            return bw["table_bytes_per_s"], f"data sheet ({bw.get('table_entry')})"
        if bw.get("copy_bytes_per_s"):
            return bw["copy_bytes_per_s"], "measured device copy (GPU not in the table)"
        return None, "none"

    def kernels(self) -> dict[str, Any]:
        """Every op's kernels at the sizes of :data:`KERNEL_SHAPE` in bfloat16 (the document is
        updated row by row, so a cut run keeps the rows it timed)."""
        results: dict[str, Any] = {"shape": KERNEL_SHAPE, "dtype": "bfloat16", "rows": []}
        for case in kernel_cases(SHAPES[KERNEL_SHAPE], torch.bfloat16):
            results["rows"] += time_kernel_case(case, self.peak)
            self.doc["kernels"] = results
        return results

    # ------------------------------------------------------------------ one shape
    def _open_shape(self, shape: str) -> dict[str, Any] | None:
        """The shape's entry in the document, or None (and the reason recorded) when the shape
        is unknown or the GPU's memory too small for it."""
        res: dict[str, Any] = {"sections": {}}
        self.doc["shapes"][shape] = res
        if shape not in SHAPES:
            res["error"] = f"unknown shape {shape!r}; known: {', '.join(SHAPES)}"
            self.doc["errors"].append({"section": shape, "error": res["error"]})
            return None
        wbytes = weight_bytes_per_token(shape_config(shape), 2)
        res["weight_bytes_per_token"], res["params_per_token_read"] = wbytes, wbytes // 2
        total = torch.cuda.get_device_properties(0).total_memory if self.device == "cuda" else None
        if total is not None and total < 2.5 * wbytes:
            why = (f"skipped: {total / 2**30:.0f} GiB of GPU memory is too little for {wbytes / 2**30:.1f} GiB of "
                   "weights and room to run")
            res["skipped"] = why
            self.doc["skipped"].append({"section": shape, "reason": why})
            print(f"{shape}: {why}")
            return None
        return res

    def run_shape(self, shape: str) -> None:
        """Build, fastinfer's sections, then the baselines' (unless ``--no-baselines``)."""
        res = self._open_shape(shape)
        if res is None:
            return
        m = ShapeRun(self.args, shape, self.doc["bandwidth"], self.peak_source)
        self.section(f"{shape}: build", m.build, _put(res, "build"), needs_s=(150 if m.big else 50))
        if m.folder is None:
            return
        self._fastinfer_sections(m, res)
        res["memory_after_fastinfer"] = m.release_fastinfer()
        if self.args.no_baselines:
            res["ratios"] = shape_ratios(res["sections"])
            return
        have_hf = self.section(f"{shape}: transformers load", m.hf_load, None, needs_s=20 if m.big else 10)
        if have_hf is not None:
            self._transformers_sections(m, res)
            if not self.args.no_compile:
                self._compiled_sections(m, res)
        m.release_baselines()
        res["ratios"] = shape_ratios(res["sections"])
        self.write()

    def _fastinfer_sections(self, m: ShapeRun, res: dict[str, Any]) -> None:
        s, a = m.shape, self.args
        started = self.section(f"{s}: fastinfer start-up", m.fi_start, _put(res, "fastinfer_startup"),
                               needs_s=30 if m.big else 15)
        workload = self.section(f"{s}: workload", m.make_workload, lambda r: res.__setitem__("workload", r))
        if started is None:
            return
        self.section(f"{s}: fastinfer single-stream decode", m.fi_decode, _put(res, "fastinfer_decode"), needs_s=15)
        self.section(f"{s}: fastinfer single-stream decode, async scheduling", lambda: m.fi_decode(True),
                     _put(res, "fastinfer_decode_async"), needs_s=15)
        self.section(f"{s}: fastinfer decode step profile", m.fi_step_profile, _put(res, "fastinfer_step_profile"),
                     needs_s=10)
        n = a.num_requests
        if m.big:
            n = a.num_requests_8b or (a.num_requests if self.left() > 200 else min(128, a.num_requests))
        if workload is None:
            return
        need = 40 if m.big else 25
        self.section(f"{s}: fastinfer throughput ({n} requests)", lambda: m.fi_throughput(n),
                     _put(res, "fastinfer_throughput"), needs_s=need)
        self.section(f"{s}: fastinfer throughput ({n} requests), async scheduling",
                     lambda: m.fi_throughput(n, asynchronous=True), _put(res, "fastinfer_throughput_async"),
                     needs_s=need + 240)  # only with time to spare for the baselines
        if not a.no_baselines:
            self.section(f"{s}: fastinfer throughput on the baselines' subset",
                         lambda: m.fi_throughput(m.baseline_n()), _put(res, "fastinfer_subset"), needs_s=15)

    def _transformers_sections(self, m: ShapeRun, res: dict[str, Any]) -> None:
        s = m.shape
        self.section(f"{s}: transformers single-stream decode", m.hf_decode, _put(res, "transformers_decode"),
                     needs_s=25)
        if m.workload is not None:
            self.section(f"{s}: transformers batched throughput ({m.baseline_n()} requests)",
                         lambda: m.hf_throughput(m.baseline_n()), _put(res, "transformers_throughput"),
                         needs_s=60 if m.big else 40)

    def _compiled_sections(self, m: ShapeRun, res: dict[str, Any]) -> None:
        s = m.shape
        self.section(f"{s}: torch.compile single-stream decode", m.compiled_decode, _put(res, "compiled_decode"),
                     needs_s=90 if m.big else 60)
        later = 150 if (not m.big and "llama-3.1-8b" in self.args.shapes) else 0  # keep time for the 8B shape
        if m.workload is not None:
            self.section(f"{s}: torch.compile batched throughput ({m.baseline_n()} requests)",
                         lambda: m.compiled_throughput(m.baseline_n()), _put(res, "compiled_throughput"),
                         needs_s=(120 if m.big else 80) + later)


def _put(res: dict[str, Any], key: str) -> Store:
    """Stores a section's result under ``res["sections"][key]``."""
    return lambda r: res["sections"].__setitem__(key, r)
