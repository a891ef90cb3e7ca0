"""The engine's memory budget: what the device has, how much the steps need beside the weights
(profiled on a GPU), and the KV cache that fills the rest."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from fastinfer.errors import ConfigError
from fastinfer.kv_cache.cache import KVCache, bytes_per_block
from fastinfer.model.runner import ModelRunner, StepInput
from fastinfer.sampling.sampler import SCRATCH_BYTES_PER_LOGIT
from fastinfer.validation import format_bytes

if TYPE_CHECKING:
    from fastinfer.engine.config import EngineConfig
    from fastinfer.model.loader import LoadedModel

_log = logging.getLogger("fastinfer.engine")

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


def check_within(nbytes: int, limit: int, device: torch.device, what: str, name: str = "kv_cache_memory") -> None:
    """Refuses a ``name`` (``kv_cache_memory``, ``kv_offload_memory``) of ``nbytes`` larger
    than ``limit`` (``what`` says which limit: the device's whole memory, or what is free now)."""
    if nbytes > limit:
        raise ConfigError(f"{name} is {format_bytes(nbytes)}, more than {what} on {device} "
                          f"({format_bytes(limit)}); lower {name}", name)


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


def profile_activations(config: EngineConfig, loaded: LoadedModel, device: torch.device, kv_dtype: torch.dtype,
                        max_model_len: int) -> int:
    """On a GPU whose KV cache is sized by ``gpu_memory_utilization``: the memory the steps
    need beside the weights and the cache, measured by running them once over a small
    scratch cache. That is the peak of the largest step the scheduler will form
    (``max_num_batched_tokens`` tokens over ``max_num_seqs`` sequences, each one's logits,
    and the sampler's scratch), plus, with CUDA graphs, the peak of a decode step of
    ``max_num_seqs`` sequences (the graphs' memory pool keeps about that much for good).
    0 elsewhere."""
    if device.type != "cuda" or config.kv_cache_memory is not None:
        return 0
    budget = min(config.token_budget(max_model_len), config.max_num_seqs * (max_model_len - 1))
    n = max(1, min(config.max_num_seqs, budget))
    lens = [budget // n + (1 if i < budget % n else 0) for i in range(n)]
    peak = profile_step(config, loaded, device, kv_dtype, lens)
    graphs = 0 if config.enforce_eager else profile_step(config, loaded, device, kv_dtype, [1] * config.max_num_seqs)
    _log.info("profiled a step of %d tokens over %d sequences: peak activation memory %s; CUDA graphs' pool "
              "about %s", budget, n, format_bytes(peak), format_bytes(graphs))
    return peak + graphs


def profile_step(config: EngineConfig, loaded: LoadedModel, device: torch.device, kv_dtype: torch.dtype,
                 lens: list[int]) -> int:
    """Peak bytes allocated while one step of sequences of ``lens`` tokens (from position 0)
    runs, its logits are computed, and the sampler's scratch memory (``SCRATCH_BYTES_PER_LOGIT``)."""
    mcfg, bs = loaded.config, config.block_size
    tables, next_block = [], 0
    for length in lens:
        need = -(-length // bs)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    torch.cuda.synchronize(device)
    scratch = KVCache(mcfg.num_layers, next_block, bs, loaded.kv_heads, mcfg.head_dim, kv_dtype, device)
    runner = ModelRunner(loaded.model, scratch.layers, bs, device, config.ops_backend)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    logits = runner.execute(StepInput([[0] * m for m in lens], [0] * len(lens), tables))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before + SCRATCH_BYTES_PER_LOGIT * logits.numel()
    del logits, runner, scratch
    torch.cuda.empty_cache()
    return peak


def allocate_kv_cache(config: EngineConfig, loaded: LoadedModel, device: torch.device, kv_dtype: torch.dtype,
                      activation_bytes: int, max_model_len: int, shared_per_block: int = 0) -> KVCache:
    """The cache tensors, as many blocks as the budget holds (at least one). ``shared_per_block``:
    bytes per block of another cache addressed by the same block tables (a draft model's),
    which the budget holds too."""
    mcfg, bs = loaded.config, config.block_size
    per_block = bytes_per_block(mcfg.num_layers, bs, loaded.kv_heads, mcfg.head_dim, kv_dtype)
    num_blocks = kv_cache_budget(config, device, activation_bytes) // (per_block + shared_per_block)
    if num_blocks < 1:
        raise ConfigError(f"kv_cache_memory holds no block: one block of {bs} tokens needs {per_block} "
                          "bytes", "kv_cache_memory")
    try:
        cache = KVCache(mcfg.num_layers, num_blocks, bs, loaded.kv_heads, mcfg.head_dim, kv_dtype, device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        raise ConfigError(f"cannot allocate the KV cache ({num_blocks} blocks of {per_block} bytes) on "
                          f"{device}: {exc}; lower kv_cache_memory or gpu_memory_utilization",
                          "kv_cache_memory") from exc
    _log.info("KV cache on %s: %d blocks of %d tokens = %d tokens (%s; %.1f sequences of max_model_len %d)",
              device, num_blocks, bs, num_blocks * bs, format_bytes(cache.nbytes),
              num_blocks * bs / max_model_len, max_model_len)
    if config.kv_offload_memory:
        host_blocks = config.kv_offload_memory // per_block
        if host_blocks < 1:
            raise ConfigError(f"kv_offload_memory holds no block: one block of {bs} tokens needs {per_block} "
                              "bytes", "kv_offload_memory")
        check_within(config.kv_offload_memory, available_memory(torch.device("cpu")), torch.device("cpu"),
                     "the memory free now", "kv_offload_memory")
        cache.attach_host(host_blocks)
        _log.info("KV host tier: %d blocks (%s)", host_blocks, format_bytes(cache.host_nbytes))
    return cache
