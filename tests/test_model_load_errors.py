"""Unknown model paths and corrupt model files raise ModelLoadError with a clear message."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastinfer import LLM, ModelLoadError
from fastinfer.model.loader import load_model

CPU = torch.device("cpu")


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a known alias"):
        LLM(str(tmp_path / "no-such-model"))


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(str(bad), torch.float32, CPU)


def test_truncated_gguf_names_the_tensor_and_the_byte_counts(tmp_path, smollm_path):
    with open(smollm_path, "rb") as f:
        head = f.read(3_000_000)  # header and metadata, then the tensor data stops early
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(head)
    full = os.path.getsize(smollm_path)
    with pytest.raises(ModelLoadError, match=r"is truncated or incomplete: it has 3000000 bytes, its tensors "
                                             rf"need {full}; tensor '[\w.]+' \(\w+\) needs \d+ bytes at offset "
                                             r"\d+, and only \d+ are there"):
        load_model(str(bad), torch.float32, CPU)


def test_gguf_cut_inside_its_metadata(tmp_path, smollm_path):
    with open(smollm_path, "rb") as f:
        head = f.read(5000)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelLoadError, match=r"\(5000 bytes\): its header or metadata is truncated or corrupt") as info:
        load_model(str(bad), torch.float32, CPU)
    assert info.value.__cause__ is not None  # the reader's own error, chained


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_folder_with_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid model config"):
        load_model(str(tmp_path), torch.float32, CPU)


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": "2"}, "invalid model config: num_layers must be an int >= 1, got str '2'"),
    ({"vocab_size": -1}, "vocab_size must be an int >= 1, got -1"),
    ({"max_position_embeddings": None}, "max_position_embeddings must be an int >= 1, got NoneType None"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number > 0, got 0"),
    ({"num_attention_heads": 0}, "ZeroDivisionError"),
])
def test_bad_values_in_config_json_are_a_model_load_error(tmp_path, change, message):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(str(tmp_path), torch.float32, CPU)
    assert info.value.__cause__ is not None
