"""Where a batch-1 decode step's time goes: the wall time per step, the host's time in the
model runner, in the sampler (which waits for the GPU) and elsewhere, and the GPU's busy time
per step from ``torch.profiler`` with its top kernels."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from fastinfer.bench.gpu_hardware import sync
from fastinfer.engine.engine import Engine
from fastinfer.sampling.params import SamplingParams


def step_profile(engine: Engine, prompt: list[int], steps: int = 48) -> dict[str, Any]:
    """Profiles ``steps`` decode steps of one greedy request of ``prompt`` on ``engine`` (after
    its prefill and a few decode steps), then runs the request to its end."""
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # the prefill and a few decode steps first
        engine.step()
    try:
        wall, spent, prof = _profiled_steps(engine, steps)
    finally:
        while engine.has_unfinished():
            engine.step()
    kernels = _device_kernels(prof)
    per = 1e3 / steps
    return {"steps": steps, "wall_ms_per_step": wall * per,
            "host_runner_ms_per_step": spent["runner"] * per, "host_sampler_ms_per_step": spent["sampler"] * per,
            "host_other_ms_per_step": (wall - spent["runner"] - spent["sampler"]) * per,
            "gpu_busy_ms_per_step": sum(k[1] for k in kernels) / 1e3 / steps,
            "top_kernels": [{"name": n[:120], "us_per_step": us / steps, "calls_per_step": c / steps}
                            for n, us, c in kernels[:10]],
            "note": "host times include the profiler's own overhead; the sampler's time includes its wait for "
                    "the GPU (the token ids are read back)"}


@contextlib.contextmanager
def _timed(obj: Any, names: tuple[str, ...], spent: dict[str, float]) -> Iterator[None]:
    """``obj``'s callables ``names`` wrapped in host timers adding to ``spent[name]`` for a
    while, then put back as they were (an instance attribute, or the class's method)."""
    saved = {n: vars(obj)[n] for n in names if n in vars(obj)}

    def timer(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    for n in names:
        setattr(obj, n, timer(n, getattr(obj, n)))
    try:
        yield
    finally:
        for n in names:
            if n in saved:
                setattr(obj, n, saved[n])
            else:
                delattr(obj, n)


def _profiled_steps(engine: Engine, steps: int) -> tuple[float, dict[str, float], Any]:
    """``steps`` engine steps under ``torch.profiler``, the model runner's forward pass
    (``execute``) and its sampler in host timers: wall seconds, host seconds of each, the
    profile."""
    spent = {"execute": 0.0, "sampler": 0.0}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _timed(engine.runner, ("execute", "sampler"), spent):
        sync(engine.device)
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(engine.device)
            wall = time.perf_counter() - t0
    return wall, {"runner": spent["execute"], "sampler": spent["sampler"]}, prof


def _device_kernels(prof) -> list[tuple[str, float, int]]:
    """(name, device microseconds, calls) of every event that ran on the device, longest first."""
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if dev_us and dev_us > 0:
            kernels.append((ev.key, dev_us, ev.count))
    kernels.sort(key=lambda k: -k[1])
    return kernels
