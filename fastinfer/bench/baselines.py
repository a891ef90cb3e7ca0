"""Baseline: Hugging Face ``transformers`` ``generate``, one request at a time, on the same
weights and dtype as fastinfer (greedy, exactly ``n`` new tokens per request)."""
from __future__ import annotations

import os
import time

import torch


def load_transformers_model(model_path: str, dtype: torch.dtype):
    """The reference model for a .gguf file (dequantized) or a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, GgufConfig

    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()


@torch.inference_mode()
def transformers_generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (EOS does not stop it)."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def time_transformers_one_at_a_time(model, prompts: list[list[int]], output_lens: list[int]) -> float:
    """Seconds to serve every request in turn."""
    start = time.perf_counter()
    for p, n in zip(prompts, output_lens):
        transformers_generate(model, p, n)
    return time.perf_counter() - start
