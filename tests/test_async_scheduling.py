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

from .conftest import make_engine, run_to_completion

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


def run(loaded, params, abort_after: dict[str, int] | None = None, each_step=None, drain=False, **options):
    """Final outputs (by prompt index) and the engine, stepping until idle (``each_step(engine,
    step)`` before each step; or ``drain``); checks one final output per request."""
    engine = make_engine(loaded, **{"kv_cache_memory": "64MiB", "max_num_batched_tokens": 48,
                                    "max_num_seqs": 4, **options})
    ids = [engine.add_request(p, params(i)) for i, p in enumerate(PROMPTS)]
    finals = engine.drain() if drain else {}

    def before(step: int) -> None:
        for rid in (r for r, at in (abort_after or {}).items() if at == step):
            engine.abort(ids[int(rid)])
        if each_step is not None:
            each_step(engine, step)

    rest = run_to_completion(engine, before)
    assert not set(rest) & set(finals), "two final outputs"
    finals.update(rest)
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


@pytest.mark.parametrize("params,options", [(greedy_params, {}), (host_params, {}),
                                            (greedy_params, {"max_model_len": 24})],
                         ids=["greedy", "host-sampled", "max-model-len"])
def test_same_outputs_as_synchronous_scheduling(smollm, params, options, fed_steps):
    sync, _ = run(smollm, params, **options)
    assert not any(fed_steps)
    fed_steps.clear()
    asynchronous, engine = run(smollm, params, async_scheduling=True, **options)
    assert asynchronous == sync
    finish = {c[2] for outs in sync for c in outs}
    if params is greedy_params:
        assert finish == {"stop", "length"}  # both kinds of ending went through the async path
        assert sum(fed_steps) > 20  # most steps really were fed from the step in flight
        if options:  # some ended at max_model_len, not at max_tokens
            assert any(len(c[0]) < 6 + 5 * i and c[2] == "length" for i, outs in enumerate(sync) for c in outs)
        else:  # and through drain (LLM.generate)
            assert run(smollm, params, drain=True, async_scheduling=True)[0] == sync
    else:
        assert sum(fed_steps) < len(fed_steps) // 2  # host-sampled rows settle first


def test_switched_on_and_off_between_steps(smollm, fed_steps):
    """As gpu_bench does on one engine: each switch takes effect at the next step."""
    sync, _ = run(smollm, greedy_params)
    fed_steps.clear()

    def switch(engine, step):
        engine.async_scheduling = step % 6 < 3

    assert run(smollm, greedy_params, each_step=switch)[0] == sync
    assert 0 < sum(fed_steps) < len(fed_steps)


def test_an_exception_in_a_step_loses_nothing(smollm, monkeypatch):
    """A failure while the host settles a step's tokens (here: in the stop checks of the third
    settled token) propagates; the next steps settle the rest, and every request still ends
    with one final output, no placeholder in its tokens, and the engine serves on."""
    from fastinfer.engine.engine import PENDING
    from fastinfer.engine.output_processor import OutputProcessor

    real_check, calls = OutputProcessor.accept, []

    def check(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real_check(self, *args)

    monkeypatch.setattr(OutputProcessor, "accept", check)
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_num_seqs=4, async_scheduling=True)
    ids = [engine.add_request(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    finals, failed = {}, 0
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except RuntimeError as exc:
            assert "injected" in str(exc)
            failed += 1
            continue
        for out in outs:
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    assert failed == 1 and sorted(finals) == sorted(ids)
    for out in finals.values():
        tokens = out.outputs[0].token_ids
        assert PENDING not in tokens and 8 <= len(tokens) <= 9  # the failed check may let one more through
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(engine.drain([rid])[rid].outputs[0].token_ids) == 4


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
