"""The benchmark result file: one JSON document per ``fastinfer bench`` run, versioned so that
later fields can be added without breaking ``compare``.

Shape (``schema_version`` 1; keys not listed here are allowed and ignored)::

    {"schema_version": 1, "command": str, "model": str, "dtype": str, "device": str,
     "workload": {"name": str, "num_prompts": int, "seed": int,
                  "input_lens": [int], "output_lens": [int]},
     "env": {"fastinfer", "torch", "python", "cpu", "gpu", "git_sha": str | None,
             "threads": int | None, "cpu_isa": str | None (optional: the native kernels' path)},
     "results": {"<system>": {"output_throughput_tok_s": float, "request_throughput_req_s": float,
                              "total_time_s": float,
                              "ttft_ms": {"mean", "p50", "p90", "p99": float | None},
                              "tpot_ms": {...}, "e2e_ms": {...},
                              "peak_memory_mb": float | None}},
     "ratios": {"<system>": float | None}}

``ratios[s]`` is fastinfer's output throughput over system ``s``'s, both measured in the same run
(so machine noise mostly cancels); the ``"fastinfer"`` system is the reference and has no entry.
A latency statistic or the peak memory is ``null`` when the run could not measure it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

SCHEMA_VERSION = 1
REFERENCE_SYSTEM = "fastinfer"
STAT_KEYS = ("mean", "p50", "p90", "p99")
LATENCY_FIELDS = ("ttft_ms", "tpot_ms", "e2e_ms")
THROUGHPUT_FIELDS = ("output_throughput_tok_s", "request_throughput_req_s")
TOP_LEVEL_STRINGS = ("command", "model", "dtype", "device")
ENV_STRINGS = ("fastinfer", "torch", "python", "cpu", "gpu", "git_sha")


class SchemaError(ValueError):
    """A result document (or file) is not a valid benchmark result; the message names the field
    path (``results.transformers.ttft_ms.p50``) or the file."""


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p90 and p99 of ``values_ms`` (percentiles linearly interpolated between the
    closest ranks, as ``numpy.percentile``'s default). An empty sequence gives ``None`` for every
    statistic: "not measured" is not the same as a latency of zero."""
    if len(values_ms) == 0:
        return {k: None for k in STAT_KEYS}
    xs = sorted(float(v) for v in values_ms)
    stats: dict[str, float | None] = {"mean": math.fsum(xs) / len(xs)}
    for q in (50, 90, 99):
        rank = (len(xs) - 1) * q / 100
        lo = math.floor(rank)
        hi = min(lo + 1, len(xs) - 1)
        stats[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)
    return stats


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(cwd: str, *args: str) -> str | None:
    """``git args`` run in ``cwd``: its output, or None when git fails or is absent."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _package_dir() -> str:
    import fastinfer

    return os.path.dirname(os.path.abspath(fastinfer.__file__))


def _git_sha(package_dir: str) -> str | None:
    """HEAD of the checkout that holds the package, or None when the package is not inside its
    own checkout (an installed wheel, even one inside some other repository, has no sha)."""
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(os.path.dirname(package_dir)):
        return None
    return _git(package_dir, "rev-parse", "HEAD")


def checkout_dirty() -> bool:
    """True when the fastinfer checkout has uncommitted changes to tracked files (False when
    there are none, or when fastinfer is not inside its own checkout)."""
    package_dir = _package_dir()
    if _git_sha(package_dir) is None:
        return False
    return bool(_git(package_dir, "status", "--porcelain", "--untracked-files=no"))


def collect_env(threads: int | None = None) -> dict[str, Any]:
    """The software and hardware a run measured: versions, CPU model, GPU name (None without
    CUDA), git sha of the fastinfer checkout (None when not a checkout) and the torch thread
    count (``threads`` when given, else ``torch.get_num_threads()``)."""
    import torch

    import fastinfer

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "fastinfer": fastinfer.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "gpu": gpu,
        "git_sha": _git_sha(_package_dir()),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu_isa": _cpu_isa(),
    }


def machine_line(env: dict[str, Any]) -> str:
    """``AMD EPYC (avx2 kernels), 2 threads``: the machine a figure was measured on."""
    isa = env.get("cpu_isa")
    return f"{env['cpu']}{f' ({isa} kernels)' if isa else ''}, {env['threads']} threads"


def _cpu_isa() -> str | None:
    """The native CPU kernels' code path ("avx512_vnni", "avx512", "avx2", "scalar"), None
    without them: a figure depends on it (``FASTINFER_CPU_ISA`` may cap it)."""
    from fastinfer.ops.backends import cpu_native

    return cpu_native.isa() if cpu_native.available() else None


def compute_ratios(results: dict[str, dict]) -> dict[str, float | None]:
    """fastinfer's output throughput over every other system's (None where that system's
    throughput is zero); empty when the run has no ``"fastinfer"`` system."""
    ref = results.get(REFERENCE_SYSTEM)
    if ref is None:
        return {}
    ours = ref["output_throughput_tok_s"]
    ratios: dict[str, float | None] = {}
    for system, res in results.items():
        if system != REFERENCE_SYSTEM:
            theirs = res["output_throughput_tok_s"]
            ratios[system] = ours / theirs if theirs > 0 else None
    return ratios


def build_result(command: str, model: str, dtype: str, device: str, workload: dict,
                 results: dict, env: dict) -> dict[str, Any]:
    """A complete, validated result document; ``ratios`` is computed from ``results``.
    Raises ``SchemaError`` when a part is malformed, so a bad file is never written."""
    doc = {
        "schema_version": SCHEMA_VERSION, "command": command, "model": model, "dtype": dtype,
        "device": device, "workload": workload, "env": env, "results": results,
    }
    _check_results(results, "results")  # ratios need valid throughputs
    doc["ratios"] = compute_ratios(results)
    validate(doc)
    return doc


# --- validation -------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _expect_dict(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected an object, got {_type_name(value)}")
    return value


def _field(parent: dict, key: str, path: str) -> Any:
    if key not in parent:
        raise SchemaError(f"{path}.{key}: missing" if path else f"{key}: missing")
    return parent[key]


def _check_number(value: Any, path: str, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or null" if nullable else "a number"
        raise SchemaError(f"{path}: expected {kind}, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise SchemaError(f"{path}: expected a finite number >= 0, got {value!r}")


def _check_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(f"{path}: expected an integer, got {_type_name(value)}")


def _check_str(value: Any, path: str, nullable: bool = False) -> None:
    if not (isinstance(value, str) or (nullable and value is None)):
        kind = "a string or null" if nullable else "a string"
        raise SchemaError(f"{path}: expected {kind}, got {_type_name(value)}")


def _check_workload(workload: Any) -> None:
    workload = _expect_dict(workload, "workload")
    _check_str(_field(workload, "name", "workload"), "workload.name")
    for key in ("num_prompts", "seed"):
        _check_int(_field(workload, key, "workload"), f"workload.{key}")
    n = workload["num_prompts"]
    if n < 1:
        raise SchemaError(f"workload.num_prompts: expected at least 1 request, got {n} (a run with no "
                          "requests measures nothing)")
    for key in ("input_lens", "output_lens"):
        lens, path = _field(workload, key, "workload"), f"workload.{key}"
        if not isinstance(lens, list):
            raise SchemaError(f"{path}: expected a list of integers, got {_type_name(lens)}")
        for i, x in enumerate(lens):
            _check_int(x, f"{path}[{i}]")
        if len(lens) != n:
            raise SchemaError(f"{path}: expected num_prompts={n} entries, got {len(lens)}")


def _check_env(env: Any) -> None:
    env = _expect_dict(env, "env")
    for key in ENV_STRINGS:
        _check_str(_field(env, key, "env"), f"env.{key}", nullable=True)
    threads = _field(env, "threads", "env")
    if threads is not None:
        _check_int(threads, "env.threads")


def _check_system(res: Any, path: str) -> None:
    res = _expect_dict(res, path)
    for key in (*THROUGHPUT_FIELDS, "total_time_s"):
        _check_number(_field(res, key, path), f"{path}.{key}")
    for key in LATENCY_FIELDS:
        stats = _expect_dict(_field(res, key, path), f"{path}.{key}")
        for stat in STAT_KEYS:
            _check_number(_field(stats, stat, f"{path}.{key}"), f"{path}.{key}.{stat}",
                          nullable=True)
    _check_number(_field(res, "peak_memory_mb", path), f"{path}.peak_memory_mb", nullable=True)
    if "num_requests" in res:  # added after schema 1 was first written: checked when present
        _check_int(res["num_requests"], f"{path}.num_requests")
        if res["num_requests"] < 1:
            raise SchemaError(f"{path}.num_requests: expected at least 1 request, got {res['num_requests']}")


def _check_results(results: Any, path: str) -> None:
    results = _expect_dict(results, path)
    if not results:
        raise SchemaError(f"{path}: expected at least one system, got none")
    for system, res in results.items():
        _check_system(res, f"{path}.{system}")


def _check_ratios(ratios: Any, results: dict) -> None:
    ratios = _expect_dict(ratios, "ratios")
    for system, value in ratios.items():
        if system not in results:
            raise SchemaError(f"ratios.{system}: no such system in results "
                              f"(systems: {', '.join(sorted(results))})")
        _check_number(value, f"ratios.{system}", nullable=True)


def validate(doc: dict) -> None:
    """Raise ``SchemaError`` naming the first missing or malformed field (``workload.seed``,
    ``results.transformers.ttft_ms.p50``); return None for a valid schema-1 document. Unknown
    extra keys are allowed so that later minor additions stay readable."""
    doc = _expect_dict(doc, "document")
    version = _field(doc, "schema_version", "")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise SchemaError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r}")
    for key in TOP_LEVEL_STRINGS:
        _check_str(_field(doc, key, ""), key)
    _check_workload(_field(doc, "workload", ""))
    _check_env(_field(doc, "env", ""))
    _check_results(_field(doc, "results", ""), "results")
    _check_ratios(_field(doc, "ratios", ""), doc["results"])


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a result file. A missing or unreadable file, invalid JSON or an invalid
    document raises ``SchemaError`` whose message starts with the file name."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(f"{path}: cannot read: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                          ) from None
    try:
        validate(doc)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    return doc
