"""Batch invariance (float32): 32 prompts of varied lengths generated together give exactly
the tokens each gives alone — greedy, and seeded sampling; with the whole batch prefilled in
one step, and with prompts cut into chunked-prefill pieces by a small token budget."""
from __future__ import annotations

import pydoc_data.topics as topics
import pytest

from fastinfer import SamplingParams

from .conftest import make_engine, run_to_completion

NEW_TOKENS = 24


def varied_prompts(tokenizer, count: int = 32) -> list[list[int]]:
    """``count`` slices of CPython's language reference, 3 to ~200 tokens long."""
    text = " ".join(topics.topics[k] for k in sorted(topics.topics)[:40])
    ids = tokenizer.encode(text)
    out, pos = [], 0
    for i in range(count):
        n = 3 + (i * 37) % 200
        out.append(ids[pos:pos + n])
        pos += n
    return out


def params_for(kind: str, i: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, top_k=50,
                          seed=1000 + i, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [8192, 256], ids=["one-step-prefill", "chunked-prefill"])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_batched_equals_alone(smollm, kind, budget):
    prompts = varied_prompts(smollm.tokenizer)
    assert len({len(p) for p in prompts}) > 20
    batched = make_engine(smollm, kv_cache_memory="256MiB", max_model_len=1024, max_num_seqs=32,
                          max_num_batched_tokens=budget)
    ids = [batched.add_request(p, params_for(kind, i)) for i, p in enumerate(prompts)]
    finals = run_to_completion(batched)
    together = [finals[r].outputs[0].token_ids for r in ids]
    if budget == 8192:
        assert batched.num_steps == NEW_TOKENS  # really one batch: all 32 prefilled in one step
    else:  # prompts were cut into pieces that differ from the solo runs' single prefill
        assert batched.num_steps > NEW_TOKENS + 5

    for i, (p, alone) in enumerate(zip(prompts, solo_outputs(smollm, kind, prompts))):
        assert alone == together[i], f"prompt {i} ({len(p)} tokens) differs when batched"


_SOLO: dict[str, list[list[int]]] = {}


def solo_outputs(smollm, kind: str, prompts) -> list[list[int]]:
    """Each prompt run alone (computed once per sampling kind: both budgets compare with it)."""
    if kind not in _SOLO:
        alone_engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=1024)
        outs = []
        for i, p in enumerate(prompts):
            rid = alone_engine.add_request(p, params_for(kind, i))
            outs.append(run_to_completion(alone_engine)[rid].outputs[0].token_ids)
        _SOLO[kind] = outs
    return _SOLO[kind]
