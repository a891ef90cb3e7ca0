"""The prefix-aware routing policy and the replica directory, without Ray: the router hashes a
prompt's blocks as the engine's prefix cache does, the directory follows KV events, and the
decision takes the longest cached prefix unless that replica is too loaded."""
from __future__ import annotations

import random

from fastinfer.engine.engine import Engine
from fastinfer.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from fastinfer.ray_serve.directory import ReplicaDirectory
from fastinfer.ray_serve.routing import decide, prompt_block_hashes
from fastinfer.sampling.params import SamplingParams

from .conftest import make_engine, run_to_completion


def test_the_router_hashes_a_prompt_as_the_engine_caches_it(smollm):
    engine: Engine = make_engine(smollm, block_size=16)
    events = []
    engine.on_kv_events(events.append)
    prompt = list(range(100, 150))  # 3 full blocks and 2 tokens
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    run_to_completion(engine)
    stored = [h for batch in events for e in batch.events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert prompt_block_hashes(prompt, 16) == stored[:3]
    assert prompt_block_hashes(prompt, 16, max_blocks=2) == stored[:2]
    assert prompt_block_hashes("text", 16) == [] and prompt_block_hashes(prompt[:15], 16) == []


def test_the_directory_follows_kv_events():
    d = ReplicaDirectory()
    d.publish("a", [KVEventBatch(0.0, [BlockStored([1, 2, 3], None, [], 16)])], {"num_running": 2})
    d.publish("b", [KVEventBatch(0.0, [BlockStored([1], None, [], 16), BlockStored([9], None, [], 16, medium="CPU")])])
    assert d.match([1, 2, 3, 4]) == {"a": 3, "b": 1}
    assert d.match([1, 9], ["b", "c"]) == {"b": 2, "c": 0}  # the host tier counts; unknown replicas hold nothing
    d.publish("a", [KVEventBatch(0.0, [BlockRemoved([2])])])
    assert d.match([1, 2, 3])["a"] == 1  # a prefix, not a set: block 3 alone does not count
    d.publish("b", [KVEventBatch(0.0, [AllBlocksCleared()])])
    assert d.match([1, 9])["b"] == 0 and d.match([9])["b"] == 1  # the device blocks went; the host tier's stay
    assert d.replicas()["a"]["state"] == "running" and d.replicas()["a"]["num_running"] == 2
    d.keep_only(["b"])
    assert set(d.replicas()) == {"b"} and d.match([1]) == {"b": 0}


def test_the_decision_takes_the_longest_prefix_unless_its_replica_is_too_loaded():
    rng = random.Random(0)
    kw = dict(abs_threshold=8, rel_threshold=1.5, rng=rng)
    assert decide(["a", "b", "c"], {"a": 1, "b": 4, "c": 2}, {}, **kw) == ("prefix", ["b"])
    # a tie on the prefix goes to the less loaded
    assert decide(["a", "b"], {"a": 3, "b": 3}, {"a": 5, "b": 1}, **kw) == ("prefix", ["b"])
    # nothing cached anywhere: two random candidates (Ray Serve takes the less loaded)
    decision, two = decide(["a", "b", "c"], {}, {}, **kw)
    assert decision == "balanced" and len(set(two)) == 2
    # 9 more than the least loaded and over 1.5 times it: fall back; 8 more: stay
    assert decide(["a", "b"], {"a": 4}, {"a": 9, "b": 0}, **kw)[0] == "fallback"
    assert decide(["a", "b"], {"a": 4}, {"a": 8, "b": 0}, **kw) == ("prefix", ["a"])
    assert decide(["a", "b"], {"a": 4}, {"a": 30, "b": 21}, **kw) == ("prefix", ["a"])  # 30 < 1.5 * 21
