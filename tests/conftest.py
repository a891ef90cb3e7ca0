"""Shared fixtures: the default model (ours and the transformers reference), tiny random
Hugging Face models saved with ``save_pretrained``, and an engine factory."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastinfer import EngineConfig  # noqa: E402
from fastinfer.engine.engine import Engine  # noqa: E402
from fastinfer.model.loader import load_model  # noqa: E402
from fastinfer.model.registry import resolve_model_path  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """fastinfer's float32 load of the default model, dequantized (the exact path; shared, read-only)."""
    return load_model(smollm_path, torch.float32, CPU, "none")


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' float32 load of the same GGUF file, dequantized: the reference model."""
    from fastinfer.bench.baselines import load_transformers_model

    return load_transformers_model(smollm_path, torch.float32)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def make_engine(loaded, **kwargs) -> Engine:
    """An engine over an already loaded model (no reload), in the model's dtype, on the CPU."""
    kwargs.setdefault("dtype", str(loaded.model.embed_tokens.dtype).removeprefix("torch."))
    kwargs.setdefault("device", "cpu")
    return Engine(EngineConfig(model=loaded.path, **kwargs), loaded)


def run_to_completion(engine: Engine, before_step=None) -> dict[str, object]:
    """Steps ``engine`` until idle; returns the final output of every request by id and
    checks that each request produced exactly one final output. ``before_step(n)`` is called
    before the n-th step (1, 2, ...): to abort a request there, say."""
    finals: dict[str, object] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if before_step is not None:
            before_step(steps)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals, f"two final outputs for {out.request_id}"
                finals[out.request_id] = out
    return finals


def save_tiny_model(path, family: str, tokenizer, kv_heads: int = 2) -> str:
    """A small random-weight model of ``family`` ("llama" or "qwen2" with QKV bias; 4 heads,
    ``kv_heads`` kv heads: GQA by default), saved with ``save_pretrained`` together with
    ``tokenizer``. Weights use a large init range so that logits are peaked (greedy tokens then
    have no near-ties)."""
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0 if family == "llama" else 1)
    if family == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, rope_theta=1000000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases to zero: make the bias path matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
