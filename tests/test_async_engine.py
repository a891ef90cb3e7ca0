"""``AsyncEngine``: streaming kinds, stop hold-back, abort on cancel, queue limits, shutdown,
a dead loop, embedding in a FastAPI app; and the engine fixes that came with it (``LLM`` takes
only its own outputs, no admission in a step that preempted, a deterministic CPU KV budget)."""
from __future__ import annotations

import asyncio

import pytest

from fastinfer import SamplingParams
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.errors import (EngineDeadError, EngineOverloadedError, EngineShutdownError, InvalidRequestError)

from .conftest import make_engine

PROMPT = "The capital of France is"


def new_engine(smollm, **kw) -> AsyncEngine:
    limits = {k: kw.pop(k) for k in ("max_queued_requests", "max_queued_tokens") if k in kw}
    kw.setdefault("kv_cache_memory", 64 << 20)
    return AsyncEngine.from_engine(make_engine(smollm, **kw), **limits)


async def collect(engine, prompt, params, request_id=None):
    return [out async for out in engine.generate(prompt, params, request_id)]


async def wait_until(predicate, timeout=30.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_delta_cumulative_and_final_only_agree(smollm):
    async def main():
        async with new_engine(smollm) as engine:
            kinds = ("delta", "cumulative", "final_only")
            runs = await asyncio.gather(*[
                collect(engine, PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, output_kind=k))
                for k in kinds])
        return dict(zip(kinds, runs))

    runs = asyncio.run(main())
    final = runs["final_only"]
    assert len(final) == 1 and final[0].finished
    want = final[0].outputs[0]
    assert len(want.token_ids) == 24
    deltas = runs["delta"]
    assert sum(o.finished for o in deltas) == 1 and deltas[-1].finished
    # Each delta carries only what is new: one token per step, and they add up to the whole.
    assert all(len(o.outputs[0].token_ids) <= 1 for o in deltas)
    assert [t for o in deltas for t in o.outputs[0].token_ids] == want.token_ids
    assert "".join(o.outputs[0].text for o in deltas) == want.text
    cumulative = runs["cumulative"]
    assert cumulative[-1].outputs[0].text == want.text and cumulative[-1].outputs[0].token_ids == want.token_ids
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(lengths) and lengths[-1] == 24


def test_stop_string_text_is_held_back_until_safe(smollm):
    """The streamed deltas never show a character of the text that a stop string cuts."""
    async def main(params):
        async with new_engine(smollm) as engine:
            return await collect(engine, PROMPT, params)

    free = asyncio.run(main(SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)))[-1].outputs[0].text
    stop = free[len(free) // 2: len(free) // 2 + 6]  # six characters that straddle tokens
    assert len(stop.strip()) >= 3, free
    outs = asyncio.run(main(SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                           output_kind="delta")))
    cut = free[:free.index(stop)]
    streamed = ""
    for o in outs:
        streamed += o.outputs[0].text
        assert cut.startswith(streamed), (streamed, cut)  # never ahead of the cut text
    assert streamed == cut and outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].stop_reason == stop


def test_consumer_that_stops_or_is_cancelled_aborts_and_frees_blocks(smollm):
    async def main():
        async with new_engine(smollm) as engine:
            total = engine.engine.block_manager.num_total
            params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True, output_kind="delta")
            async for out in engine.generate(PROMPT, params, "broken"):
                assert not out.finished
                break  # the consumer leaves
            await wait_until(lambda: engine.stats()["kv_blocks_free"] == total)

            started = asyncio.Event()

            async def consumer():
                async for _ in engine.generate(PROMPT, params, "cancelled"):
                    started.set()

            task = asyncio.ensure_future(consumer())
            await started.wait()
            assert engine.stats()["num_requests"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: engine.stats()["kv_blocks_free"] == total and engine.stats()["num_requests"] == 0)
            # The engine still serves.
            outs = await collect(engine, PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            assert len(outs[-1].outputs[0].token_ids) == 4

    asyncio.run(main())


def test_abort_gives_one_final_output(smollm):
    async def main():
        async with new_engine(smollm) as engine:
            params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True, output_kind="delta")
            stream = await engine.add_request(PROMPT, params, "r")
            first = await stream.__anext__()
            await engine.abort("r")
            rest = [o async for o in stream]
            return [first, *rest]

    outs = asyncio.run(main())
    assert sum(o.finished for o in outs) == 1 and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in outs) < 400


def test_queue_limits_refuse_instead_of_growing(smollm):
    async def main():
        async with new_engine(smollm, max_num_seqs=1, max_queued_requests=2, max_queued_tokens=10_000) as engine:
            long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
            first = await engine.add_request(PROMPT, long, "running")
            await wait_until(lambda: engine.stats()["num_queued"] == 0 and engine.stats()["num_running"] == 1)
            queued = [await engine.add_request(PROMPT, long, f"q{i}") for i in range(2)]
            await wait_until(lambda: engine.stats()["num_requests"] == 3)
            assert engine.stats()["num_queued"] == 2
            with pytest.raises(EngineOverloadedError, match="max_queued_requests=2"):
                await engine.add_request(PROMPT, long, "refused")
            # Bad input is still refused with its own error, and nothing was queued.
            with pytest.raises(InvalidRequestError, match="already in use"):
                await engine.add_request(PROMPT, long, "q0")
            for rid in ("running", "q0", "q1"):
                await engine.abort(rid)
            finals = [[o async for o in s][-1] for s in (first, *queued)]
            assert [f.outputs[0].finish_reason for f in finals] == ["abort"] * 3

        async with new_engine(smollm, max_num_seqs=1, max_queued_tokens=12) as engine:
            long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
            await engine.add_request(PROMPT, long, "running")
            await wait_until(lambda: engine.stats()["num_queued"] == 0 and engine.stats()["num_running"] == 1)
            await engine.add_request(PROMPT, long, "q0")  # 5 prompt tokens
            with pytest.raises(EngineOverloadedError, match="max_queued_tokens=12"):
                await engine.add_request(PROMPT + " and the capital of Spain is", long, "big")
            await engine.shutdown(0)

    asyncio.run(main())


def test_shutdown_drains_then_aborts_and_refuses_new_requests(smollm):
    async def main():
        engine = new_engine(smollm)
        short = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        endless = SamplingParams(max_tokens=1300, temperature=0, ignore_eos=True)  # many seconds
        tasks = [asyncio.ensure_future(collect(engine, PROMPT, p)) for p in (short, short, endless)]
        await wait_until(lambda: engine.stats()["num_running"] == 3)
        await engine.shutdown(timeout=3.0)  # ample for 6 tokens, far too short for 1300
        results = [t.result() for t in tasks]
        with pytest.raises(EngineShutdownError):
            await engine.add_request(PROMPT, short)
        return results, engine

    results, engine = asyncio.run(main())
    for outs in results:
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished
    assert [r[-1].outputs[0].finish_reason for r in results] == ["length", "length", "abort"]
    assert engine.engine.block_manager.num_free == engine.engine.block_manager.num_total


def test_a_dead_loop_fails_every_request_and_refuses_new_ones(smollm):
    async def main():
        engine = new_engine(smollm)
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        stream = await engine.add_request(PROMPT, params)
        real_step = engine.engine.step
        calls = {"n": 0}

        def broken_step():
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("device lost")
            return real_step()

        engine.engine.step = broken_step
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request(PROMPT, params)
        await engine.shutdown(1)

    asyncio.run(main())


def test_works_from_successive_event_loops_and_reports_bad_input(smollm):
    engine = new_engine(smollm)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for _ in range(2):  # two asyncio.run calls: two loops, one engine
        outs = asyncio.run(collect(engine, PROMPT, params))
        assert len(outs[-1].outputs[0].token_ids) == 3

    async def bad():
        with pytest.raises(InvalidRequestError, match="prompt"):
            await engine.add_request("", params)
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await engine.add_request([10**9], params)
        await engine.shutdown()

    asyncio.run(bad())


def test_embeds_in_a_fastapi_app(smollm):
    """A user's own FastAPI app streams from an AsyncEngine created in its lifespan."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    holder = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        holder["engine"] = new_engine(smollm)
        yield
        await holder["engine"].shutdown(5)

    app = FastAPI(lifespan=lifespan)

    @app.get("/complete")
    async def complete(prompt: str, n: int = 8):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, output_kind="delta")

        async def body():
            async for out in holder["engine"].generate(prompt, params):
                yield out.outputs[0].text

        return StreamingResponse(body(), media_type="text/plain")

    with TestClient(app) as client:
        streamed = client.get("/complete", params={"prompt": PROMPT}).text
        engine = holder["engine"]

        async def reference():
            return (await collect(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))[-1]

        want = client.portal.call(reference)
    assert streamed == want.outputs[0].text and streamed


def test_llm_generate_collects_only_its_own_requests(smollm):
    from fastinfer import LLM

    llm = LLM.__new__(LLM)
    llm.engine = make_engine(smollm, kv_cache_memory=64 << 20)
    llm.config = llm.engine.config
    other = llm.engine.add_request(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "other")
    outs = llm.generate(["Hello", "Paris is"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert [o.request_id for o in outs] != [] and other not in [o.request_id for o in outs]
    # The other request is left to its owner: still running, or its final output kept for it.
    finals = llm.engine.drain([other])
    assert list(finals) == [other] and len(finals[other].outputs[0].token_ids) == 30


def test_a_step_that_preempts_admits_nobody():
    from fastinfer.kv_cache.block_manager import BlockManager
    from fastinfer.scheduler.scheduler import Scheduler
    from fastinfer.scheduler.sequence import Sequence

    blocks = BlockManager(4, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = Sequence(0, list(range(8)), 8, arrival=0), Sequence(1, list(range(8)), 8, arrival=1)
    sched.add(a)
    sched.add(b)
    assert len(sched.schedule().scheduled) == 2  # 2 + 2 blocks: the pool is full
    for s in (a, b):
        s.num_computed = 8
        s.append(1)  # each needs a third block now
    late = Sequence(2, [5], 1, arrival=2)
    sched.add(late)
    out = sched.schedule()
    assert sched.num_preemptions == 1
    # b was preempted to let a grow; neither b nor the late arrival is admitted this step.
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    assert [s.seq_id for s in sched.waiting] == [1, 2]


def test_default_cpu_kv_budget_is_a_function_of_the_machine(monkeypatch):
    import torch

    from fastinfer import EngineConfig
    from fastinfer.engine import memory
    from fastinfer.errors import ConfigError

    cpu = torch.device("cpu")
    cfg = EngineConfig(device="cpu")
    monkeypatch.setattr(memory, "total_memory", lambda d: 8 << 30)
    budgets = set()
    for free in (6 << 30, 3 << 30, 2 << 30):
        monkeypatch.setattr(memory, "available_memory", lambda d, f=free: f)
        budgets.add(memory.kv_cache_budget(cfg, cpu))
    assert budgets == {2 << 30}  # 25% of 8 GiB, whatever is free at the moment
    monkeypatch.setattr(memory, "available_memory", lambda d: 1 << 30)
    with pytest.raises(ConfigError, match="set kv_cache_memory"):
        memory.kv_cache_budget(cfg, cpu)


def test_a_bad_abort_id_is_refused_and_the_loop_keeps_serving(smollm):
    async def main():
        async with new_engine(smollm) as engine:
            for bad in (123, "", None):
                with pytest.raises(InvalidRequestError, match="request_id"):
                    await engine.abort(bad)
            await engine.abort("never-submitted")  # unknown ids are ignored
            outs = await collect(engine, PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            assert engine.accepting and len(outs[-1].outputs[0].token_ids) == 3

    asyncio.run(main())


def test_concurrent_shutdowns_all_return(smollm):
    async def main():
        engine = new_engine(smollm)
        task = asyncio.ensure_future(collect(engine, PROMPT, SamplingParams(max_tokens=1300, temperature=0,
                                                                            ignore_eos=True)))
        await wait_until(lambda: engine.stats()["num_running"] == 1)
        await asyncio.wait_for(asyncio.gather(engine.shutdown(0), engine.shutdown(0.5), engine.shutdown()), 60)
        outs = await task
        assert outs[-1].outputs[0].finish_reason == "abort" and sum(o.finished for o in outs) == 1

    asyncio.run(main())
