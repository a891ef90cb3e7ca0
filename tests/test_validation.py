"""The validation layer on its own (no model loaded): ``SamplingParams``, ``EngineConfig``,
prompts, chat messages, sizes, devices and seeds. Each case of issue 10 that needs no engine
is here; the ones that do are in ``test_bad_input.py``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastinfer import (ArgumentTypeError, ConfigError, EngineConfig, InvalidArgumentError,
                       InvalidRequestError, SamplingParams)
from fastinfer.errors import RequestTypeError
from fastinfer.engine.memory import total_memory
from fastinfer.sampling.generator import _state_layout_known, seeded_generator
from fastinfer.sampling.params import MAX_LOGPROBS, MAX_N
from fastinfer.validation import (as_conversations, as_prompt, as_prompts, check_messages,
                                  format_bytes, parse_bytes, parse_device)


# ----------------------------------------------------------------------------- SamplingParams
def test_n_has_an_upper_bound_named_in_the_error():
    with pytest.raises(InvalidArgumentError, match=rf"n must be an int in \[1, {MAX_N}\], got 1000000") as info:
        SamplingParams(n=10**6)
    assert info.value.argument == "n"
    assert SamplingParams(n=MAX_N).n == MAX_N


@pytest.mark.parametrize("field,value", [
    ("ignore_eos", "no"), ("ignore_eos", 1), ("ignore_eos", None),
    ("n", "3"), ("n", 2.0), ("n", True),
    ("max_tokens", "16"), ("max_tokens", 16.0),
    ("temperature", "0.5"), ("temperature", True), ("temperature", None),
    ("top_p", [0.5]), ("top_k", 5.0), ("min_p", "0"),
    ("repetition_penalty", b"1"), ("presence_penalty", {}), ("frequency_penalty", complex(1, 0)),
    ("stop", 5), ("stop", [5]), ("stop", {"a"}),
    ("stop_token_ids", 5), ("stop_token_ids", ["5"]), ("stop_token_ids", [True]),
    ("seed", "1"), ("seed", 1.0), ("logprobs", 2.5),
])
def test_every_field_checks_its_type_and_names_itself(field, value):
    with pytest.raises(ArgumentTypeError, match=rf"^{field}(\[0\])? must be ") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert info.value.argument.startswith(field)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty",
                                   "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300, -1e300, 10**400])
def test_non_finite_floats_are_refused(field, value):
    with pytest.raises(InvalidArgumentError, match=rf"^{field} must be a finite number"):
        SamplingParams(**{field: value})


def test_in_range_values_are_kept_and_normalised():
    p = SamplingParams(n=np.int64(2), temperature=1, top_k=-1, stop="END", stop_token_ids=(np.int32(7),),
                       seed=-(2**63), logprobs=MAX_LOGPROBS, ignore_eos=np.bool_(True))
    assert (p.n, p.temperature, p.top_k, p.stop_list, p.stop_token_ids) == (2, 1.0, 0, ["END"], [7])
    assert type(p.n) is int and type(p.temperature) is float and p.ignore_eos is True
    with pytest.raises(InvalidArgumentError, match=r"logprobs must be an int in \[0, 20\]"):
        SamplingParams(logprobs=MAX_LOGPROBS + 1)
    with pytest.raises(InvalidArgumentError, match=r"seed must be an int in \[-9223372036854775808, "):
        SamplingParams(seed=2**63)


def test_stop_strings_must_be_valid_unicode():
    with pytest.raises(InvalidArgumentError, match=r"stop\[1\] is not valid Unicode: lone surrogate"):
        SamplingParams(stop=["ok", "\ud800"])


# ----------------------------------------------------------------------------- seeds
def draws(seed: int, stream: int = 0) -> list[float]:
    return torch.rand(8, generator=seeded_generator(seed, stream)).tolist()


def test_every_bit_of_a_64_bit_seed_changes_the_samples():
    assert draws(1) == draws(1)
    assert draws(1) != draws(2**32 + 1)           # torch's manual_seed keeps 32 bits: these collided
    assert draws(1) != draws(1 + 2**62)
    assert draws(-5) != draws(5)
    assert draws(7, stream=0) != draws(7, stream=1)  # the n samples of one request differ


def test_seeded_generator_writes_the_whole_twister_state():
    assert _state_layout_known()  # this torch takes the full 624-word state (no 32-bit fallback)
    # a generator built from our state keeps producing valid uniforms in [0, 1)
    values = torch.rand(10_000, generator=seeded_generator(123)).numpy()
    assert 0.0 <= values.min() and values.max() < 1.0 and abs(values.mean() - 0.5) < 0.02


# ----------------------------------------------------------------------------- EngineConfig
@pytest.mark.parametrize("device,error,message", [
    ("cudanope", InvalidArgumentError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:abc", InvalidArgumentError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:-1", InvalidArgumentError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("mps", InvalidArgumentError, "device must be"),
    ("cpu:3", InvalidArgumentError, "device must be"),
    (7, ArgumentTypeError, "device must be"),
])
def test_bad_devices_are_refused_before_anything_loads(device, error, message):
    with pytest.raises(error, match=message) as info:
        EngineConfig(model="/no/such/model.gguf", device=device)
    assert info.value.argument == "device"
    if isinstance(device, str) and device.startswith("cuda:"):
        assert isinstance(info.value.__cause__, RuntimeError)  # torch's parser error, chained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_config_error(device):
    with pytest.raises(ConfigError, match=f"device is '{device}' but CUDA is not available"):
        EngineConfig(device=device)


@pytest.mark.parametrize("text,expected", [
    ("2G", 2 * 10**9), ("2GB", 2 * 10**9), ("2gib", 2 * 2**30), ("2Gi", 2 * 2**30), ("512MB", 512 * 10**6),
    ("1.5 MiB", int(1.5 * 2**20)), ("64K", 64_000), ("1TiB", 2**40), ("123", 123), ("10b", 10),
])
def test_sizes_accept_the_usual_units(text, expected):
    assert parse_bytes("kv_cache_memory", text) == expected


@pytest.mark.parametrize("value", ["2X", "-1GB", "GB", "", "1e9", "2 G B"])
def test_bad_sizes_list_the_accepted_units(value):
    with pytest.raises(InvalidArgumentError, match=r"kv_cache_memory must be a number of bytes or a size with "
                                                   r"a unit: B, KB, MB, GB, TB .* KiB, MiB, GiB, TiB"):
        parse_bytes("kv_cache_memory", value)


MACHINE = total_memory(torch.device("cpu"))


@pytest.mark.parametrize("value", [
    pytest.param("1000GB", marks=pytest.mark.skipif(MACHINE >= 10**12, reason="a machine with 1000 GB")),
    pytest.param("1TiB", marks=pytest.mark.skipif(MACHINE >= 2**40, reason="a machine with 1 TiB")),
    f"{2 * MACHINE}B", 2 * MACHINE, 10**400, "9" * 400 + "GB",
])
def test_kv_cache_memory_beyond_the_machine_is_refused_before_loading(value):
    with pytest.raises(ConfigError, match=r"kv_cache_memory is .*, more than all the memory there is on cpu"):
        EngineConfig(model="/no/such/model.gguf", device="cpu", kv_cache_memory=value)


def test_format_bytes_is_exact_for_any_size():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(10**400).endswith(" TiB")


def test_kv_cache_memory_is_stored_as_bytes():
    assert EngineConfig(device="cpu", kv_cache_memory="64MiB").kv_cache_memory == 64 * 2**20


@pytest.mark.parametrize("field,value,error", [
    ("block_size", 0, InvalidArgumentError), ("block_size", "16", ArgumentTypeError),
    ("max_num_seqs", 2.0, ArgumentTypeError), ("max_model_len", -5, InvalidArgumentError),
    ("gpu_memory_utilization", math.nan, InvalidArgumentError), ("gpu_memory_utilization", 1.5, InvalidArgumentError),
    ("enable_chunked_prefill", "yes", ArgumentTypeError), ("seed", 2**64, InvalidArgumentError),
    ("dtype", "float8", InvalidArgumentError), ("dtype", torch.float32, ArgumentTypeError),
    ("model", "", InvalidArgumentError), ("model", None, ArgumentTypeError),
    ("kv_cache_memory", 0, InvalidArgumentError), ("kv_cache_memory", 1.5, ArgumentTypeError),
])
def test_engine_config_checks_types_and_ranges(field, value, error):
    with pytest.raises(error) as info:
        EngineConfig(**{field: value})
    assert info.value.argument == field


def test_unknown_engine_option_names_it_and_suggests_the_close_one():
    with pytest.raises(TypeError, match="unknown engine option 'max_num_seq' \\(did you mean 'max_num_seqs'\\?\\)"):
        EngineConfig.from_options("m", max_num_seq=4)


def test_parse_device_accepts_cpu_forms():
    assert parse_device("device", "cpu") == torch.device("cpu")
    assert parse_device("device", torch.device("cpu")) == torch.device("cpu")


# ----------------------------------------------------------------------------- prompts
def test_prompt_shapes_that_are_accepted():
    assert as_prompts("hi") == ["hi"]
    assert as_prompts([1, 2]) == [[1, 2]]
    assert as_prompts(np.array([1, 2], dtype=np.int32)) == [[1, 2]]
    assert as_prompts([np.int64(1), 2]) == [[1, 2]]
    assert as_prompts(["a", [3], (4, 5), np.array([6])]) == ["a", [3], [4, 5], [6]]
    assert as_prompts([]) == []
    assert as_prompts([np.str_("hi")]) == ["hi"] and type(as_prompts(np.str_("x"))[0]) is str
    assert all(type(t) is int for t in as_prompts(np.array([1, 2]))[0])


@pytest.mark.parametrize("value,message", [
    ({"prompt": "Hello"}, r"prompts must be a string, a sequence of int token ids, or a list of those, got dict"),
    (b"hello", r"prompts must be .*, got bytes b'hello'"),
    (bytearray(b"x"), r"got bytearray"),
    (None, r"prompts must be .*, got NoneType None"),
    (5, r"prompts must be .*, got int 5"),
    (3.5, r"got float 3.5"),
    ([True, False], r"prompt token ids must be ints, got bool True at position 0"),
    ([1, "a"], r"prompt token ids must be ints, got str 'a' at position 1"),
    (["a", 5], r"prompts\[1\] must be a string or a sequence of int token ids; for one token id pass \[5\]"),
    ([["a"]], r"prompts\[0\] token ids must be ints, got str"),
    ([{"prompt": "x"}], r"prompts\[0\] must be a string or a sequence of int token ids, got dict"),
    (np.array([[1, 2]]), r"got ndarray"),
    (np.array([1.5]), r"token ids must be ints, got float 1.5"),
])
def test_other_prompts_are_refused_with_the_type_named(value, message):
    with pytest.raises(RequestTypeError, match=message):
        as_prompts(value)


@pytest.mark.parametrize("value,message", [
    ("", "prompt is empty"), ([], r"prompt is empty \(no token ids\)"),
    ("ok \ud800", r"prompt is not valid Unicode: lone surrogate '\\ud800' at index 3"),
])
def test_empty_and_invalid_text_prompts(value, message):
    with pytest.raises(InvalidRequestError, match=message):
        as_prompt(value)


# ----------------------------------------------------------------------------- chat messages
@pytest.mark.parametrize("value,error,message", [
    ("hello", RequestTypeError, r"messages must be a list of \{'role': ..., 'content': ...\} dicts, got str"),
    ([{"role": "user"}], InvalidRequestError, r"messages\[0\] has no 'content'"),
    ([{"content": "x"}], InvalidRequestError, r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": None}], RequestTypeError,
     r"messages\[0\]\['content'\] must be a string, got NoneType None"),
    ([{"role": "robot", "content": "x"}], InvalidRequestError,
     r"messages\[0\]\['role'\] must be one of \['system', 'user', 'assistant', 'tool', 'developer'\], got 'robot'"),
    ([{"role": 1, "content": "x"}], RequestTypeError, r"messages\[0\]\['role'\] must be one of"),
    (["hi"], RequestTypeError, r"messages\[0\] must be a dict with 'role' and 'content', got str"),
    ([{"role": "user", "content": "\udfff"}], InvalidRequestError, r"not valid Unicode"),
])
def test_bad_chat_messages_are_refused_before_the_template(value, error, message):
    with pytest.raises(error, match=message):
        as_conversations(value)


def test_conversations_one_or_many():
    one = [{"role": "user", "content": "hi"}]
    assert as_conversations(one) == [one]
    assert as_conversations([]) == []  # no conversations, as generate([]) has no prompts
    with pytest.raises(InvalidRequestError, match="messages is empty"):
        check_messages([])
    assert check_messages([{"role": "tool", "content": "42"}]) == [{"role": "tool", "content": "42"}]
    assert as_conversations([one, one]) == [one, one]
    assert check_messages([{"role": "assistant", "content": "", "name": "x"}])[0]["name"] == "x"
