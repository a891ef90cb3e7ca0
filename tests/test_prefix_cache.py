"""KV-cache management through the engine, on a tiny random Llama in float32: prefix caching
(outputs identical on and off, counters, eviction), copy-on-write samples, swap and recompute
preemption, priorities, KV events; after every workload the block pools are back at their
start."""
from __future__ import annotations

import random

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.engine.engine import Engine
from fastinfer.kv_cache.block_manager import COPY, BlockOps
from fastinfer.kv_cache.cache import bytes_per_block
from fastinfer.kv_cache.events import BlockRemoved, BlockStored
from fastinfer.model.loader import load_model
from fastinfer.model.runner import ModelRunner
from fastinfer.scheduler.scheduler import SchedulerOutput

from .conftest import CPU, make_engine, run_to_completion, save_tiny_model

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: 2 layers, k and v, 16 slots, 2 kv heads, 16 dims, float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, hf_smollm_tokenizer):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", hf_smollm_tokenizer)
    return load_model(folder, torch.float32, CPU)


def shared_prefix_prompts(n: int, prefix_len: int = 70, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 5000) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(1, 5000) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def generate(engine: Engine, prompts, params, priorities=None) -> list[list[list[int]]]:
    """Token ids of every sample of every prompt, submitted together; checks the pools after."""
    ids = [engine.add_request(p, params, priority=(priorities or [0] * len(prompts))[i])
           for i, p in enumerate(prompts)]
    finals = run_to_completion(engine)
    assert_pools_at_rest(engine)
    return [[c.token_ids for c in finals[i].outputs] for i in ids]


def assert_pools_at_rest(engine: Engine) -> None:
    engine.block_manager.check()
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_swapped"] == 0
    assert all(r == 0 for r in engine.block_manager.pool.ref)


def count_computed(monkeypatch) -> list[int]:
    """Records the tokens each step computes."""
    computed, real = [], ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute", lambda self, inp, all_logits=False, feed=None: computed.append(
        sum(len(t) for t in inp.token_ids)) or real(self, inp, all_logits, feed))
    return computed


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_are_identical_with_the_cache_on_and_off(tiny, params, monkeypatch):
    prompts = shared_prefix_prompts(12)
    off = generate(make_engine(tiny, enable_prefix_caching=False, max_num_batched_tokens=128), prompts, params)
    computed = count_computed(monkeypatch)
    engine = make_engine(tiny, max_num_batched_tokens=128)
    assert generate(engine, prompts, params) == off
    stats = engine.stats()
    assert stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert stats["prefix_cache_hits"] >= 64 * (len(prompts) - 2)  # 4 blocks of the 70-token prefix, most requests
    assert sum(computed) == sum(map(len, prompts)) + 11 * len(prompts) - stats["prefix_cache_hits"]
    # a repeat of the whole batch finds even more cached
    again = generate(engine, prompts, params)
    assert again == off and engine.stats()["prefix_cache_hits"] > 2 * stats["prefix_cache_hits"]


def test_eviction_under_pressure_keeps_outputs_correct(tiny):
    prompts = shared_prefix_prompts(6, seed=1) + shared_prefix_prompts(6, seed=2)
    random.Random(0).shuffle(prompts)
    roomy = generate(make_engine(tiny, enable_prefix_caching=False), prompts, GREEDY)
    engine = make_engine(tiny, kv_cache_memory=14 * BLOCK_BYTES, max_num_seqs=2)  # two requests' worth
    removed: list[BlockRemoved] = []
    engine.on_kv_events(lambda batch: removed.extend(e for e in batch.events if isinstance(e, BlockRemoved)))
    assert generate(engine, prompts, GREEDY) == roomy
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["kv_blocks_cached"] <= 14
    assert removed, "the pool of 14 blocks never evicted a cached block"


def test_n_samples_share_the_prompt_and_give_the_same_samples(tiny, monkeypatch):
    """n=4 with a seed: the same samples as when each sample computed its own prompt (before
    copy-on-write), with fewer blocks at the peak."""
    prompt = shared_prefix_prompts(1, prefix_len=90)[0]
    params = SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)

    def run(fork: bool) -> tuple[list[list[int]], int]:
        engine = make_engine(tiny, enable_prefix_caching=False)
        rid = engine.add_request(prompt, params)
        if not fork:
            for s in engine._requests[rid].samples:
                s.seq.fork_of = None  # the behaviour before copy-on-write
        peak = 0
        while engine.has_unfinished():
            for out in engine.step():
                samples = [c.token_ids for c in out.outputs]
            peak = max(peak, engine.stats()["kv_blocks_total"] - engine.stats()["kv_blocks_free"])
        assert_pools_at_rest(engine)
        return samples, peak

    shared, shared_peak = run(fork=True)
    alone, alone_peak = run(fork=False)
    assert shared == alone and len({tuple(s) for s in shared}) > 1
    # alone: 4 x 7 blocks; shared: the prompt's full blocks once, plus each sample's own last
    # prompt block (copied when it first writes) and the blocks of its new tokens: 13
    assert alone_peak == 4 * 7 and shared_peak <= alone_peak // 2


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_preemption_gives_the_outputs_of_an_unconstrained_run(tiny, mode, monkeypatch):
    prompts = shared_prefix_prompts(6, prefix_len=20, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = generate(make_engine(tiny, enable_prefix_caching=False), prompts, params)
    computed = count_computed(monkeypatch)
    offload = 64 * BLOCK_BYTES if mode != "recompute" else None
    engine = make_engine(tiny, kv_cache_memory=10 * BLOCK_BYTES, enable_prefix_caching=False,
                         kv_offload_memory=offload, preemption_mode=mode)
    assert generate(engine, prompts, params) == roomy
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    exact = sum(map(len, prompts)) + 39 * len(prompts)  # every token once; the last sampled one is never computed
    if mode == "recompute":
        assert stats["num_swap_preemptions"] == 0 and sum(computed) > exact
    else:
        assert stats["num_swap_preemptions"] == stats["num_preemptions"] and stats["kv_offload_loads"] > 0
        assert sum(computed) == exact  # swap recomputes no token


def test_priority_order_is_respected_under_pressure(tiny):
    engine = make_engine(tiny, kv_cache_memory=8 * BLOCK_BYTES, max_num_seqs=4)
    prompts = shared_prefix_prompts(6, prefix_len=10, seed=5)
    priorities = [5, 5, 0, 9, 0, 1]
    order = []
    ids = [engine.add_request(p, GREEDY, priority=priorities[i]) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                order.append(ids.index(out.request_id))
    assert engine.stats()["num_preemptions"] > 0
    assert order == sorted(order, key=lambda i: (priorities[i], i))  # lower value first, FCFS within one
    assert_pools_at_rest(engine)


def test_a_later_high_priority_request_preempts_a_low_priority_one(tiny):
    engine = make_engine(tiny, kv_cache_memory=6 * BLOCK_BYTES, max_num_seqs=4)
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    low = [engine.add_request(p, long, priority=10) for p in shared_prefix_prompts(2, prefix_len=8, seed=6)]
    for _ in range(3):
        engine.step()
    high = [engine.add_request(p, long, priority=0) for p in shared_prefix_prompts(2, prefix_len=8, seed=7)]
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert engine.stats()["num_preemptions"] > 0
    assert set(finished[:2]) == set(high) and set(finished[2:]) == set(low)
    assert_pools_at_rest(engine)


def test_kv_events_report_stored_and_removed_blocks(tiny):
    engine = make_engine(tiny, kv_cache_memory=8 * BLOCK_BYTES)
    seen = []
    engine.on_kv_events(seen.append)
    generate(engine, shared_prefix_prompts(1, prefix_len=40, seed=8), GREEDY)
    stored = [e for b in seen for e in b.events if isinstance(e, BlockStored)]
    assert stored and all(len(e.token_ids) == 16 * len(e.block_hashes) for e in stored)
    generate(engine, shared_prefix_prompts(2, prefix_len=60, seed=9), GREEDY)  # evicts the first prompt's blocks
    removed = {h for b in engine.kv_events() for e in b.events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed & {h for e in stored for h in e.block_hashes}


def test_cached_tokens_are_reported_per_request(tiny):
    engine = make_engine(tiny)
    prompt = shared_prefix_prompts(1, prefix_len=50)[0]
    first = engine.drain([engine.add_request(prompt, GREEDY)])
    second = engine.drain([engine.add_request(prompt, GREEDY)])
    assert next(iter(first.values())).num_cached_tokens == 0
    assert next(iter(second.values())).num_cached_tokens == 16 * ((len(prompt) - 1) // 16)
    assert_pools_at_rest(engine)


def test_replaced_weights_empty_the_prefix_cache(tiny):
    engine = make_engine(tiny)
    prompt = shared_prefix_prompts(1, prefix_len=50)[0]
    engine.drain([engine.add_request(prompt, GREEDY)])
    assert engine.stats()["kv_blocks_cached"] > 0
    tiny.model.weights_version.bump()  # what replacing a weight does
    out = engine.drain([engine.add_request(prompt, GREEDY)])
    assert next(iter(out.values())).num_cached_tokens == 0
    assert_pools_at_rest(engine)


def test_a_prefix_reloaded_from_the_host_tier_gives_the_same_outputs(tiny):
    prompt = shared_prefix_prompts(1, prefix_len=80, seed=10)
    engine = make_engine(tiny, kv_cache_memory=12 * BLOCK_BYTES, kv_offload_memory=40 * BLOCK_BYTES)
    first = generate(engine, prompt, GREEDY)
    for seed in (11, 12, 13):  # each takes 7 of the 12 device blocks: the first prompt's are evicted
        generate(engine, shared_prefix_prompts(1, prefix_len=80, seed=seed), GREEDY)
    assert engine.stats()["kv_offload_stores"] >= 5 and engine.stats()["kv_offload_loads"] == 0
    rid = engine.add_request(prompt[0], GREEDY)
    out = engine.drain([rid])[rid]
    assert [[c.token_ids for c in out.outputs]] == first
    assert out.num_cached_tokens == 80 and engine.stats()["kv_offload_loads"] == 5
    assert_pools_at_rest(engine)


@pytest.mark.parametrize("kv_dtype,async_scheduling", [("int8", False), ("auto", True)])
def test_swap_with_a_quantized_cache_or_async_scheduling(tiny, kv_dtype, async_scheduling):
    block = bytes_per_block(2, 16, 2, 16, torch.int8 if kv_dtype == "int8" else torch.float32)
    prompts = shared_prefix_prompts(6, prefix_len=20, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = generate(make_engine(tiny, kv_cache_dtype=kv_dtype, enable_prefix_caching=False), prompts, params)
    engine = make_engine(tiny, kv_cache_dtype=kv_dtype, kv_cache_memory=10 * block, kv_offload_memory=64 * block,
                         preemption_mode="swap", async_scheduling=async_scheduling)
    assert generate(engine, prompts, params) == roomy
    assert engine.stats()["num_swap_preemptions"] > 0


def test_block_copies_of_a_step_without_a_batch_are_carried_out(tiny, monkeypatch):
    """A step may decide copies and then run nobody (a swap-out that made room for a waiting
    request of a better priority, which still does not fit): the copies must still happen."""
    engine = make_engine(tiny)
    ops = BlockOps()
    ops.add(COPY, [(0, 1)])
    done = []
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: SchedulerOutput([], ops))
    monkeypatch.setattr(engine.runner, "apply_block_ops", done.append)
    engine.step()
    assert done == [ops]


def test_a_step_that_raises_leaves_no_unwritten_block_in_the_cache(tiny, monkeypatch):
    """The step's blocks are cached when it is scheduled; if its forward raises (Ctrl-C, a
    device error), a later request with the same prefix must not read them."""
    prompts = shared_prefix_prompts(3, prefix_len=70, seed=9)
    want = generate(make_engine(tiny, enable_prefix_caching=False), prompts, GREEDY)
    engine = make_engine(tiny)
    real, calls = ModelRunner.execute, []

    def fail_first(self, inp, all_logits=False, feed=None):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, inp, all_logits, feed)

    monkeypatch.setattr(ModelRunner, "execute", fail_first)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert engine.block_manager.num_cached == 0
    for rid in ids:
        engine.abort(rid)
    run_to_completion(engine)
    assert_pools_at_rest(engine)
    assert generate(engine, prompts, GREEDY) == want


def test_auto_preemption_recomputes_when_the_tier_has_no_empty_room(tiny, monkeypatch):
    """"auto" swaps into host blocks that hold nothing; with a tier full of cached prefixes it
    recomputes (and keeps them), "swap" evicts them and swaps."""
    prompts = shared_prefix_prompts(6, prefix_len=20, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = generate(make_engine(tiny, enable_prefix_caching=False), prompts, params)
    stats = {}
    for mode in ("auto", "swap"):
        engine = make_engine(tiny, kv_cache_memory=10 * BLOCK_BYTES, kv_offload_memory=4 * BLOCK_BYTES,
                             preemption_mode=mode)
        # fill the 4-block tier with cached prefixes: unrelated prompts, one after another,
        # each evicting the one before from the device pool
        for seed in range(30, 34):
            generate(engine, shared_prefix_prompts(1, prefix_len=80, seed=seed), GREEDY)
        assert engine.stats()["kv_offload_blocks"] == 4
        assert generate(engine, prompts, params) == roomy
        stats[mode] = engine.stats()
    assert stats["auto"]["num_preemptions"] > 0 and stats["auto"]["num_swap_preemptions"] == 0
    assert stats["swap"]["num_swap_preemptions"] > 0


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_the_next_turn_of_a_conversation_computes_only_its_new_tokens(tiny, params):
    """A finished request's partly filled last block stays cached: the next turn, resending the
    history, reads every token the previous turn computed (all but its last sampled one), not
    only its full blocks; outputs equal a cache-off run."""
    rng = random.Random(21)
    turns = [[rng.randrange(1, 5000) for _ in range(n)] for n in (37, 21, 9)]
    results = {}
    for caching in (False, True):
        engine = make_engine(tiny, enable_prefix_caching=caching)
        history, outs, cached = [], [], []
        for message in turns:
            history = history + message
            rid = engine.add_request(history, params)
            out = engine.drain([rid])[rid]
            outs.append(out.outputs[0].token_ids)
            cached.append(out.num_cached_tokens)
            history = history + out.outputs[0].token_ids
        assert_pools_at_rest(engine)
        results[caching] = outs, cached
    assert results[True][0] == results[False][0]
    # turn 2 resends turn 1's 37 + 12 tokens and reads the 48 computed ones (3 blocks of 16, the
    # last one kept though turn 1 never filled it); turn 3 reads turn 2's 37 + 12 + 21 + 11
    assert results[True][1] == [0, 48, 37 + 12 + 21 + 11] and results[False][1] == [0, 0, 0]
