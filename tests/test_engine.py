"""The Engine API: continuous batching is observable, preemption under a tiny KV budget,
abort, stats, and bad input that never disturbs other requests."""
from __future__ import annotations

import pytest

from fastinfer import InvalidRequestError, RequestTooLargeError, SamplingParams

from .conftest import make_engine, run_to_completion

GREEDY = dict(temperature=0.0, ignore_eos=True)


def solo_tokens(loaded, prompt, max_tokens: int) -> list[int]:
    engine = make_engine(loaded, kv_cache_memory="64MiB", max_model_len=1024)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    return run_to_completion(engine)[rid].outputs[0].token_ids


def test_requests_finish_at_different_steps_and_join_mid_flight(smollm):
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024, max_num_seqs=8)
    lens = {"a": 4, "b": 6, "c": 10}
    for rid, n in lens.items():
        engine.add_request(f"Request {rid} says hello", SamplingParams(max_tokens=n, **GREEDY), request_id=rid)
    finished_at: dict[str, int] = {}
    running_after_join = None
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
        if step == 2:  # a new request joins while a, b and c are mid-flight
            engine.add_request("A late request", SamplingParams(max_tokens=4, **GREEDY), request_id="late")
        if step == 3:
            running_after_join = engine.stats()["num_running"]
    # one prefill step then one decode step per token: a request of n tokens ends at step n
    assert finished_at == {"a": 4, "b": 6, "c": 10, "late": 6}
    assert running_after_join == 4  # late was admitted into the running batch at step 3
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_drain_builds_final_outputs_only_and_a_delta_request_gets_everything(smollm, monkeypatch):
    """drain reads only final outputs, so its steps build none for running requests (a
    cumulative output copies everything so far: one per step would be quadratic); the final
    output of a "delta" request then carries the whole completion."""
    from fastinfer.engine.request import Request

    built = []
    real_output = Request.output
    monkeypatch.setattr(Request, "output", lambda self: built.append(self.request_id) or real_output(self))
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024)
    kinds = ("cumulative", "delta", "final_only")
    ids = [engine.add_request("The capital of France is", SamplingParams(max_tokens=12, output_kind=k, **GREEDY))
           for k in kinds]
    finals = engine.drain()
    assert sorted(built) == sorted(ids)  # one output each: the final one
    outs = [finals[r].outputs[0] for r in ids]
    assert all(o.finished and len(o.token_ids) == 12 for o in outs)
    assert [o.token_ids for o in outs[1:]] == [outs[0].token_ids] * 2
    assert [o.text for o in outs[1:]] == [outs[0].text] * 2 and outs[0].text


def test_tiny_kv_budget_preempts_and_still_finishes_correctly(smollm):
    # one block of 16 tokens holds 2*30*16*3*64*4 bytes = 737,280 bytes in float32
    engine = make_engine(smollm, kv_cache_memory=12 * 737_280, max_model_len=1024)
    assert engine.stats()["kv_blocks_total"] == 12
    prompts = [f"Item {i}: the weather in city number {i} is" for i in range(8)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=40, **GREEDY)) for p in prompts]
    finals = run_to_completion(engine)
    assert engine.stats()["num_preemptions"] > 0
    assert engine.stats()["kv_blocks_free"] == 12
    for rid, prompt in zip(ids, prompts):
        out = finals[rid].outputs[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 40
        assert out.token_ids == solo_tokens(smollm, prompt, 40)


def test_abort_ends_one_request_and_keeps_the_others(smollm):
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024)
    keep = engine.add_request("Keep going", SamplingParams(max_tokens=8, **GREEDY))
    drop = engine.add_request("Stop me", SamplingParams(max_tokens=50, **GREEDY))
    waiting = engine.add_request("Never started", SamplingParams(max_tokens=5, **GREEDY))
    engine.step()
    assert engine.abort(drop) and engine.abort(waiting)
    assert not engine.abort(drop) and not engine.abort("unknown")
    finals = run_to_completion(engine)
    assert finals[drop].outputs[0].finish_reason == "abort"
    assert finals[waiting].outputs[0].finish_reason == "abort"
    assert finals[keep].outputs[0].finish_reason == "length"
    assert len(finals[keep].outputs[0].token_ids) == 8
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_stats_has_the_documented_keys(smollm):
    stats = make_engine(smollm, kv_cache_memory="32MiB", max_model_len=512).stats()
    for key in ("num_running", "num_waiting", "num_preemptions", "kv_blocks_total", "kv_blocks_free"):
        assert isinstance(stats[key], int)


BAD_REQUESTS = [
    ("", {}, InvalidRequestError, "prompt is empty"),
    ([], {}, InvalidRequestError, "prompt is empty"),
    ([1, 2, 49152], {}, InvalidRequestError, "token id 49152 at position 2 is outside the vocabulary"),
    ([5, -1], {}, InvalidRequestError, "token id -1 at position 1"),
    ("word " * 300, {}, RequestTooLargeError, "max_model_len is 256"),
    ("Hello", {"max_tokens": 250}, RequestTooLargeError, "needs 16 KV-cache blocks"),
    (3.5, {}, InvalidRequestError, "prompt must be a string or a sequence of int token ids, got float 3.5"),
]


@pytest.mark.parametrize("prompt,params,error,message", BAD_REQUESTS)
def test_bad_request_is_rejected_and_others_complete(smollm, prompt, params, error, message):
    # 15 blocks of 16 tokens: a request needing more than 240 tokens can never fit
    engine = make_engine(smollm, kv_cache_memory=15 * 737_280, max_model_len=256)
    good = engine.add_request("The capital of France is", SamplingParams(max_tokens=5, **GREEDY))
    with pytest.raises(error, match=message):
        engine.add_request(prompt, SamplingParams(**params))
    assert engine.stats()["num_waiting"] == 1
    finals = run_to_completion(engine)
    assert list(finals) == [good] and len(finals[good].outputs[0].token_ids) == 5


@pytest.mark.parametrize("field,value,message", [
    ("max_tokens", 0, "max_tokens must be an int >= 1, got 0"),
    ("temperature", -0.5, "temperature must be a number >= 0"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
    ("top_k", -3, "top_k must be"),
    ("n", 0, "n must be"),
    ("stop", [""], r"stop\[0\] is empty"),
])
def test_invalid_sampling_params_name_the_field(smollm, field, value, message):
    engine = make_engine(smollm, kv_cache_memory="32MiB", max_model_len=256)
    good = engine.add_request("Hello there", SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match=message):
        engine.add_request("Hello", SamplingParams(**{field: value}))
    finals = run_to_completion(engine)
    assert len(finals[good].outputs[0].token_ids) == 3


def test_duplicate_request_id_is_rejected(smollm):
    engine = make_engine(smollm, kv_cache_memory="32MiB", max_model_len=256)
    engine.add_request("Hello", SamplingParams(max_tokens=2, **GREEDY), request_id="x")
    with pytest.raises(InvalidRequestError, match="request_id 'x' is already in use"):
        engine.add_request("Hello", request_id="x")
    assert len(run_to_completion(engine)) == 1
