"""Property-based tests (hypothesis) of the validation layer: random values and types thrown at
``SamplingParams``, ``EngineConfig`` and ``LLM.generate``. Each call either succeeds (and then
its result is well formed) or raises a fastinfer ``InvalidArgumentError`` (a ``ValueError``,
and for wrong types also a ``TypeError``) from fastinfer's own code; after every example the
engine holds no request and no KV block, and still serves a known request exactly.

Examples are derandomized (the same on every run, so CI never fails by chance); the counts
are set per test below."""
from __future__ import annotations

import math
import os
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastinfer import LLM, EngineConfig, InvalidArgumentError, SamplingParams
from fastinfer.sampling.params import MAX_LOGPROBS, MAX_N

from .conftest import save_tiny_model

PACKAGE_DIR = os.path.dirname(os.path.abspath(__import__("fastinfer").__file__))
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BAD_TEXT = st.sampled_from(["\ud800", "ok\udfff", ""])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.floats(allow_nan=True, allow_infinity=True, width=32), st.complex_numbers(max_magnitude=5),
    st.text(max_size=8), BAD_TEXT, st.binary(max_size=6),
    st.sampled_from([np.int64(3), np.int32(-1), np.float32(0.5), np.float64(np.inf), np.bool_(True),
                     np.uint64(2**63), object()]),
)
ANY = st.one_of(
    SCALARS,
    st.lists(st.one_of(st.integers(-3, 60_000), st.booleans(), st.text(max_size=3)), max_size=5),
    st.tuples(st.integers(0, 100), st.integers(0, 100)),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.frozensets(st.integers(0, 9), max_size=3),
)


def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """A good value four times in five, anything else the fifth (so that whole calls succeed
    often enough to check what they return)."""
    return st.integers(0, 4).flatmap(lambda i: good if i else ANY)  # one_of would flatten ANY's branches


GOOD_SAMPLING = {
    "n": st.integers(1, 3), "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 60), "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 50_000), max_size=3), "ignore_eos": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), "logprobs": st.one_of(st.none(), st.integers(0, 5)),
}


SAMPLING_KWARGS = st.fixed_dictionaries({}, optional={k: mostly(v) for k, v in GOOD_SAMPLING.items()})

GOOD_CONFIG = {
    "dtype": st.sampled_from(["auto", "float32", "bf16", "half"]), "device": st.sampled_from(["auto", "cpu", "cuda"]),
    "block_size": st.integers(1, 64), "max_num_seqs": st.integers(1, 512),
    "max_num_batched_tokens": st.one_of(st.none(), st.integers(1, 8192)),
    "max_model_len": st.one_of(st.none(), st.integers(1, 8192)),
    "kv_cache_memory": st.one_of(st.none(), st.integers(1, 2**34), st.integers(2**60, 10**400),
                                 st.from_regex(r"[0-9]{1,4}(\.[0-9])? ?([KMGT]i?B?|[kmgt]i?b?)?", fullmatch=True),
                                 st.from_regex(r"[0-9]{20,400}(GB|TiB)?", fullmatch=True)),
    "gpu_memory_utilization": st.floats(0, 1), "enable_chunked_prefill": st.booleans(),
    "seed": st.integers(-(2**63), 2**63 - 1),
}
CONFIG_KWARGS = st.fixed_dictionaries({}, optional={k: mostly(v) for k, v in GOOD_CONFIG.items()})

PROMPTS = mostly(st.one_of(
    st.text(max_size=40), BAD_TEXT,
    st.lists(st.integers(-2, 50_000), max_size=30),
    st.lists(st.one_of(st.text(max_size=20), st.lists(st.integers(0, 49_151), min_size=1, max_size=10)), max_size=3),
    st.lists(st.integers(0, 49_151), max_size=10).map(lambda ids: np.array(ids, dtype=np.int64)),
))


def assert_raised_by_fastinfer(exc: BaseException) -> None:
    """The error is fastinfer's own class, raised in fastinfer's own code."""
    event(f"refused: {type(exc).__name__}")
    assert isinstance(exc, InvalidArgumentError), f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, ValueError)
    frames = traceback.extract_tb(exc.__traceback__)
    assert frames and frames[-1].filename.startswith(PACKAGE_DIR), frames[-1]


@settings(max_examples=600, **SETTINGS)
@given(kwargs=SAMPLING_KWARGS)
def test_sampling_params_accepts_or_raises_a_named_fastinfer_error(kwargs):
    try:
        p = SamplingParams(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the property is about which errors come out
        assert_raised_by_fastinfer(exc)
        assert exc.argument.split("[")[0] in kwargs
        return
    event("accepted")
    assert type(p.n) is int and 1 <= p.n <= MAX_N and type(p.max_tokens) is int and p.max_tokens >= 1
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        assert type(value) is float and math.isfinite(value), name
    assert 0 < p.top_p <= 1 and 0 <= p.min_p <= 1 and p.temperature >= 0 and p.top_k >= 0
    assert type(p.ignore_eos) is bool
    assert all(isinstance(s, str) and s for s in p.stop_list)
    assert all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert p.seed is None or (type(p.seed) is int and -(2**63) <= p.seed < 2**63)
    assert p.logprobs is None or (type(p.logprobs) is int and 0 <= p.logprobs <= MAX_LOGPROBS)


@settings(max_examples=400, **SETTINGS)
@given(kwargs=CONFIG_KWARGS)
def test_engine_config_accepts_or_raises_a_named_fastinfer_error(kwargs):
    try:
        c = EngineConfig(**kwargs)
    except Exception as exc:  # noqa: BLE001
        assert_raised_by_fastinfer(exc)
        assert exc.argument in kwargs
        return
    event("accepted")
    for name in ("block_size", "max_num_seqs"):
        assert type(getattr(c, name)) is int and getattr(c, name) >= 1
    assert c.kv_cache_memory is None or (type(c.kv_cache_memory) is int and c.kv_cache_memory >= 1)
    assert type(c.enable_chunked_prefill) is bool and 0 < c.gpu_memory_utilization <= 1
    c.torch_device(), c.torch_dtype()  # a valid config always resolves


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, hf_smollm_tokenizer):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", hf_smollm_tokenizer)
    return LLM(folder, kv_cache_memory="2MiB", max_model_len=48, max_num_seqs=8)


KNOWN = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool"])),
     "content": mostly(st.one_of(st.text(max_size=30), BAD_TEXT))},
    optional={"name": st.text(max_size=5)})
MESSAGES = mostly(st.one_of(st.lists(mostly(MESSAGE), max_size=4),
                            st.lists(st.lists(MESSAGE, min_size=1, max_size=3), min_size=1, max_size=2)))


def assert_clean_and_serving(llm: LLM, expected: list[int]) -> None:
    stats = llm.stats()
    assert stats["num_requests"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert llm.generate([7, 8, 9], KNOWN, use_tqdm=False)[0].outputs[0].token_ids == expected


@settings(max_examples=300, **SETTINGS)
@given(prompts=PROMPTS, params=st.one_of(st.none(), SAMPLING_KWARGS, ANY))
def test_generate_accepts_or_refuses_and_the_engine_keeps_serving(tiny_llm, prompts, params):
    expected = tiny_llm.generate([7, 8, 9], KNOWN, use_tqdm=False)[0].outputs[0].token_ids
    try:
        sp = SamplingParams(**params) if isinstance(params, dict) and all(k in GOOD_SAMPLING for k in params) \
            else params
        outs = tiny_llm.generate(prompts, sp, use_tqdm=False)
    except Exception as exc:  # noqa: BLE001
        assert_raised_by_fastinfer(exc)
    else:
        event("accepted")
        assert all(o.finished and len(o.outputs) == (sp.n if isinstance(sp, SamplingParams) else 1) for o in outs)
    assert_clean_and_serving(tiny_llm, expected)


@settings(max_examples=150, **SETTINGS)
@given(messages=MESSAGES)
def test_chat_accepts_or_refuses_and_the_engine_keeps_serving(tiny_llm, messages):
    expected = tiny_llm.generate([7, 8, 9], KNOWN, use_tqdm=False)[0].outputs[0].token_ids
    try:
        outs = tiny_llm.chat(messages, KNOWN, use_tqdm=False)
    except Exception as exc:  # noqa: BLE001
        assert_raised_by_fastinfer(exc)
    else:
        event("accepted")
        # 5 tokens, or fewer where the template's prompt nearly fills max_model_len (48)
        assert all(o.finished and o.outputs[0].finish_reason == "length" and 1 <= len(o.outputs[0].token_ids) <= 5
                   for o in outs)
    assert_clean_and_serving(tiny_llm, expected)
