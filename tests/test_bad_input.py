"""Bad input through ``LLM`` and ``Engine`` (issue 10): each case raises a typed fastinfer
error naming what is wrong, and afterwards the engine still serves, holding no KV block and no
request of the failed call."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from fastinfer import (LLM, ArgumentTypeError, ConfigError, Engine, EngineConfig, InvalidRequestError,
                       RequestTooLargeError, RequestTypeError, SamplingParams)
from fastinfer.model.loader import load_model

from .conftest import CPU, make_engine, run_to_completion, save_tiny_model

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm_path):
    return LLM(smollm_path, dtype="float32", kv_cache_memory="64MiB", max_model_len=512)


def assert_serves_and_is_clean(llm: LLM) -> None:
    """Nothing is left in the engine, every block is free, and a good request completes alone."""
    stats = llm.stats()
    assert stats["num_requests"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    outs = llm.generate("The capital of France is", GREEDY, use_tqdm=False)
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 4
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@pytest.mark.parametrize("prompts,message", [
    ({"prompt": "Hello"}, r"prompts must be a string, a sequence of int token ids, or a list of those, got dict"),
    (b"hello", r"got bytes b'hello'"),
    (None, r"got NoneType None"),
    (5, r"got int 5"),
    ([True, False], r"prompt token ids must be ints, got bool True at position 0"),
    (["fine", {"prompt": "x"}], r"prompts\[1\] must be a string or a sequence of int token ids, got dict"),
])
def test_generate_refuses_prompts_of_other_types(llm, prompts, message):
    with pytest.raises(RequestTypeError, match=message):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_serves_and_is_clean(llm)


def test_generate_refuses_text_that_is_not_unicode(llm):
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\] is not valid Unicode: lone surrogate '\\ud800'"):
        llm.generate(["fine", "\ud800"], GREEDY, use_tqdm=False)
    assert_serves_and_is_clean(llm)


def test_generate_refuses_a_dict_as_sampling_params(llm):
    with pytest.raises(RequestTypeError, match=r"sampling_params must be a SamplingParams or a list of them "
                                               r"\(one per prompt\); build one with SamplingParams\(\*\*...\), "
                                               r"got dict"):
        llm.generate(["Hello"], {"max_tokens": 4}, use_tqdm=False)
    with pytest.raises(ArgumentTypeError, match=r"use_tqdm must be a bool"):
        llm.generate(["Hello"], GREEDY, use_tqdm="no")
    assert_serves_and_is_clean(llm)


def test_an_engine_refusal_names_which_prompt(llm):
    with pytest.raises(RequestTooLargeError, match=r"^prompts\[1\]: prompt has \d+ tokens; max_model_len is 512"):
        llm.generate(["fine", "word " * 600], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"^prompts\[0\]: prompt token id 99999 at position 1 is outside"):
        llm.generate([[1, 99999], "fine"], GREEDY, use_tqdm=False)
    assert_serves_and_is_clean(llm)


def test_token_id_prompts_accept_numpy(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    plain = llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    as_array = llm.generate(np.array(ids, dtype=np.int64), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    as_scalars = llm.generate([[np.int32(t) for t in ids]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert plain == as_array == as_scalars


def test_an_interrupted_generate_aborts_its_requests(llm, monkeypatch):
    real_step, calls = llm.engine.step, []

    def step_then_interrupt(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real_step(**kwargs)

    monkeypatch.setattr(llm.engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["One long story", "Another long story"],
                     SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished()
    steps_before = llm.stats()["num_steps"]
    assert_serves_and_is_clean(llm)  # runs only its own request: 4 tokens in 4 steps
    assert llm.stats()["num_steps"] - steps_before == 4


@pytest.mark.parametrize("owner,where,at_call", [("engine", "_append", 1), ("engine", "_append", 4),
                                                  ("outputs", "emit", 1), ("outputs", "emit", 3)])
def test_an_interrupt_inside_a_step_neither_hangs_nor_leaks(llm, monkeypatch, owner, where, at_call):
    # one request finishes at its 2nd token, so an interrupt can land after it ended but
    # before its final output was emitted
    target = llm.engine if owner == "engine" else llm.engine.outputs
    real, calls = getattr(target, where), []

    def interrupt_once(*args):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        if len(calls) > 10_000:  # a hang would spin here: fail instead
            raise AssertionError("the engine kept stepping after the interrupt")
        return real(*args)

    monkeypatch.setattr(target, where, interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["Short", "Longer one"], [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                               SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)],
                     use_tqdm=False)
    monkeypatch.undo()
    assert_serves_and_is_clean(llm)


@pytest.mark.parametrize("messages,error,message", [
    ([{"role": "user"}], InvalidRequestError, r"messages\[0\] has no 'content'"),
    ("hello", RequestTypeError, r"messages must be a list of \{'role': ..., 'content': ...\} dicts, got str"),
    ([{"role": "user", "content": None}], RequestTypeError, r"messages\[0\]\['content'\] must be a string"),
    ([[{"role": "user", "content": "hi"}], [{"role": "bot", "content": "x"}]], InvalidRequestError,
     r"messages\[1\]\[0\]\['role'\] must be one of \['system', 'user', 'assistant', 'tool', 'developer'\], got 'bot'"),
])
def test_chat_validates_messages_before_the_template(llm, messages, error, message):
    with pytest.raises(error, match=message):
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert_serves_and_is_clean(llm)


# ----------------------------------------------------------------------------- Engine
def test_n_samples_fit_when_one_does_and_are_refused_when_one_cannot(smollm):
    # 15 blocks, at most 2 sequences at once: 4 samples of 85 tokens (6 blocks each) run in turns
    engine = make_engine(smollm, kv_cache_memory=15 * 737_280, max_model_len=256, max_num_seqs=2)
    rid = engine.add_request([100, 101, 102, 103, 104], SamplingParams(n=4, max_tokens=80, ignore_eos=True))
    out = run_to_completion(engine)[rid]
    assert [len(c.token_ids) for c in out.outputs] == [80] * 4
    assert engine.stats()["kv_blocks_free"] == 15
    with pytest.raises(RequestTooLargeError, match=r"request needs 16 KV-cache blocks each of its samples "
                                                   r"\(250 tokens\) but the whole cache has 15"):
        engine.add_request([100] * 10, SamplingParams(n=2, max_tokens=240))


def test_seeds_differ_in_their_high_bits(smollm):
    engine = make_engine(smollm, kv_cache_memory="32MiB", max_model_len=256)

    def tokens(seed):
        rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=12, temperature=1.5, seed=seed))
        return run_to_completion(engine)[rid].outputs[0].token_ids

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2**32 + 1)


def test_request_id_and_params_types(smollm):
    engine = make_engine(smollm, kv_cache_memory="32MiB", max_model_len=256)
    with pytest.raises(ArgumentTypeError, match="request_id must be a string, got int 5"):
        engine.add_request("Hi", GREEDY, request_id=5)
    with pytest.raises(InvalidRequestError, match="request_id is empty"):
        engine.add_request("Hi", GREEDY, request_id="")
    with pytest.raises(ArgumentTypeError, match="params must be a SamplingParams, got dict"):
        engine.add_request("Hi", {"max_tokens": 2})
    assert engine.stats()["num_requests"] == 0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, hf_smollm_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", hf_smollm_tokenizer)


def test_engine_takes_a_model_name_or_says_what_it_takes(tiny_folder):
    engine = Engine(tiny_folder)
    rid = engine.add_request([5, 6, 7], GREEDY)
    assert len(run_to_completion(engine)[rid].outputs[0].token_ids) == 4
    with pytest.raises(ArgumentTypeError, match=r"Engine takes an EngineConfig or a model name or path, got int 5"):
        Engine(5)
    with pytest.raises(ArgumentTypeError, match=r"loaded must be a LoadedModel"):
        Engine(tiny_folder, loaded=5)
    assert isinstance(Engine(pathlib.Path(tiny_folder)).config.model, str)
    with pytest.raises(ArgumentTypeError, match=r"request_id must be a string, got int 5"):
        engine.abort(5)


def test_kv_cache_larger_than_free_memory_is_refused(tiny_folder, monkeypatch):
    loaded = load_model(tiny_folder, torch.float32, CPU)
    monkeypatch.setattr("fastinfer.engine.memory.available_memory", lambda device: 2**20)
    with pytest.raises(ConfigError, match=r"kv_cache_memory is 64.00 MiB, more than the memory free now on cpu "
                                          r"\(1.00 MiB\)"):
        make_engine(loaded, kv_cache_memory="64MiB")


def test_a_failed_kv_allocation_is_a_config_error(tiny_folder, monkeypatch):
    loaded = load_model(tiny_folder, torch.float32, CPU)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr("fastinfer.engine.memory.KVCache", no_memory)
    with pytest.raises(ConfigError, match=r"cannot allocate the KV cache \(\d+ blocks of \d+ bytes\) on cpu") as info:
        make_engine(loaded, kv_cache_memory="4MiB")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_llm_names_an_unknown_option(tiny_folder):
    with pytest.raises(TypeError, match=r"unknown engine option 'kv_cache_mem' \(did you mean 'kv_cache_memory'\?\)"):
        LLM(tiny_folder, kv_cache_mem="1GiB")
    with pytest.raises(ConfigError, match="CUDA is not available") if not torch.cuda.is_available() else \
            pytest.raises(ConfigError):
        LLM("/no/such/model.gguf", device="cuda:99")  # refused before the (missing) model is looked for
    assert EngineConfig(model=tiny_folder).model == tiny_folder
