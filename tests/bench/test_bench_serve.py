"""``fastinfer bench serve``: the per-rate metrics and goodput on hand-made records, Poisson send
times, the load generator's schedule, the SSE token count, and one tiny end-to-end sweep of the
HTTP server and the in-process engine on a random model (llama-server skipped: no GGUF file)."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import pytest

from fastinfer.bench.schema import load_result
from fastinfer.bench.serving import (LoadRun, ServeRecord, Slo, failed_record, pair_ratios, poisson_arrivals,
                                     rate_label, run_load, stream_record, summarize_load)
from fastinfer.bench.serving_targets import CompletionsTarget
from fastinfer.cli.bench import rate_list
from fastinfer.cli.main import main
from ..conftest import save_tiny_model


def _records() -> list[ServeRecord]:
    return [
        ServeRecord(0.0, 0.1, 1.1, 11, (100.0, 100.0)),  # TTFT 100 ms, TPOT 100 ms: meets both SLOs
        ServeRecord(0.5, 0.8, 2.8, 5, (500.0,)),         # TPOT 500 ms: misses the TPOT SLO
        ServeRecord(1.0, 3.5, 4.0, 2, (500.0,)),         # TTFT 2500 ms: misses the TTFT SLO
        failed_record(1.5, 1.6, "RuntimeError: 500"),   # failed: in no statistic
        ServeRecord(2.0, 2.05, 2.05, 1),                # one token: no TPOT, meets the TTFT SLO
    ]


def test_summary_percentiles_throughput_and_goodput():
    entry = summarize_load(LoadRun("x", 2.0, _records(), 5.0), Slo(ttft_ms=1000, tpot_ms=200))
    assert (entry["num_requests"], entry["completed"], entry["failed"]) == (5, 4, 1)
    assert entry["errors"] == ["RuntimeError: 500"] and entry["request_rate_req_s"] == 2.0
    assert entry["request_throughput_req_s"] == pytest.approx(4 / 5)
    assert entry["output_tokens"] == 19 and entry["output_throughput_tok_s"] == pytest.approx(19 / 5)
    assert entry["goodput_req_s"] == pytest.approx(2 / 5) and entry["slo_attainment"] == pytest.approx(2 / 5)
    ttft = entry["ttft_ms"]  # successful requests only: 50, 100, 300, 2500
    assert ttft["mean"] == pytest.approx(737.5) and ttft["p50"] == pytest.approx(200.0)
    assert ttft["p90"] == pytest.approx(300 + 0.7 * 2200) and ttft["p99"] == pytest.approx(300 + 0.97 * 2200)
    tpot = entry["tpot_ms"]  # 100, 500, 500 (the one-token request has none)
    assert tpot["mean"] == pytest.approx(1100 / 3) and tpot["p50"] == pytest.approx(500.0)
    assert entry["itl_ms"]["p50"] == pytest.approx(300.0)  # 100, 100, 500, 500
    assert entry["e2e_ms"]["p50"] == pytest.approx((1100 + 2300) / 2)


def test_goodput_follows_the_slos():
    run = LoadRun("x", float("inf"), _records(), 5.0)
    assert summarize_load(run, Slo(ttft_ms=3000, tpot_ms=1000))["goodput_req_s"] == pytest.approx(4 / 5)
    assert summarize_load(run, Slo(ttft_ms=10, tpot_ms=1000))["goodput_req_s"] == 0.0
    assert summarize_load(run, Slo(ttft_ms=3000, tpot_ms=1000))["request_rate_req_s"] is None  # inf


def test_stream_record_checks_the_token_count():
    rec = stream_record(1.0, [1.2, 1.3, 1.5], 1.6, 3, expected_tokens=3)
    assert rec.ok and rec.ttft_ms == pytest.approx(200) and rec.itl_ms == pytest.approx((100, 200))
    assert rec.tpot_ms == pytest.approx(200)  # (1.6 - 1.2) s over 2 tokens
    assert stream_record(1.0, [1.2], 1.3, 2, expected_tokens=3).error == "generated 2 tokens, expected 3"
    assert not stream_record(1.0, [], 1.3, 0).ok


def test_pair_ratios():
    a = {"output_throughput_tok_s": 90.0, "request_throughput_req_s": 1.0, "ttft_ms": {"p50": 30.0},
         "tpot_ms": {"p50": None}}
    b = {"output_throughput_tok_s": 100.0, "request_throughput_req_s": 0.0, "ttft_ms": {"p50": 20.0},
         "tpot_ms": {"p50": 10.0}}
    assert pair_ratios(a, b) == {"output_throughput": pytest.approx(0.9), "request_throughput": None,
                                 "ttft_p50": pytest.approx(1.5), "tpot_p50": None}


@pytest.mark.parametrize("rate", [0.5, 4.0, 64.0])
def test_poisson_arrivals_have_the_rate_and_exponential_gaps(rate):
    times = poisson_arrivals(20001, rate, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and min(gaps) >= 0
    assert 20000 / times[-1] == pytest.approx(rate, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert poisson_arrivals(20001, rate, seed=3) == times and poisson_arrivals(20001, rate, seed=4) != times


def test_poisson_arrivals_inf_and_bad_rates():
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0] and rate_label(float("inf")) == "inf"
    assert rate_label(0.5) == "0.5" and rate_label(4.0) == "4"
    with pytest.raises(ValueError, match="request rate must be > 0"):
        poisson_arrivals(3, 0.0)
    assert rate_list("1,2.5,inf") == [1.0, 2.5, float("inf")]
    for bad in ("0", "1,x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            rate_list(bad)


class _FakeTarget:
    name = "fake"

    async def stream(self, prompt, max_tokens):
        if prompt == [0]:
            raise RuntimeError("refused")
        for _ in range(max_tokens):
            await asyncio.sleep(0.01)
            yield 1


def test_run_load_sends_on_schedule_and_records_failures():
    offsets = [0.0, 0.1, 0.2]

    async def go():
        start = time.monotonic()
        return start, await run_load(_FakeTarget(), [[1], [0], [2]], [3, 2, 2], offsets, 10.0)

    start, run = asyncio.run(go())
    sent = [r.arrival - start for r in run.records]
    assert sent == pytest.approx(offsets, abs=0.05)
    assert [r.ok for r in run.records] == [True, False, True]
    assert run.records[1].error == "RuntimeError: refused"
    assert [r.output_tokens for r in run.records] == [3, 0, 2] and len(run.records[0].itl_ms) == 2
    assert run.duration_s >= 0.2 + 0.02 and run.request_rate == 10.0


def _sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_completions_target_counts_tokens_from_text_chunks_and_usage():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["prompt"] == [5, 6] and body["ignore_eos"] and body["stream"] and body["cache_prompt"] is False
        if body["max_tokens"] == 99:
            return httpx.Response(429, text="busy")
        # llama-server's shape: text chunks, one held-back token (empty text), a final chunk with usage
        return httpx.Response(200, content=_sse(
            {"choices": [{"text": "a", "finish_reason": None}]}, {"choices": [{"text": "", "finish_reason": None}]},
            {"choices": [{"text": "b", "finish_reason": None}]},
            {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 4}}))

    async def go():
        target = CompletionsTarget("t", "http://x", "m", {"cache_prompt": False})
        await target.client.aclose()
        target.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        events = [n async for n in target.stream([5, 6], 4)]
        with pytest.raises(RuntimeError, match="t answered 429"):
            [n async for n in target.stream([5, 6], 99)]
        await target.aclose()
        return events

    assert asyncio.run(go()) == [1, 1, 2]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, hf_smollm_tokenizer):
    out = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(out / "tiny", "llama", hf_smollm_tokenizer)
    paths = {"json": str(out / "r.json"), "md": str(out / "r.md")}
    start = time.monotonic()
    code = main(["bench", "serve", "--model", model, "--num-prompts", "4", "--input-len", "8:16",
                 "--output-len", "4", "--request-rates", "inf", "--systems", "fastinfer-server,fastinfer-engine,llama-server",
                 "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB",
                 "--json", paths["json"], "--markdown", paths["md"]])
    return code, paths, time.monotonic() - start


def test_tiny_sweep_server_and_engine(tiny_sweep):
    code, paths, seconds = tiny_sweep
    assert code == 0
    doc = load_result(paths["json"])  # a valid schema-1 document
    assert doc["command"] == "serve" and doc["env"]["cpu"] and doc["env"]["threads"] >= 1
    assert set(doc["results"]) == {"fastinfer-server@inf", "fastinfer-engine@inf"}
    for entry in doc["results"].values():
        assert entry["completed"] == entry["num_requests"] == 4 and entry["failed"] == 0
        assert entry["output_tokens"] == 16 and entry["goodput_req_s"] >= 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert entry[key]["p50"] > 0 and set(entry[key]) == {"mean", "p50", "p90", "p99"}
    serve = doc["serve"]
    assert serve["systems"] == ["fastinfer-server", "fastinfer-engine"] and serve["request_rates"] == ["inf"]
    assert "needs a GGUF file" in serve["skipped"]["llama-server"]  # the tiny model is a folder
    assert serve["slo"] == {"ttft_ms": 2000.0, "tpot_ms": 200.0}
    ratios = serve["ratios"]["inf"]["fastinfer-server/fastinfer-engine"]
    server, engine = doc["results"]["fastinfer-server@inf"], doc["results"]["fastinfer-engine@inf"]
    assert ratios["output_throughput"] == pytest.approx(
        server["output_throughput_tok_s"] / engine["output_throughput_tok_s"])
    md = open(paths["md"]).read()
    assert "| inf | fastinfer-server | 4/4 |" in md and "fastinfer-server/fastinfer-engine" in md
