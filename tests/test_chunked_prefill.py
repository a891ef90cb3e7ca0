"""Chunked prefill: long prompts are read in pieces under the token budget while decodes keep
flowing, and the tokens are exactly those of a one-piece prefill (float32, greedy and seeded)."""
from __future__ import annotations

import pytest

from fastinfer import EngineConfig, SamplingParams

from .conftest import make_engine, run_to_completion
from .test_batch_invariance import varied_prompts


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=5)])
def test_chunked_prefill_gives_the_same_tokens(smollm, sampling):
    prompt = max(varied_prompts(smollm.tokenizer), key=len) * 2  # ~400 tokens
    params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)
    whole = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024, max_num_batched_tokens=1024)
    chunked = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024, max_num_batched_tokens=48)
    a = run_to_completion_single(whole, prompt, params)
    b = run_to_completion_single(chunked, prompt, params)
    assert a == b
    assert chunked.num_steps == -(-len(prompt) // 48) + 11 > whole.num_steps == 12


def run_to_completion_single(engine, prompt, params) -> list[int]:
    rid = engine.add_request(prompt, params)
    return run_to_completion(engine)[rid].outputs[0].token_ids


def test_decodes_continue_while_a_long_prompt_is_read(smollm):
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024, max_num_batched_tokens=32)
    greedy = dict(temperature=0.0, ignore_eos=True)
    short = engine.add_request("Hello there,", SamplingParams(max_tokens=30, **greedy))
    engine.step()
    long_prompt = max(varied_prompts(smollm.tokenizer), key=len)
    assert len(long_prompt) > 100
    late = engine.add_request(long_prompt, SamplingParams(max_tokens=3, **greedy))
    counts = []
    for _ in range(4):  # the long prompt needs several 31-token pieces; 'short' decodes every step
        outs = {o.request_id: o for o in engine.step()}
        counts.append(len(outs[short].outputs[0].token_ids))
        assert late not in outs  # still reading its prompt: no output yet
    assert counts == [2, 3, 4, 5]
    finals = run_to_completion(engine)
    assert len(finals[late].outputs[0].token_ids) == 3


def test_without_chunking_the_budget_must_hold_a_prompt():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(64\) must be >= max_model_len \(128\)"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=64).token_budget(128)
    assert EngineConfig(max_num_batched_tokens=64).token_budget(128) == 64
