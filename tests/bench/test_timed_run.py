"""The one timed loop behind every benchmark system (``systems.timed_run``): requests served
in chunks under one clock, all arriving at the start, progress after each chunk, and a run
refused when a request did not generate what it was asked for."""
from __future__ import annotations

import time

import pytest
import torch

from fastinfer.bench.systems import RequestRecord, timed_run


def _fake_serve(calls: list):
    def serve(prompts, lens, arrival):
        calls.append((len(prompts), list(lens), arrival))
        now = time.monotonic()
        return [RequestRecord(arrival, now, now, n) for n in lens]
    return serve


@pytest.mark.parametrize("chunk, sizes", [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (None, [5]), (8, [5])])
def test_requests_are_served_in_chunks_with_one_arrival(chunk, sizes):
    calls, progress = [], []
    run = timed_run("fake", torch.device("cpu"), [[1]] * 5, [3, 1, 4, 1, 5], _fake_serve(calls), progress.append,
                    chunk)
    assert [c[0] for c in calls] == sizes and progress == sizes
    assert len({c[2] for c in calls}) == 1  # every request arrived at the start
    assert [c for call in calls for c in call[1]] == [3, 1, 4, 1, 5]
    assert [r.output_tokens for r in run.records] == [3, 1, 4, 1, 5]
    assert run.system == "fake" and run.total_time_s > 0 and run.peak_memory_mb > 0


def test_a_request_short_of_its_tokens_fails_the_run():
    def serve(prompts, lens, arrival):
        return [RequestRecord(arrival, arrival, arrival, n - 1) for n in lens]

    with pytest.raises(RuntimeError, match="short: request 0 generated 2 tokens, expected 3"):
        timed_run("short", torch.device("cpu"), [[1]], [3], serve)


def test_the_clock_covers_every_chunk():
    def serve(prompts, lens, arrival):
        time.sleep(0.02)
        return [RequestRecord(arrival, arrival, time.monotonic(), n) for n in lens]

    run = timed_run("slow", torch.device("cpu"), [[1]] * 3, [1, 1, 1], serve)
    assert run.total_time_s >= 0.06
    assert run.records[-1].e2e_ms >= 60 - 1  # the last request waited for the chunks before it


def test_an_empty_workload_serves_nothing():
    calls: list = []
    run = timed_run("none", torch.device("cpu"), [], [], _fake_serve(calls), chunk=None)
    assert calls == [] and run.records == []
