"""Small random Llama checkpoints and a one-step prefill, shared by the tensor-parallel tests
(ranks as threads in ``test_tp_layout.py``, as gloo processes in ``test_tp_gloo.py``). Every
process that builds a checkpoint from the same arguments gets the same weights (seeded)."""
from __future__ import annotations

import torch

from fastinfer.quant.pack import pack
from fastinfer.quant.rtn import quantize_int4, quantize_int8


def tiny_config(heads: int, kv: int, tied: bool):
    """A 2-layer Llama of ``heads`` query heads (32 dims) over ``kv`` KV heads, vocabulary 1000."""
    from fastinfer.model.config import ModelConfig

    return ModelConfig("llama", vocab_size=1000, hidden_size=256, intermediate_size=256, num_layers=2,
                       num_heads=heads, num_kv_heads=kv, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=256, tie_word_embeddings=tied, attention_bias=False)


def prefill_logits(model, kv_heads: int, prompts: list[list[int]]) -> torch.Tensor:
    """One prefill step's logits through a ModelRunner over a fresh cache."""
    from fastinfer.kv_cache.cache import KVCache
    from fastinfer.model.runner import ModelRunner, StepInput

    cache = KVCache(2, 8, 16, kv_heads, 32, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, cache.layers, 16, torch.device("cpu"))
    tables = [[2 * i, 2 * i + 1] for i in range(len(prompts))]
    return runner.execute(StepInput(prompts, [0] * len(prompts), tables))


def checkpoint_for(cfg, kind: str | None) -> dict:
    """HF-named random weights for ``cfg`` (seeded), float or quantized as ``kind``."""
    torch.manual_seed(2)
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (cfg.num_heads * hd, h), "self_attn.k_proj": (cfg.num_kv_heads * hd, h),
              "self_attn.v_proj": (cfg.num_kv_heads * hd, h), "self_attn.o_proj": (h, cfg.num_heads * hd),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    quant = {None: lambda w: w, "int4": lambda w: pack(quantize_int4(w, 32)), "int8": lambda w: pack(quantize_int8(w))}
    weights = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h) * 0.5, "model.norm.weight": torch.ones(h)}
    if not cfg.tie_word_embeddings:
        weights["lm_head.weight"] = torch.randn(cfg.vocab_size, h) * 0.1
    for i in range(cfg.num_layers):
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}.weight"] = quant[kind](torch.randn(*shape) * 0.06)
    return weights


PROMPTS = [[5, 17, 230, 9, 999], list(range(40, 61))]
