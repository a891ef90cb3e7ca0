"""How many bytes the KV cache may take on a device."""
from __future__ import annotations

import os

import torch
from torch import nn

from fastinfer.engine.config import EngineConfig
from fastinfer.kv_cache.cache import parse_bytes

_CPU_DEFAULT_CAP = 4 * 2**30


def kv_cache_budget(config: EngineConfig, device: torch.device, model: nn.Module) -> int:
    """``kv_cache_memory`` when set; else on a GPU ``gpu_memory_utilization`` of its memory
    minus what is already allocated (the weights), on a CPU ``min(4 GiB, 25% of available RAM)``."""
    if config.kv_cache_memory is not None:
        return parse_bytes(config.kv_cache_memory)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(total * config.gpu_memory_utilization) - used)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(_CPU_DEFAULT_CAP, available // 4)
