"""Random interleavings of add / abort / step against a tiny KV budget: every request ends
with exactly one final output, no block leaks, and finished requests have the lengths asked."""
from __future__ import annotations

import random

import pytest
import torch

from fastinfer import InvalidRequestError, SamplingParams
from fastinfer.model.loader import load_model

from .conftest import CPU, make_engine, save_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, hf_smollm_tokenizer):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", hf_smollm_tokenizer)
    return load_model(folder, torch.float32, CPU)


def random_params(rng: random.Random, greedy_share: float) -> SamplingParams:
    if rng.random() < greedy_share:
        return SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0, ignore_eos=True)
    return SamplingParams(n=rng.randint(1, 3), max_tokens=rng.randint(1, 40), temperature=1.0,
                          top_p=0.9, seed=rng.randint(0, 1000), ignore_eos=True)


@pytest.mark.parametrize("seed,async_scheduling,offload", [(0, False, False), (1, False, True), (6, False, False),
                                                          (3, True, False), (5, True, True)])
def test_random_add_abort_step_keeps_every_invariant(tiny_llama, seed, async_scheduling, offload, monkeypatch):
    """With async scheduling, most requests are greedy, so that most steps are launched before
    the host reads the previous step's tokens. ``offload``: a host tier of 6 blocks and swap
    preemption, so that preempted requests and evicted prefixes compete for the tier."""
    from fastinfer.model.runner import ModelRunner

    fed, real_execute = [], ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute", lambda self, inp, all_logits=False, feed=None: fed.append(
        feed is not None) or real_execute(self, inp, all_logits, feed))
    rng = random.Random(seed)
    # 10 blocks of 16 tokens: far fewer than the workload needs, so preemption is routine
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    engine = make_engine(tiny_llama, kv_cache_memory=10 * block_bytes, max_model_len=160,
                         max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=256,
                         async_scheduling=async_scheduling, kv_offload_memory=6 * block_bytes if offload else None,
                         preemption_mode="swap" if offload else "auto")
    assert engine.stats()["kv_blocks_total"] == 10
    submitted, aborted, finals = {}, set(), {}
    for _ in range(150):
        op = rng.random()
        if op < 0.3:
            prompt = [rng.randrange(1, 5000) for _ in range(rng.randint(1, 60))]
            params = random_params(rng, 0.8 if async_scheduling else 0.5)
            try:
                rid = engine.add_request(prompt, params)
            except InvalidRequestError:
                continue  # too large for this cache: rejected up front, nothing else changes
            submitted[rid] = params
        elif op < 0.4 and submitted:
            rid = rng.choice(sorted(submitted))
            if engine.abort(rid):
                aborted.add(rid)
        else:
            for out in engine.step():
                if out.finished:
                    assert out.request_id not in finals, "two final outputs"
                    finals[out.request_id] = out
            engine.block_manager.check()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals, "two final outputs"
                finals[out.request_id] = out
    assert set(finals) == set(submitted)
    for rid, out in finals.items():
        params = submitted[rid]
        assert len(out.outputs) == params.n
        for c in out.outputs:
            if c.finish_reason == "abort":
                assert rid in aborted and len(c.token_ids) <= params.max_tokens
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == params.max_tokens
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and aborted  # the run really exercised both paths
    assert (sum(fed) > 20) if async_scheduling else not any(fed)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["kv_offload_blocks"] <= stats["kv_offload_blocks_total"] and stats["num_swapped"] == 0
    assert (stats["num_swap_preemptions"] > 0) == offload  # swaps only with a tier (and they happen)
    engine.block_manager.check()
    assert stats["num_running"] == stats["num_waiting"] == stats["num_requests"] == 0
