"""How many bytes the KV cache may take on a device, and what the device has."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from fastinfer.errors import ConfigError
from fastinfer.validation import format_bytes

if TYPE_CHECKING:
    from fastinfer.engine.config import EngineConfig

_CPU_DEFAULT_CAP = 4 * 2**30
_CGROUP_LIMIT, _CGROUP_USAGE = "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"


def total_memory(device: torch.device) -> int:
    """Bytes of memory the device has in all (a CPU: physical RAM, or the container's cgroup
    limit when lower; a GPU: its memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(physical, _read_int(_CGROUP_LIMIT) or physical)


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now (a CPU: ``MemAvailable``, or what the cgroup limit
    leaves when less; a GPU: free memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    limit, used = _read_int(_CGROUP_LIMIT), _read_int(_CGROUP_USAGE)
    return min(available, limit - used) if limit and used is not None else available


def _read_int(path: str) -> int | None:
    """The integer in a one-line file (None when absent or ``max``)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_within(nbytes: int, limit: int, device: torch.device, what: str) -> None:
    """Refuses a ``kv_cache_memory`` of ``nbytes`` larger than ``limit`` (``what`` says which
    limit: the device's whole memory, or what is free now)."""
    if nbytes > limit:
        raise ConfigError(f"kv_cache_memory is {format_bytes(nbytes)}, more than {what} on {device} "
                          f"({format_bytes(limit)}); lower kv_cache_memory", "kv_cache_memory")


def kv_cache_budget(config: EngineConfig, device: torch.device, activation_bytes: int = 0) -> int:
    """``kv_cache_memory`` when set (refused when more than is free now); else on a GPU
    ``gpu_memory_utilization`` of its memory minus what is already in use (the weights, the
    CUDA context) and minus ``activation_bytes`` (the peak a profiled step needed), on
    a CPU ``min(4 GiB, 25% of total RAM)``: a function of the machine, not of the moment, so
    capacity is the same run to run (refused, asking for ``kv_cache_memory``, when that much
    is not free now)."""
    if config.kv_cache_memory is not None:
        check_within(config.kv_cache_memory, available_memory(device), device, "the memory free now")
        return config.kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(total * config.gpu_memory_utilization) - used - activation_bytes)
    default = min(_CPU_DEFAULT_CAP, total_memory(device) // 4)
    free = available_memory(device)
    if default > free:
        raise ConfigError(f"the default CPU KV cache ({format_bytes(default)}: min(4 GiB, 25% of "
                          f"{format_bytes(total_memory(device))})) is more than is free now ({format_bytes(free)}); "
                          "set kv_cache_memory", "kv_cache_memory")
    return default
