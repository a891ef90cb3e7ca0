"""Asynchronous scheduling (``EngineConfig(async_scheduling=True)``): step N+1 is launched
with step N's tokens fed on the device before the host reads them. Every request gets the same
tokens, text and finish reasons as without it, exactly one final output, and no block leaks:
with stop strings, EOS, stop token ids, n > 1, chunked prefill, requests joining mid-flight,
steps that must sample on the host (seeded random, logprobs, penalties), preemption under a
tiny KV budget, and aborts."""
from __future__ import annotations

import pytest

from fastinfer import EngineConfig, SamplingParams
from fastinfer.errors import ArgumentTypeError
from fastinfer.model.runner import ModelRunner

from .conftest import make_engine

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived", "def fib(n):",
           "Hello", "1, 2, 3, 4,", "The best way to learn a language is", "import numpy as np\n",
           "Q: What is 12 times 12?\nA:"]


def greedy_params(i: int) -> SamplingParams:
    kinds = [dict(ignore_eos=True), dict(stop=["wizard", "\n"]), dict(), dict(stop_token_ids=[28]),
             dict(n=2, ignore_eos=True)]
    return SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, **kinds[i % len(kinds)])


def host_params(i: int) -> SamplingParams:
    kinds = [dict(temperature=0.8, seed=i), dict(temperature=0.0, logprobs=2),
             dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=0.0)]
    return SamplingParams(max_tokens=6 + 5 * i, **kinds[i % len(kinds)])


def run(loaded, params, abort_after: dict[str, int] | None = None, **options):
    """Final outputs (by prompt index) and the engine, stepping until idle; checks one final
    output per request."""
    engine = make_engine(loaded, **{"kv_cache_memory": "64MiB", "max_num_batched_tokens": 48,
                                    "max_num_seqs": 4, **options})
    ids = [engine.add_request(p, params(i)) for i, p in enumerate(PROMPTS)]
    finals, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        for rid, at in (abort_after or {}).items():
            if steps == at:
                engine.abort(ids[int(rid)])
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals, "two final outputs"
                finals[out.request_id] = out
    assert sorted(finals) == sorted(ids)
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests"] == 0
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in finals[r].outputs]
            for r in ids], engine


@pytest.fixture
def fed_steps(monkeypatch):
    """Counts the steps launched with tokens fed on the device."""
    fed = []
    real = ModelRunner.execute

    def execute(self, inp, all_logits=False, feed=None):
        fed.append(feed is not None)
        return real(self, inp, all_logits, feed)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    return fed


@pytest.mark.parametrize("params", [greedy_params, host_params], ids=["greedy", "host-sampled"])
def test_same_outputs_as_synchronous_scheduling(smollm, params, fed_steps):
    sync, _ = run(smollm, params)
    assert not any(fed_steps)
    fed_steps.clear()
    asynchronous, engine = run(smollm, params, async_scheduling=True)
    assert asynchronous == sync
    finish = {c[2] for outs in sync for c in outs}
    if params is greedy_params:
        assert finish == {"stop", "length"}  # both kinds of ending went through the async path
        assert sum(fed_steps) > 20  # most steps really were fed from the step in flight
    else:
        assert sum(fed_steps) < len(fed_steps) // 2  # host-sampled rows settle first


def test_preemption_and_abort(smollm, fed_steps):
    """A KV budget of 6 blocks forces preemption (of sequences whose last token is still in
    flight); request 1 is aborted at step 5. The others equal the synchronous run."""
    opts = dict(kv_cache_memory=6 * 16 * 30 * 2 * 3 * 64 * 4, max_model_len=96)
    sync, base = run(smollm, greedy_params, {"1": 5}, **opts)
    asynchronous, engine = run(smollm, greedy_params, {"1": 5}, async_scheduling=True, **opts)
    assert engine.stats()["kv_blocks_total"] == 6 and engine.stats()["num_preemptions"] > 0
    assert all(c[2] == "abort" for c in asynchronous[1])
    assert asynchronous[:1] + asynchronous[2:] == sync[:1] + sync[2:]
    assert sum(fed_steps) > 10


def test_the_setting_is_checked():
    assert EngineConfig(async_scheduling=True).async_scheduling is True
    with pytest.raises(ArgumentTypeError, match="async_scheduling must be a bool"):
        EngineConfig(async_scheduling="yes")
