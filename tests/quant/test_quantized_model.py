"""The default model with quantized weights, end to end: each scheme loads, generates sensible
text, keeps a request's tokens independent of the batch, reports its weight bytes; GGUF blocks
kept quantized agree with the dequantized path; bad settings get clear errors."""
from __future__ import annotations

import pytest
import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.engine.config import _check_fp8
from fastinfer.errors import ArgumentTypeError, ConfigError, InvalidArgumentError
from fastinfer.model.loader import load_model
from fastinfer.quant.policy import set_input_quantization
from fastinfer.common.packed import PackedWeight

from ..conftest import CPU, make_engine, run_to_completion, save_tiny_model
from ..test_batch_invariance import varied_prompts

MODES = {  # name -> (quantization, group size)
    "gguf-kept": (None, 32), "int8": ("int8", 32), "int4-g32": ("int4", 32), "int4-auto": ("int4", "auto"),
    "fp8": ("fp8", 32),
}
_LOADED: dict[str, object] = {}


def loaded(smollm_path, mode: str):
    """The default model under ``mode`` (loaded once per test session)."""
    if mode not in _LOADED:
        quantization, group = MODES[mode]
        _LOADED[mode] = load_model(smollm_path, torch.float32, CPU, quantization, group)
    return _LOADED[mode]


def greedy(engine, prompts, n: int = 16) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    finals = run_to_completion(engine)
    return [finals[r].outputs[0].token_ids for r in ids]


@pytest.mark.parametrize("mode", list(MODES))
def test_quantized_model_is_batch_invariant_and_sensible(smollm_path, mode):
    model = loaded(smollm_path, mode)
    linears = [m for m in model.model.modules() if isinstance(m, PackedWeight)]
    assert len(linears) == 30 * 4 + 1  # qkv, o, gate_up, down per layer; the tied embedding/LM head
    prompts = varied_prompts(model.tokenizer, 8)
    together = greedy(make_engine(model, kv_cache_memory="64MiB", max_model_len=512), prompts)
    for i in (0, 3, 7):
        alone = greedy(make_engine(model, kv_cache_memory="64MiB", max_model_len=512), [prompts[i]])[0]
        assert alone == together[i], f"{mode}: prompt {i} differs when batched"
    engine = make_engine(model, kv_cache_memory="64MiB", max_model_len=512)
    [answer] = greedy(engine, [model.tokenizer.encode("The capital of France is")], 3)
    assert "Paris" in model.tokenizer.decode(answer)


def _alone_equals_batched(model, label: str, **engine_options) -> None:
    prompts = varied_prompts(model.tokenizer, 8)
    options = dict(kv_cache_memory="64MiB", max_model_len=512, **engine_options)
    together = greedy(make_engine(model, **options), prompts)
    for i in (0, 5):
        assert greedy(make_engine(model, **options), [prompts[i]])[0] == together[i], f"{label}: prompt {i}"


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_cache_is_batch_invariant(smollm, kv):
    _alone_equals_batched(smollm, f"kv {kv}", kv_cache_dtype=kv)


def test_bfloat16_with_an_int8_kv_cache_is_batch_invariant(smollm_path):
    """bfloat16 linears run the native kernel too (oneDNN's change rows with the batch)."""
    _alone_equals_batched(load_model(smollm_path, torch.bfloat16, CPU, "none"), "bf16 kv int8",
                          kv_cache_dtype="int8")


def test_awq_model_is_batch_invariant(smollm_path, monkeypatch):
    from .test_quantize_command import cheap_awq
    cheap_awq(monkeypatch)
    _alone_equals_batched(load_model(smollm_path, torch.float32, CPU, "int4", "auto", "awq"), "awq int4")


def test_gguf_kept_agrees_with_the_dequantized_path(smollm_path, smollm):
    """Same weights, computed on the blocks. With float inputs: logits within float32 rounding
    and the same greedy tokens. With the default int8 inputs (llama.cpp's way): logits within
    the inputs' quantization error."""
    from .. import test_model_reference as ref

    kept = loaded(smollm_path, "gguf-kept")
    prompts = varied_prompts(smollm.tokenizer, 4)
    want = ref.ours_prompt_logits(smollm, prompts[1])
    try:
        set_input_quantization(kept.model, False)
        a = greedy(make_engine(kept, kv_cache_memory="64MiB", max_model_len=512), prompts, 24)
        b = greedy(make_engine(smollm, kv_cache_memory="64MiB", max_model_len=512), prompts, 24)
        assert a == b
        exact = ref.ours_prompt_logits(kept, prompts[1])
    finally:
        set_input_quantization(kept.model, True)
    assert exact.shape == want.shape == (len(prompts[1]), 49152)
    torch.testing.assert_close(exact, want, rtol=1e-3, atol=2e-3)
    approx = ref.ours_prompt_logits(kept, prompts[1])
    assert float((approx - want).abs().mean() / want.abs().mean()) < 0.02
    assert float((approx.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_int4_group_32_reproduces_the_q4_1_file(smollm_path):
    """Requantizing the Q4_1 file's weights to int4 with groups of 32 (scale and offset) lands on
    the file's own grid: the same greedy tokens as computing on the kept blocks."""
    kept, rtn = loaded(smollm_path, "gguf-kept"), loaded(smollm_path, "int4-g32")
    prompts = varied_prompts(kept.tokenizer, 3)
    assert greedy(make_engine(kept, kv_cache_memory="64MiB"), prompts, 24) == \
        greedy(make_engine(rtn, kv_cache_memory="64MiB"), prompts, 24)


def test_weight_bytes_and_kv_bytes_per_token(smollm_path, smollm):
    dense = make_engine(smollm, kv_cache_memory="64MiB").stats()
    assert dense["weight_bytes"] == sum(p.numel() * 4 for p in smollm.model.parameters())
    assert dense["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    sizes = {mode: make_engine(loaded(smollm_path, mode), kv_cache_memory="64MiB").stats()["weight_bytes"]
             for mode in MODES}
    # Q4_1 holds 5 bits a weight in the file, kept so (its fp16 scale and offset per 32, the
    # Q8_0 embedding's fp16 scales); int4 RTN stores the same layout (int8 embedding in groups)
    assert sizes["gguf-kept"] < 0.18 * dense["weight_bytes"]
    assert sizes["int4-g32"] == sizes["gguf-kept"]
    assert sizes["int4-auto"] < sizes["int4-g32"]
    assert 0.25 * dense["weight_bytes"] < sizes["int8"] < 0.26 * dense["weight_bytes"]
    assert sizes["fp8"] == sizes["int8"]


def test_bad_quantization_settings_get_clear_errors(tmp_path, smollm_path, hf_smollm_tokenizer, monkeypatch):
    with pytest.raises(InvalidArgumentError, match=r"quantization must be one of \[None, 'none', 'int8', 'int4', "
                                                   r"'fp8', 'gguf'\], got 'int3'") as e:
        EngineConfig(quantization="int3")
    assert e.value.argument == "quantization"
    with pytest.raises(InvalidArgumentError, match=r"quant_group_size must be one of \[32, 64, 128\] or 'auto'"):
        EngineConfig(quantization="int4", quant_group_size=48)
    with pytest.raises(ArgumentTypeError, match="quant_method must be one of"):
        EngineConfig(quant_method=3)
    # a group size that does not divide an input dimension names the weight
    with pytest.raises(InvalidArgumentError, match=r"quant_group_size 128 does not divide the input dimension 576.*"
                                                   r"model\.(embed_tokens|layers\.\d+\.\w+\.\w+_proj)\.weight"):
        load_model(smollm_path, torch.float32, CPU, "int4", 128)
    # quantization="gguf" on a float model
    folder = save_tiny_model(tmp_path / "tiny", "llama", hf_smollm_tokenizer)
    with pytest.raises(ConfigError, match="quantization='gguf' keeps a GGUF file's quantized blocks, but .* has no "
                                          "quantized GGUF tensors"):
        load_model(folder, torch.float32, CPU, "gguf")
    # fp8 on a GPU without fp8 support
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"quantization='fp8' needs a GPU with fp8 support .* NVIDIA A100 has 8\.0"):
        _check_fp8(torch.device("cuda:0"))


def test_a_float_model_quantizes_at_load(tmp_path, hf_smollm_tokenizer):
    """A safetensors folder (qwen2 family: QKV bias, tied embeddings) under each scheme."""
    folder = save_tiny_model(tmp_path / "tiny", "qwen2", hf_smollm_tokenizer)
    from .. import test_model_reference as ref

    dense = load_model(folder, torch.float32, CPU)
    ids = hf_smollm_tokenizer.encode("Hello there, how")
    want = ref.ours_prompt_logits(dense, ids)
    errors = {}
    for scheme in ("int8", "fp8", "int4"):
        q = load_model(folder, torch.float32, CPU, scheme, 32)
        assert isinstance(q.model.layers[0].self_attn.qkv_proj.weight, PackedWeight)
        assert q.model.layers[0].self_attn.qkv_proj.bias is not None
        assert q.model.lm_head_weight is q.model.embed_tokens.weight
        set_input_quantization(q.model, False)  # compare the weight schemes alone
        errors[scheme] = float((ref.ours_prompt_logits(q, ids) - want).abs().max() / want.abs().max())
    # random weights with a wide init are far more sensitive than a trained model; still, the
    # error grows as the bits shrink, and 8 bits stay close
    assert errors["int8"] < 0.15 and errors["int8"] < errors["fp8"] and errors["int8"] < errors["int4"]
