"""``fastinfer quantize`` writes a folder that loads directly (no second quantization) and gives
the same tokens as quantizing at load; its tokenizer and chat template come along."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastinfer.cli.main import main
from fastinfer.errors import ConfigError, ModelLoadError
from fastinfer.model.loader import load_model
from fastinfer.common.packed import PackedWeight

from ..conftest import CPU, make_engine
from ..test_batch_invariance import varied_prompts
from .test_quantized_model import greedy, loaded


def cheap_awq(monkeypatch):
    """AWQ with a short calibration (1,024 tokens) and no int4 clipping search, for both the
    command and the load (the equality is under test here; test_awq.py checks the quality)."""
    import functools

    from fastinfer.model import loader
    monkeypatch.setattr(loader, "apply_awq", functools.partial(loader.apply_awq, num_tokens=1024, seq_len=256,
                                                               rows=128, clip=False))


@pytest.mark.parametrize("mode,args", [("int4-auto", ["--quantization", "int4", "--quant-group-size", "auto"]),
                                       ("int8", ["--quantization", "int8"]),
                                       ("fp8", ["--quantization", "fp8"]),
                                       ("awq-int4-auto", ["--quantization", "int4", "--quant-group-size", "auto",
                                                         "--quant-method", "awq"])])
def test_quantize_then_reload_equals_quantizing_at_load(tmp_path, smollm_path, mode, args, capsys, monkeypatch):
    if mode.startswith("awq"):
        cheap_awq(monkeypatch)
    out = tmp_path / "q"
    assert main(["quantize", "smollm2-135m", *args, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fastinfer" and qc["quantization"] == args[1] and len(qc["packed"]) == 30 * 7 + 1
    assert qc["method"] == ("awq" if mode.startswith("awq") else "rtn")
    reloaded = load_model(str(out), torch.float32, CPU)
    at_load = (load_model(smollm_path, torch.float32, CPU, "int4", "auto", "awq") if mode == "awq-int4-auto"
               else loaded(smollm_path, mode))
    a, b = (dict(m.model.named_modules()) for m in (reloaded, at_load))
    for name in ("layers.0.self_attn.qkv_proj.weight", "layers.29.mlp.down_proj.weight", "embed_tokens.weight"):
        assert isinstance(a[name], PackedWeight) and a[name].kind == b[name].kind
        assert torch.equal(a[name].codes.view(torch.uint8), b[name].codes.view(torch.uint8))
        assert torch.equal(a[name].scales, b[name].scales)
    prompts = varied_prompts(at_load.tokenizer, 3)
    assert greedy(make_engine(reloaded, kv_cache_memory="64MiB"), prompts, 16) == \
        greedy(make_engine(at_load, kv_cache_memory="64MiB"), prompts, 16)
    assert make_engine(reloaded, kv_cache_memory="64MiB").stats()["weight_bytes"] == \
        make_engine(at_load, kv_cache_memory="64MiB").stats()["weight_bytes"]
    tok, ref = reloaded.tokenizer, at_load.tokenizer
    assert tok.chat_template == ref.chat_template and tok.eos_token_ids == ref.eos_token_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=True) == ref.apply_chat_template(msgs, tokenize=True)
    # the folder's weights dequantized on request; another scheme is refused
    dense = load_model(str(out), torch.float32, CPU, "none")
    assert not any(isinstance(m, PackedWeight) for m in dense.model.modules())
    with pytest.raises(ConfigError, match="already quantized with"):
        load_model(str(out), torch.float32, CPU, "fp8" if mode != "fp8" else "int4")
    if mode.endswith("int4-auto"):  # the saved groups are used as they are, never silently re-chosen
        with pytest.raises(ConfigError, match="in groups of 'auto', not 32"):
            load_model(str(out), torch.float32, CPU, "int4", 32)
        assert isinstance(dict(load_model(str(out), torch.float32, CPU, "int4", "auto").model.named_modules())[
            "layers.0.mlp.down_proj.weight"], PackedWeight)


def test_quantize_refuses_bad_settings_and_foreign_folders(tmp_path, capsys):
    assert main(["quantize", "smollm2-135m", "--quantization", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "--quantization must be int8, int4 or fp8" in capsys.readouterr().err
    assert main(["quantize", "smollm2-135m", "--quantization", "fp8", "--quant-method", "awq",
                 "--out", str(tmp_path / "y")]) == 2
    assert "quant_method='awq' calibrates weights quantized at load" in capsys.readouterr().err
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4,
                                                    "hidden_size": 64, "intermediate_size": 128, "vocab_size": 10,
                                                    "num_hidden_layers": 1,
                                                    "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ModelLoadError, match="quant_method 'gptq' is not supported"):
        load_model(str(folder), torch.float32, CPU)
