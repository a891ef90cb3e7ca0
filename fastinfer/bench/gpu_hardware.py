"""What the GPU benchmark knows of the machine: the software and GPU it runs on, the GPU's
data-sheet HBM bandwidth and the device-to-device copy bandwidth measured here, and the
memory helpers its sections share."""
from __future__ import annotations

import gc
import os
import subprocess
from typing import Any

import torch

from fastinfer.bench.schema import checkout_dirty, collect_env

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
"""Data-sheet HBM bandwidth, bytes/s, by a substring of ``torch.cuda.get_device_name`` (the
first match wins, so the more specific names come first)."""


def peak_from_table(name: str) -> tuple[float | None, str | None]:
    """The data-sheet bandwidth of the GPU called ``name`` and the table entry that matched
    (``(None, None)`` for a GPU not in :data:`PEAK_BANDWIDTH`)."""
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw, key
    return None, None


def sync(device: str | torch.device) -> None:
    """Waits for the GPU's queued work when ``device`` is a CUDA device (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Collects garbage and returns the CUDA allocator's cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gpu_memory() -> dict[str, float] | None:
    """GiB allocated and reserved by torch, used on the device (all processes) and in total;
    None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
            "used_on_device_gib": round((total - free) / 2**30, 2), "total_gib": round(total / 2**30, 2)}


def environment(device: str) -> dict[str, Any]:
    """Versions (python, torch, CUDA runtime, triton, transformers, tokenizers, safetensors,
    fastinfer and whether its CUDA extension is built), the checkout's sha and whether it has
    uncommitted changes, and the GPU (name, compute capability, memory, SMs, driver)."""
    base = collect_env()  # fastinfer.bench's description of the run; the GPU adds its own fields
    env: dict[str, Any] = {"python": base["python"], "torch": base["torch"],
                           "cuda_runtime": torch.version.cuda, "device": device}
    for mod in ("triton", "transformers", "tokenizers", "safetensors"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is a fact to report
            env[mod] = f"unavailable ({type(exc).__name__})"
    try:
        from fastinfer.ops.backends import cuda_native

        env["fastinfer"], env["fastinfer_cuda_extension"] = base["fastinfer"], cuda_native.built()
    except Exception as exc:  # noqa: BLE001
        env["fastinfer"] = f"import failed: {type(exc).__name__}: {exc}"
    env["git_sha"], env["git_dirty"] = base["git_sha"], checkout_dirty()
    env["gpu"] = base["gpu"] if device == "cuda" else None
    if device == "cuda":
        env.update(_gpu_properties())
    env["cpu_count"] = os.cpu_count()
    return env


def _gpu_properties() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    out: dict[str, Any] = {"capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                           "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                           "sm_count": props.multi_processor_count}
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


def copy_bandwidth() -> dict[str, Any]:
    """Device-to-device ``copy_`` of a 1 GiB tensor: bytes read + written / time (median of
    20, after 3 warm-up copies), beside the data-sheet figure of this GPU."""
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
    t = sorted(times)[len(times) // 2]
    del src, dst
    free_memory()
    name = torch.cuda.get_device_name(0)
    table, entry = peak_from_table(name)
    out = {"copy_bytes_per_s": 2 * n / t, "copy_GBps": round(2 * n / t / 1e9, 1), "copy_seconds": t,
           "table_bytes_per_s": table, "table_entry": entry, "gpu": name}
    if table:
        out["copy_fraction_of_table"] = round(2 * n / t / table, 3)
    return out
