"""Loads the Hugging Face ``transformers`` model that the baselines run: the same weights
and dtype as fastinfer (a GGUF file is dequantized, as fastinfer does)."""
from __future__ import annotations

import os

import torch


def load_transformers_model(model_path: str, dtype: torch.dtype):
    """The reference model for a .gguf file (dequantized) or a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, GgufConfig

    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
