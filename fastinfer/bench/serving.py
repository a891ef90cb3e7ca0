"""The serving benchmark's load generator and metrics (``fastinfer bench serve``).

One workload is replayed against a *target* (the HTTP server, the in-process engine, llama-server)
with Poisson arrivals at a request rate; every target streams the same token ids, greedy, with EOS
ignored. The generator owns the clock, so the three targets are timed by the same code: a request
starts when it is sent, its first token is the first event that carries a token, it ends when its
stream ends.

Per request: TTFT, TPOT (mean time per output token after the first), ITL (gaps between token
events), end-to-end latency, output tokens, success. Per rate: throughputs, the percentiles of
``schema.percentiles`` and goodput (requests/s that met both SLOs).
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastinfer.bench.schema import percentiles
from fastinfer.bench.systems import RequestRecord

INF = math.inf


class Target(Protocol):
    """What the load generator drives: ``stream`` sends one request and yields, as they arrive,
    the number of new tokens each event carries."""

    name: str

    def stream(self, prompt: list[int], max_tokens: int) -> AsyncIterator[int]: ...


@dataclass(frozen=True, slots=True)
class ServeRecord(RequestRecord):
    """One request of a serving run (``arrival`` is when it was sent): the gaps between token
    events (ms) and, for a failed request, what went wrong."""

    itl_ms: tuple[float, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class LoadRun:
    """One target's pass over the workload at one rate; ``duration_s`` runs from the first
    scheduled arrival to the end of the last request."""

    system: str
    request_rate: float
    records: list[ServeRecord]
    duration_s: float


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives a request must meet to count towards goodput (ms)."""

    ttft_ms: float
    tpot_ms: float

    def met(self, rec: ServeRecord) -> bool:
        """A successful request within both objectives (a one-token request has no TPOT)."""
        tpot = rec.tpot_ms
        return rec.ok and rec.ttft_ms <= self.ttft_ms and (tpot is None or tpot <= self.tpot_ms)


def rate_label(rate: float) -> str:
    """``inf`` or the rate as the shortest decimal (``0.5``, ``4``)."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s after the start) of a Poisson process of ``rate`` requests/s: the first at
    0, then exponential gaps of mean ``1 / rate``. ``rate`` inf sends every request at 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng, t, times = random.Random(seed), 0.0, []
    for i in range(num_requests):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


def stream_record(sent: float, event_times: Sequence[float], end: float, output_tokens: int,
                  expected_tokens: int | None = None) -> ServeRecord:
    """The record of one streamed request from its send time, the times of its token events
    and its end; failed when no token came or the count differs from ``expected_tokens``."""
    if not event_times:
        return failed_record(sent, end, "the stream carried no token")
    itl = tuple((b - a) * 1e3 for a, b in zip(event_times, event_times[1:]))
    error = None
    if expected_tokens is not None and output_tokens != expected_tokens:
        error = f"generated {output_tokens} tokens, expected {expected_tokens}"
    return ServeRecord(sent, event_times[0], end, output_tokens, itl, error)


def failed_record(sent: float, end: float, error: str) -> ServeRecord:
    """A request that failed after ``end - sent`` seconds."""
    return ServeRecord(sent, end, end, 0, (), error)


async def timed_request(target: Target, prompt: list[int], max_tokens: int) -> ServeRecord:
    """Sends one request now and times its token events; any error becomes a failed record."""
    sent, times, count = time.monotonic(), [], 0
    try:
        async for n in target.stream(prompt, max_tokens):
            if n > 0:
                times.append(time.monotonic())
                count += n
    except Exception as exc:  # one failed request is a data point of the run, not its end
        return failed_record(sent, time.monotonic(), f"{type(exc).__name__}: {exc}")
    return stream_record(sent, times, time.monotonic(), count, max_tokens)


async def run_load(target: Target, prompts: Sequence[list[int]], output_lens: Sequence[int],
                   offsets: Sequence[float], request_rate: float = INF) -> LoadRun:
    """Sends request ``i`` at ``offsets[i]`` seconds after the start (without waiting for the
    others) and collects every record."""
    start = time.monotonic()

    async def one(i: int) -> ServeRecord:
        delay = start + offsets[i] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await timed_request(target, prompts[i], output_lens[i])

    records = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return LoadRun(target.name, request_rate, list(records), max(r.finish for r in records) - start)


def summarize_load(run: LoadRun, slo: Slo, peak_memory_mb: float | None = None) -> dict:
    """The result entry of one run: the schema's fields (throughputs, ``total_time_s``, TTFT,
    TPOT and e2e percentiles over the successful requests) plus ITL, goodput and counts."""
    ok = [r for r in run.records if r.ok]
    duration = run.duration_s if run.duration_s > 0 else math.nan
    tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if slo.met(r))
    rate = None if math.isinf(run.request_rate) else run.request_rate
    return {
        "system": run.system, "request_rate_req_s": rate,
        "num_requests": len(run.records), "completed": len(ok), "failed": len(run.records) - len(ok),
        "errors": sorted({r.error for r in run.records if r.error is not None})[:5],
        "total_time_s": run.duration_s,
        "request_throughput_req_s": _per_s(len(ok), duration),
        "output_throughput_tok_s": _per_s(tokens, duration),
        "output_tokens": tokens,
        "goodput_req_s": _per_s(good, duration),
        "slo_attainment": good / len(run.records) if run.records else 0.0,
        "ttft_ms": percentiles([r.ttft_ms for r in ok]),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl_ms]),
        "e2e_ms": percentiles([r.e2e_ms for r in ok]),
        "peak_memory_mb": peak_memory_mb,
    }


def _per_s(count: float, duration_s: float) -> float:
    return 0.0 if math.isnan(duration_s) else count / duration_s


RATIO_METRICS = {"output_throughput": ("output_throughput_tok_s",), "request_throughput": ("request_throughput_req_s",),
                 "ttft_p50": ("ttft_ms", "p50"), "tpot_p50": ("tpot_ms", "p50")}


def pair_ratios(num: dict, den: dict) -> dict[str, float | None]:
    """``num``'s metric over ``den``'s for each of ``RATIO_METRICS`` (None where one is missing
    or the denominator is zero): throughputs above 1 favour ``num``, latencies below 1 do."""
    out: dict[str, float | None] = {}
    for name, path in RATIO_METRICS.items():
        a, b = _get(num, path), _get(den, path)
        out[name] = a / b if a is not None and b else None
    return out


def _get(entry: dict, path: tuple[str, ...]) -> float | None:
    value = entry
    for key in path:
        value = value[key]
    return value
