"""Model configuration facts: sliding windows cap the context, GGUF rope factors scale the
rotary frequencies, incomplete GGUF metadata is a ModelLoadError."""
from __future__ import annotations

import pytest
import torch

from fastinfer import ModelLoadError
from fastinfer.layers.rotary import inverse_frequencies
from fastinfer.model.config import ModelConfig

HF = {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768}
GGUF = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.block_count": 1, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.vocab_size": 10, "llama.context_length": 2048}


@pytest.mark.parametrize("arch,extra,expected", [
    ("MistralForCausalLM", {"sliding_window": 4096}, 4096),
    ("MistralForCausalLM", {"sliding_window": None}, 32768),
    ("Qwen2ForCausalLM", {"sliding_window": 4096, "use_sliding_window": False}, 32768),
    ("Qwen2ForCausalLM", {"sliding_window": 4096, "use_sliding_window": True}, 4096),
    ("LlamaForCausalLM", {"sliding_window": 4096}, 32768),
])
def test_sliding_window_caps_the_context(arch, extra, expected):
    cfg = ModelConfig.from_hf({**HF, "architectures": [arch], **extra})
    assert cfg.max_position_embeddings == expected


def test_gguf_rope_freq_factors_divide_the_frequencies():
    factors = [1.0] * 4 + [8.0] * 4
    cfg = ModelConfig.from_gguf(GGUF, True, factors)
    plain = inverse_frequencies(16, 10000.0, None)
    scaled = inverse_frequencies(16, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(scaled, plain / torch.tensor(factors))
    with pytest.raises(ValueError, match="rope_freqs has 3 factors, expected 8"):
        inverse_frequencies(16, 10000.0, {"rope_type": "freq_factors", "factors": [1.0] * 3})


@pytest.mark.parametrize("missing", ["llama.attention.head_count", "llama.block_count", "llama.embedding_length"])
def test_incomplete_gguf_metadata_is_a_load_error(missing):
    meta = {k: v for k, v in GGUF.items() if k != missing}
    with pytest.raises(ModelLoadError, match=missing.replace(".", r"\.")):
        ModelConfig.from_gguf(meta, True)


def test_unsupported_gguf_architecture():
    with pytest.raises(ModelLoadError, match="'falcon' is not supported"):
        ModelConfig.from_gguf({**GGUF, "general.architecture": "falcon"}, True)
