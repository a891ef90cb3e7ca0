"""Structured outputs (llguidance) and logit_bias in the engine: every form of
``StructuredOutputsParams`` constrains the text, with n > 1, stop strings, logprobs, streaming
(delta outputs), async scheduling and a compile time limit; the token masks' bit layout is
checked against a plain reference."""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import numpy as np
import pytest
import torch

from fastinfer.bench.json_schemas import slow_schema
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.errors import InvalidArgumentError, InvalidRequestError
from fastinfer.sampling.grammar import GrammarCompileTimeout, TokenMasks, forbidden_tokens
from fastinfer.sampling.params import SamplingParams, StructuredOutputsParams
from tests.conftest import make_engine, run_to_completion

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["red", "green", "blue"]}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and favourite colours."}]


@pytest.fixture(scope="module")
def engine(smollm):
    return make_engine(smollm, kv_cache_memory="64MiB", max_num_seqs=16)


def _prompt(engine) -> str:
    return engine.tokenizer.apply_chat_template(ASK)


def _run(engine, params: SamplingParams, prompt: str | None = None, count: int = 1):
    ids = [engine.add_request(prompt or _prompt(engine), params) for _ in range(count)]
    finals = run_to_completion(engine)
    return [finals[i] for i in ids]


def test_json_schema_outputs_validate_with_n_and_seeds(engine):
    params = SamplingParams(n=3, max_tokens=96, temperature=0.7, seed=7, structured_outputs={"json": PERSON})
    outs = _run(engine, params, count=2)
    for c in (c for o in outs for c in o.outputs):
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
    again = _run(engine, params)[0]
    assert [c.text for c in again.outputs] == [c.text for c in outs[0].outputs]  # seeded: reproducible


@pytest.mark.parametrize("spec, check", [
    ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"choice": ["yes", "no", 'maybe "so"']}, lambda t: t in ("yes", "no", 'maybe "so"')),
    ({"grammar": 'start: "(" num ("+" num)? ("+" num)? ")"\nnum: /[0-9]{1,3}/'},
     lambda t: re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,2}\)", t)),
    ({"grammar": 'root ::= "<" [a-z]+ ">"'}, lambda t: re.fullmatch(r"<[a-z]+>", t)),  # GBNF
])
def test_each_form_constrains_the_text(engine, spec, check):
    outs = _run(engine, SamplingParams(n=2, max_tokens=48, temperature=0.8, seed=3, structured_outputs=spec))
    for c in outs[0].outputs:
        assert c.finish_reason == "stop", (spec, c)
        assert check(c.text), (spec, c.text)


def test_json_object_gives_an_object(engine):
    ask = [{"role": "user", "content": 'Reply with a JSON object whose key "answer" holds the capital of France.'}]
    params = SamplingParams(n=4, max_tokens=64, temperature=0.8, seed=3, structured_outputs={"json_object": True})
    for c in _run(engine, params, engine.tokenizer.apply_chat_template(ask))[0].outputs:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict), c.text


def test_unfinished_grammar_ends_with_length(engine):
    out = _run(engine, SamplingParams(max_tokens=4, temperature=0, structured_outputs={"json": PERSON}))[0]
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    assert c.text.startswith('{"name":"')


def test_stop_string_cuts_constrained_text(engine):
    params = SamplingParams(max_tokens=64, temperature=0, stop=['"age"'], structured_outputs={"json": PERSON})
    c = _run(engine, params)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == '"age"'
    assert c.text.startswith('{"name":"') and '"age"' not in c.text


def test_logprobs_see_only_allowed_tokens(engine):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=5, structured_outputs={"choice": ["yes", "no"]})
    c = _run(engine, params)[0].outputs[0]
    assert c.text in ("yes", "no")
    tok = engine.tokenizer
    for token, lp in zip(c.token_ids, c.logprobs):
        assert np.isfinite(lp[token])
        for t, v in lp.items():  # the masked tokens are no alternatives
            assert np.isfinite(v)
            text = tok.decode([t], skip_special_tokens=False)
            assert t in engine.eos_token_ids or "yes".startswith(text) or "no".startswith(text) \
                or any(w.startswith(c.text[:1] + text) for w in ("yes", "no")), text


def test_delta_stream_joins_to_the_same_text(engine):
    spec = {"json": PERSON}
    whole = _run(engine, SamplingParams(max_tokens=96, temperature=0.7, seed=11, structured_outputs=spec))[0]
    rid = engine.add_request(_prompt(engine), SamplingParams(max_tokens=96, temperature=0.7, seed=11,
                                                             structured_outputs=spec, output_kind="delta"))
    pieces = []
    while engine.has_unfinished():
        pieces += [o.outputs[0].text for o in engine.step() if o.request_id == rid]
    assert "".join(pieces) == whole.outputs[0].text


def test_async_scheduling_gives_the_same_tokens(smollm, engine):
    params = [SamplingParams(max_tokens=48, temperature=0, structured_outputs={"json": PERSON}),
              SamplingParams(max_tokens=24, temperature=0)]
    want = [_run(engine, p)[0].outputs[0].token_ids for p in params]
    other = make_engine(smollm, kv_cache_memory="64MiB", async_scheduling=True)
    ids = [other.add_request(_prompt(other), p) for p in params]
    finals = run_to_completion(other)
    assert [finals[i].outputs[0].token_ids for i in ids] == want


def test_unconstrained_rows_are_unchanged_beside_constrained_ones(engine):
    free = SamplingParams(max_tokens=24, temperature=0.9, seed=5)
    alone = _run(engine, free)[0].outputs[0].token_ids
    ids = [engine.add_request(_prompt(engine), SamplingParams(max_tokens=24, temperature=0.9, seed=6,
                                                              structured_outputs={"json": PERSON})),
           engine.add_request(_prompt(engine), free)]
    finals = run_to_completion(engine)
    assert finals[ids[1]].outputs[0].token_ids == alone


@pytest.mark.parametrize("spec, match", [
    ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "json"),
    ({"regex": "([a-z"}, "regex"),
    ({"grammar": "start: missing_rule"}, "grammar"),
    ({"grammar": "root ::= missing"}, "grammar"),  # GBNF whose conversion fails
    ({"grammar": "hello"}, "grammar"),
])
def test_invalid_specs_are_refused_at_submission(engine, spec, match):
    with pytest.raises(InvalidRequestError, match=f"structured_outputs.{match}"):
        engine.add_request("x", SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("spec", [{}, {"json": 3}, {"regex": "a", "choice": ["b"]}, {"choice": []},
                                  {"json": "{"}, {"schema": {}}])
def test_bad_structured_outputs_values(spec):
    with pytest.raises(InvalidArgumentError, match="structured_outputs"):
        SamplingParams(structured_outputs=spec)


def test_slow_compile_times_out_alone(smollm):
    """A compile past the limit refuses its request; another request, submitted meanwhile, is
    served at once (the compile runs off the engine's thread)."""
    async_engine = AsyncEngine.from_engine(make_engine(smollm, kv_cache_memory="64MiB",
                                                       grammar_compile_timeout=0.05))
    import asyncio

    async def run():
        async def slow():
            with pytest.raises(GrammarCompileTimeout, match="did not compile within 0.05 s"):
                await async_engine.add_request("x", SamplingParams(structured_outputs={"json": slow_schema()}))
            return time.monotonic()

        async def fast():
            outs = [o async for o in async_engine.generate("Hi", SamplingParams(max_tokens=4, temperature=0))]
            return time.monotonic(), outs[-1]

        start = time.monotonic()
        slow_done, (fast_done, final) = await asyncio.gather(slow(), fast())
        assert final.finished and len(final.outputs[0].token_ids) == 4
        assert slow_done - start < 2.0  # refused at the limit, not when the compile ends
        await async_engine.shutdown()

    asyncio.run(run())


def test_compile_cache_returns_the_same_grammar(engine):
    spec = StructuredOutputsParams(json=PERSON)
    assert engine.structured.compile(spec) is engine.structured.compile(StructuredOutputsParams(json=dict(PERSON)))


def test_logit_bias_removes_the_greedy_token(engine):
    prompt = "The capital of France is"
    first = _run(engine, SamplingParams(max_tokens=1, temperature=0), prompt)[0].outputs[0].token_ids[0]
    banned = _run(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=3, logit_bias={str(first): -100}),
                  prompt)[0].outputs[0]
    assert banned.token_ids[0] != first
    boosted = _run(engine, SamplingParams(max_tokens=1, temperature=0, logit_bias={7: 100}), prompt)[0].outputs[0]
    assert boosted.token_ids == [7]


def test_logit_bias_values_are_checked(engine):
    with pytest.raises(InvalidRequestError, match=r"logit_bias token id 49152 is outside the vocabulary"):
        engine.add_request("x", SamplingParams(logit_bias={49152: 1}))
    for bad in ({1: 101}, {-1: 1}, {"a": 1}, [1, 2]):
        with pytest.raises(InvalidArgumentError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


# ------------------------------------------------------------------ the masks themselves
def test_forbidden_tokens_match_the_bit_layout():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(3, 5), dtype=np.uint64).astype(np.uint32)
    want = torch.tensor([[(int(words[r, i // 32]) >> (i % 32)) & 1 == 0 for i in range(150)] for r in range(3)])
    assert torch.equal(forbidden_tokens(words, 150), want)
    wider = forbidden_tokens(words, 170)  # ids past 32 * W: never allowed
    assert wider[:, 160:].all() and torch.equal(wider[:, :150], want)


def test_token_masks_apply_to_their_rows_only():
    from concurrent.futures import Future

    done: Future = Future()
    done.set_result(None)
    bitmask = torch.zeros((2, 2), dtype=torch.int32)
    bitmask[0, 0] = 0b1010  # row 1 of the batch may take 1 and 3
    logits = torch.randn(3, 40)
    before = logits.clone()
    # Row 2's grammar allows nothing (an error): it may only end (EOS 39); 39 is complete-only.
    TokenMasks([1, 2], bitmask, done, complete=[], eos_ids=[39]).apply(logits, out=logits)
    assert torch.equal(logits[0], before[0])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [1, 3]
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [39]
    out = torch.empty_like(logits)
    TokenMasks([0], bitmask[:1], done, complete=[0], eos_ids=[39]).apply(logits, out=out)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1, 3, 39]
    assert torch.equal(out[1:], logits[1:]) and torch.equal(logits[0], before[0])  # logits unchanged
    fresh = torch.zeros((2, 2), dtype=torch.int32)
    fresh[0, 0], fresh[1, 1] = 0b1010, 1 << 3  # every row masked: one pass (row 1 may take 35)
    whole = torch.empty(2, 40)
    TokenMasks([0, 1], fresh, done, complete=[], eos_ids=[39]).apply(before[:2], out=whole)
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in whole] == [[1, 3], [35]]
    assert torch.equal(whole[torch.isfinite(whole)], before[:2][torch.isfinite(whole)])


def test_masks_are_filled_off_the_callers_thread(engine):
    spec = StructuredOutputsParams(json=PERSON)
    matcher = engine.structured.matcher(engine.structured.compile(spec))
    masks = engine.structured.start_masks([None, matcher])
    names = [t.name for t in threading.enumerate()]
    assert any(n.startswith("fastinfer-masks") for n in names)
    logits = torch.zeros(2, engine.loaded.config.vocab_size)
    masks.apply(logits, out=logits)
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert [engine.tokenizer.decode([t]) for t in allowed] and all(
        engine.tokenizer.decode([t]).startswith("{") for t in allowed)
    assert torch.isfinite(logits[0]).all()


def test_a_grammar_error_aborts_the_sample(engine, monkeypatch):
    """A token the grammar refuses (only a bug or a resource limit can lead to one: here the
    masks are switched off) ends the sample as aborted, never as a "stop" whose text would not
    match; other requests are untouched."""
    monkeypatch.setattr(engine.structured, "start_masks", lambda matchers: None)
    bad = engine.add_request("Say something:", SamplingParams(max_tokens=8, temperature=0,
                                                              structured_outputs={"choice": ["zzzz qqqq"]}))
    good = engine.add_request("Say something:", SamplingParams(max_tokens=4, temperature=0))
    finals = run_to_completion(engine)
    assert finals[bad].outputs[0].finish_reason == "abort" and len(finals[bad].outputs[0].token_ids) == 1
    assert finals[good].outputs[0].finish_reason == "length"


def test_a_grammar_given_for_another_spec_is_not_used(engine):
    other = engine.structured.compile(StructuredOutputsParams(regex="x+"))
    rid = engine.add_request("Go:", SamplingParams(max_tokens=4, temperature=0, structured_outputs={"choice": ["yes"]}),
                             grammar=other)
    assert run_to_completion(engine)[rid].outputs[0].text == "yes"
