"""The systems a benchmark runs on the same workload, in the same process: fastinfer's
engine and three PyTorch baselines. Every system generates exactly ``output_lens[i]`` tokens
for request ``i`` (greedy, EOS ignored); all requests arrive together at the start."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastinfer.bench.memory import PeakMemory
from fastinfer.engine.engine import Engine
from fastinfer.kv_cache.cache import KVCache
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.common.metadata import AttentionMetadata
from fastinfer.sampling.params import SamplingParams

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Times (seconds, one clock) of one request: all arrive at ``arrival``."""

    arrival: float
    first_token: float
    finish: float
    output_tokens: int

    @property
    def ttft_ms(self) -> float:
        return (self.first_token - self.arrival) * 1e3

    @property
    def e2e_ms(self) -> float:
        return (self.finish - self.arrival) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        n = self.output_tokens - 1
        return (self.finish - self.first_token) * 1e3 / n if n > 0 else None


@dataclass(slots=True)
class SystemRun:
    """One system's pass over a workload."""

    system: str
    total_time_s: float
    records: list[RequestRecord]
    peak_memory_mb: float
    counters: dict[str, int] | None = None  # fastinfer: its KV-cache counters over the run

    def check(self, output_lens: list[int]) -> SystemRun:
        """Raises unless every request generated exactly the tokens it was asked for: a
        throughput comparison is only fair on identical work."""
        for i, (rec, n) in enumerate(zip(self.records, output_lens)):
            if rec.output_tokens != n:
                raise RuntimeError(f"{self.system}: request {i} generated {rec.output_tokens} tokens, expected {n}")
        return self


def _noop(_: int) -> None:
    pass


Serve = Callable[[list[list[int]], list[int], float], list[RequestRecord]]
"""Serves a chunk of requests (prompts, output lengths) that all arrived at the given time
(``time.monotonic()``); returns one record per request, in order."""


def timed_run(name: str, device: torch.device | str, prompts: list[list[int]], output_lens: list[int],
              serve: Serve, progress: Progress = _noop, chunk: int | None = 1) -> SystemRun:
    """The timed loop every system shares: all requests arrive at the start; ``serve`` gets
    them ``chunk`` at a time (all at once when ``chunk`` is None) under one wall clock and one
    peak-memory watch, and ``progress(k)`` follows each chunk of k. Raises unless every request
    generated exactly the tokens it was asked for."""
    step = chunk or max(len(prompts), 1)
    records: list[RequestRecord] = []
    with PeakMemory(device) as mem:
        start, arrival = time.perf_counter(), time.monotonic()
        for b in range(0, len(prompts), step):
            done = serve(prompts[b:b + step], output_lens[b:b + step], arrival)
            records += done
            progress(len(done))
        total = time.perf_counter() - start
    return SystemRun(name, total, records, mem.peak_mb).check(output_lens)


KV_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "kv_offload_loads", "kv_offload_stores",
               "num_preemptions")
"""``Engine.stats()`` counters a fastinfer run reports (their growth over the run)."""


class FastinferSystem:
    """fastinfer's engine: every request submitted at once, continuous batching. Each run
    starts with an empty prefix cache, so that a warm-up or an earlier run is never read back:
    what the cache saves is what the requests of one run share. ``prefix_caching``: turns the
    engine's prefix cache on or off for this system's runs (None: as configured), so that one
    engine (one KV cache in memory) serves both sides of an on/off comparison."""

    name = "fastinfer"

    def __init__(self, engine: Engine, name: str | None = None, prefix_caching: bool | None = None) -> None:
        self.engine = engine
        self.prefix_caching = prefix_caching
        if name is not None:
            self.name = name

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Serves every request (all arriving now); ``progress(1)`` as each one finishes. The
        run's ``counters``: the growth of :data:`KV_COUNTERS`, ``prompt_tokens`` and
        ``cached_prompt_tokens`` (read from the prefix cache instead of computed)."""
        blocks = self.engine.block_manager
        configured = blocks.caching
        blocks.caching = configured if self.prefix_caching is None else self.prefix_caching
        try:
            self.engine.reset_prefix_cache()
            before, cached = self.engine.stats(), []
            run = timed_run(self.name, self.engine.device, prompts, output_lens,
                            lambda ps, ns, arrival: self._serve(ps, ns, arrival, progress, cached), chunk=None)
            after = self.engine.stats()
        finally:
            blocks.caching = configured
        run.counters = {k: after[k] - before[k] for k in KV_COUNTERS}
        run.counters.update(prompt_tokens=sum(len(p) for p in prompts), cached_prompt_tokens=sum(cached))
        return run

    def _serve(self, prompts: list[list[int]], output_lens: list[int], arrival: float,
               progress: Progress, cached: list[int]) -> list[RequestRecord]:
        ids = [self.engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
               for p, n in zip(prompts, output_lens)]
        finals = self.engine.drain(on_final=lambda _: progress(1))
        cached += [finals[rid].num_cached_tokens or 0 for rid in ids]
        return [RequestRecord(arrival, finals[rid].metrics.first_token_time, finals[rid].metrics.finished_time,
                              len(finals[rid].outputs[0].token_ids)) for rid in ids]


class _StepClock:
    """A transformers streamer that records when each generation step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


class TransformersSystem:
    """Hugging Face ``generate``, one request at a time (the usual baseline)."""

    name = "transformers"

    def __init__(self, model, device: torch.device, cache_implementation: str | None = None) -> None:
        self.model, self.device, self.cache = model, device, cache_implementation

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Serves every request (all arriving now); ``progress(1)`` after each."""
        return timed_run(self.name, self.device, prompts, output_lens, self._serve, progress)

    def _serve(self, prompts: list[list[int]], output_lens: list[int], arrival: float) -> list[RequestRecord]:
        clock = _StepClock()
        hf_generate(self.model, torch.tensor(prompts, device=self.device), None, output_lens[0], clock, self.cache)
        return [RequestRecord(arrival, clock.times[0], clock.times[-1], len(clock.times))]


class TransformersBatchedSystem:
    """Hugging Face ``generate`` on static batches (left padding); a batch runs until its
    longest request is done, and only each request's own tokens count."""

    name = "transformers-batched"

    def __init__(self, model, device: torch.device, batch_size: int = 8, pad_token_id: int = 0,
                 cache_implementation: str | None = None) -> None:
        self.model, self.device, self.batch_size, self.pad = model, device, batch_size, pad_token_id
        self.cache = cache_implementation

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Serves every request (all arriving now); ``progress(k)`` after each batch of k."""
        return timed_run(self.name, self.device, prompts, output_lens, self._serve, progress, self.batch_size)

    def _serve(self, batch: list[list[int]], lens: list[int], arrival: float) -> list[RequestRecord]:
        ids, mask = self._left_pad(batch)
        clock = _StepClock()
        hf_generate(self.model, ids, mask, max(lens), clock, self.cache)
        # request of n tokens is done at step n (when the batch got that far)
        return [RequestRecord(arrival, clock.times[0], clock.times[min(n, len(clock.times)) - 1],
                              min(n, len(clock.times))) for n in lens]

    def _left_pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)


@torch.inference_mode()
def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int,
                streamer=None, cache_implementation: str | None = None) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens per row (EOS does not stop it);
    ``ids [B, L]`` (left-padded when ``mask`` is given); ``cache_implementation`` is passed on
    when given (``"static"``; default: transformers' dynamic cache). Returns prompt and new
    tokens."""
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0, streamer=streamer, **extra)


class TorchNaiveSystem:
    """A plain PyTorch greedy decode loop over fastinfer's own model code, one request at a
    time, with one contiguous KV cache per request (one block as long as the request): no
    scheduler, no paging, no batching — the gain from those shows apart from the kernels."""

    name = "torch-naive"

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Serves every request (all arriving now); ``progress(1)`` after each."""
        return timed_run(self.name, self.device, prompts, output_lens, self._serve, progress)

    def _serve(self, prompts: list[list[int]], output_lens: list[int], arrival: float) -> list[RequestRecord]:
        times = self._generate(prompts[0], output_lens[0])
        return [RequestRecord(arrival, times[0], times[-1], len(times))]

    @torch.inference_mode()
    def _generate(self, prompt: list[int], n: int) -> list[float]:
        cfg = self.model.config
        cache = KVCache(cfg.num_layers, 1, len(prompt) + n, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        tokens, pos, times = torch.tensor(prompt, device=self.device), 0, []
        for _ in range(n):
            end = pos + tokens.numel()
            meta = AttentionMetadata.one_sequence(pos, end, self.device)
            hidden = self.model(tokens, torch.arange(pos, end, device=self.device), cache.layers, meta)
            tokens = self.model.compute_logits(hidden[-1:]).argmax(-1)
            times.append(time.monotonic())
            pos = end
        return times
