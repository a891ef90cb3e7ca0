"""Generation features on the default model: stop strings and ids, EOS, logprobs, n > 1,
seeds, and the LLM API (order, chat template)."""
from __future__ import annotations

import math

import pytest

from fastinfer import SamplingParams

from .conftest import make_engine, run_to_completion

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def engine(smollm):
    return make_engine(smollm, kv_cache_memory="128MiB", max_model_len=1024)


def generate(engine, prompt, **params):
    rid = engine.add_request(prompt, SamplingParams(**params))
    return run_to_completion(engine)[rid]


def test_stop_string_across_token_boundary_is_cut(engine):
    base = generate(engine, PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True).outputs[0]
    tok = engine.tokenizer
    pieces = [tok.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    # a stop string that starts inside token 10 and ends inside token 11 (or later)
    start = len(pieces[10]) - 2
    stop = base.text[start:start + 5]
    assert start > 0 and len(stop) == 5
    cut = base.text.find(stop)
    out = generate(engine, PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.text == base.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[: len(out.token_ids)]


def test_stop_token_id_ends_generation(engine):
    base = generate(engine, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True).outputs[0]
    stop_id = base.token_ids[6]
    first = base.token_ids.index(stop_id)
    out = generate(engine, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True,
                   stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_eos_stops_unless_ignored(engine):
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    out = generate(engine, chat, max_tokens=64, temperature=0.0).outputs[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
    assert out.token_ids[-1] in engine.eos_token_ids
    longer = generate(engine, chat, max_tokens=len(out.token_ids) + 5, temperature=0.0, ignore_eos=True)
    assert longer.outputs[0].finish_reason == "length"
    assert longer.outputs[0].token_ids[: len(out.token_ids)] == out.token_ids


def test_max_tokens_gives_length(engine):
    out = generate(engine, PROMPT, max_tokens=7, temperature=0.0, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_logprobs_hold_sampled_and_top_tokens(engine):
    out = generate(engine, PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3).outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and 3 <= len(lp) <= 4
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
        assert all(v <= 0 for v in lp.values())
        assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-5


def test_n_samples_differ_and_seed_reproduces(engine):
    params = dict(n=3, max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a = generate(engine, PROMPT, **params)
    b = generate(engine, PROMPT, **params)
    assert [c.index for c in a.outputs] == [0, 1, 2]
    texts = [c.token_ids for c in a.outputs]
    assert len({tuple(t) for t in texts}) == 3
    assert texts == [c.token_ids for c in b.outputs]
    other = generate(engine, PROMPT, **{**params, "seed": 99})
    assert [c.token_ids for c in other.outputs] != texts


def test_llm_generate_keeps_input_order_and_chat(smollm_path):
    from fastinfer import LLM

    llm = LLM(smollm_path, dtype="float32", kv_cache_memory="64MiB", max_model_len=512, quantization="none")
    prompts = ["Count: one, two,", "The color of the sky is", [1, 504, 3575]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 3, 6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 3, 6]
    assert outs[0].prompt == prompts[0] and outs[2].prompt_token_ids == [1, 504, 3575]
    assert outs[0].metrics.first_token_time >= outs[0].metrics.arrival_time
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    assert chat[0].outputs[0].text.strip() == "The capital of France is Paris."
    assert llm.stats()["num_running"] == 0
