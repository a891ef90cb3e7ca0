"""``priority`` as an argument (vLLM's API): ``LLM.generate(..., priority=[...])`` with one int
per prompt, and ``AsyncEngine.generate(..., priority=n)``; a lower value is scheduled first, and
bad values are refused naming ``priority``. Runs on tests/server's tiny model."""
from __future__ import annotations

import asyncio

import pytest

from fastinfer import SamplingParams
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.engine.llm import LLM
from fastinfer.errors import InvalidRequestError, RequestTypeError

from .server.conftest import tiny_path  # noqa: F401 (the fixture)

PROMPTS = ["The capital of France is", "Once upon a time", "Two plus two is", "Say hello"]
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_path) -> LLM:  # noqa: F811 (tiny_path is the imported fixture)
    """One sequence at a time: the order the requests are scheduled in is their priority order."""
    return LLM(tiny_path, dtype="float32", device="cpu", kv_cache_memory="8MiB", max_num_seqs=1)


def scheduled_order(outs) -> list[int]:
    """Indices of ``outs`` by the time each request was first scheduled."""
    return sorted(range(len(outs)), key=lambda i: outs[i].metrics.first_scheduled_time)


# --------------------------------------------------------------------------- LLM
def test_llm_generate_serves_lower_priority_first(llm):
    outs = llm.generate(PROMPTS, SHORT, use_tqdm=False, priority=[3, 0, 2, -1])
    assert [o.prompt for o in outs] == PROMPTS  # still in input order
    assert scheduled_order(outs) == [3, 1, 2, 0]
    fcfs = llm.generate(PROMPTS, SHORT, use_tqdm=False)  # None: all 0, first come first served
    assert scheduled_order(fcfs) == [0, 1, 2, 3]
    assert [o.outputs[0].text for o in fcfs] == [o.outputs[0].text for o in outs]


@pytest.mark.parametrize("priority", [[0], [0, 1, 2, 3, 4], []], ids=["short", "long", "empty"])
def test_llm_priority_of_the_wrong_length_is_refused(llm, priority):
    with pytest.raises(InvalidRequestError, match=r"priority has \d entries for 4 prompts") as err:
        llm.generate(PROMPTS, SHORT, use_tqdm=False, priority=priority)
    assert err.value.argument == "priority" and isinstance(err.value, ValueError)
    assert llm.stats()["num_requests"] == 0  # nothing was submitted


@pytest.mark.parametrize("priority,argument", [(3, "priority"), ("high", "priority"), ([0, "1"], "priority[1]"),
                                               ([True, 0], "priority[0]"), ([0, 1.5], "priority[1]")])
def test_llm_priority_that_is_not_a_list_of_ints_is_refused(llm, priority, argument):
    with pytest.raises(RequestTypeError) as err:
        llm.generate(PROMPTS[:2], SHORT, use_tqdm=False, priority=priority)
    assert err.value.argument == argument and str(err.value).startswith(argument)
    assert llm.stats()["num_requests"] == 0


def test_llm_priority_out_of_range_names_the_prompt_and_submits_nothing(llm):
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\]: priority") as err:
        llm.generate(PROMPTS[:2], SHORT, use_tqdm=False, priority=[0, 2**63])
    assert err.value.argument == "priority"
    assert llm.stats()["num_requests"] == 0  # the first prompt's request was aborted


# --------------------------------------------------------------------------- AsyncEngine
async def _final(engine: AsyncEngine, prompt: str, params: SamplingParams, **kwargs):
    return [out async for out in engine.generate(prompt, params, **kwargs)][-1]


def test_async_generate_passes_priority_to_the_engine(llm):
    async def main():
        async with AsyncEngine.from_engine(llm.engine) as engine:
            # One sequence slot: a long request holds it while two more wait behind it.
            first = asyncio.ensure_future(_final(engine, PROMPTS[0], SamplingParams(
                max_tokens=300, temperature=0, ignore_eos=True)))
            while engine.stats()["num_running"] == 0:
                await asyncio.sleep(0.005)
            late_low = asyncio.ensure_future(_final(engine, PROMPTS[1], SHORT, priority=5))
            await asyncio.sleep(0.05)  # accepted first
            late_high = asyncio.ensure_future(_final(engine, PROMPTS[2], SHORT, priority=-5))
            return await asyncio.gather(first, late_low, late_high)

    first, low, high = asyncio.run(main())
    assert all(o.finished for o in (first, low, high))
    assert high.metrics.first_scheduled_time < low.metrics.first_scheduled_time


def test_async_generate_refuses_a_bad_priority_and_keeps_serving(llm):
    async def main():
        async with AsyncEngine.from_engine(llm.engine) as engine:
            with pytest.raises(RequestTypeError) as err:
                await _final(engine, PROMPTS[0], SHORT, priority="high")
            assert err.value.argument == "priority"
            with pytest.raises(InvalidRequestError, match="priority"):
                await _final(engine, PROMPTS[0], SHORT, priority=2**63)
            return await _final(engine, PROMPTS[0], SHORT, priority=1)

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 4


def test_async_engine_publishes_kv_events(llm):
    from fastinfer.kv_cache.events import BlockStored

    seen = []

    async def main():
        async with AsyncEngine.from_engine(llm.engine) as engine:
            engine.on_kv_events(seen.append)
            await _final(engine, " ".join(PROMPTS * 4), SHORT)  # several full blocks
            return engine.kv_events()

    pulled = asyncio.run(main())
    stored = [e for b in seen for e in b.events if isinstance(e, BlockStored)]
    assert stored and [b.events for b in pulled] == [b.events for b in seen]
