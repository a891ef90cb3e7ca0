"""AWQ calibration of a Llama-family model's float weights (``quant_method="awq"``).

Runs the float model over calibration text, records the inputs of every projection, searches
per-input-channel scales (and, for int4, clipping ranges) with :mod:`fastinfer.quant.awq`, and
returns float weights (Hugging Face names) with the scales folded in, ready for
round-to-nearest quantization:

- q/k/v read ``input_layernorm``'s output: their columns are multiplied by ``s``, the norm's
  weight divided by it;
- gate/up read ``post_attention_layernorm``'s output: the same, with that norm;
- down reads ``silu(gate) * up``: its columns are multiplied by ``s``, up's rows divided by it;
- o reads the attention output, whose channels are shared by the query heads of a kv head
  (GQA): as in the AWQ paper's code it is scaled (into v's rows, and v's bias) only when the
  model has as many kv heads as heads, and otherwise only clipped.

The float model computes the same outputs before and after the folding (up to float32
rounding); only the quantization error changes.
"""
from __future__ import annotations

import torch

from fastinfer.model.config import ModelConfig
from fastinfer.common.kv_format import CacheLayer
from fastinfer.common.metadata import AttentionMetadata
from fastinfer.common.packed import PackedWeight
from fastinfer.quant import awq
from fastinfer.quant.rtn import dequantize, fake_int4_groups, quantize_int8, resolve_group_size

class _Inputs:
    """Mean magnitude per input channel of a projection over every calibration token, and a
    sample of its input rows."""

    def __init__(self, every: int) -> None:
        self.total, self.count, self.rows, self.every = None, 0, [], every

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        s = x.abs().sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]
        self.rows.append(x[self.every // 2::self.every].clone())

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def _fake_quant(scheme: str, group_size: int | str):
    def fq(w: torch.Tensor) -> torch.Tensor:
        if scheme == "int8":
            return dequantize(quantize_int8(w))
        n, k = w.shape
        g = resolve_group_size(group_size, k)
        return fake_int4_groups(w.float().reshape(n, k // g, g)).reshape(n, k)
    return fq


@torch.inference_mode()
def _calibrate(cfg: ModelConfig, weights: dict, ids: list[int], seq_len: int, rows: int):
    """Runs the float model over ``ids`` in windows of ``seq_len``; returns per layer the
    recorded inputs of qkv, o, gate_up and down."""
    from fastinfer.model.llama import LlamaForCausalLM

    model = LlamaForCausalLM(cfg, torch.float32)
    model.load_weights({n: w.dequantize() if isinstance(w, PackedWeight) else w.float() for n, w in weights.items()})
    model.fused_layers = False  # the taps below are forward hooks on the layers' modules
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)] or [ids]
    every = max(1, sum(len(w) for w in windows) // rows)
    taps, hooks = [], []
    for layer in model.layers:
        mods = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
        tap = {k: _Inputs(every) for k in mods}
        hooks += [m.register_forward_hook(tap[k]) for k, m in mods.items()]
        taps.append(tap)
    try:
        for w in windows:
            n = len(w)
            caches = [CacheLayer(torch.empty(1, n, cfg.num_kv_heads, cfg.head_dim),
                                 torch.empty(1, n, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
            pos = torch.arange(n)
            meta = AttentionMetadata.one_sequence(0, n)
            model(torch.tensor(w), pos, caches, meta)
    finally:
        for h in hooks:
            h.remove()
    return taps


def apply_awq(cfg: ModelConfig, weights: dict[str, torch.Tensor | PackedWeight], tokenizer, scheme: str,
              group_size: int | str = 32, text: str | None = None, num_tokens: int = 8192, seq_len: int = 512,
              rows: int = 512, clip: bool = True) -> dict[str, torch.Tensor]:
    """Float weights (HF names) with AWQ scales folded in and, for int4, clipped; quantize
    them with RTN afterwards. ``text`` defaults to :func:`fastinfer.quant.awq.default_calibration_text`;
    the first ``num_tokens`` of it are run in windows of ``seq_len``, and ``rows`` input rows
    per projection drive the searches (``clip=False`` skips the int4 clipping search)."""
    ids = tokenizer.encode(text if text is not None else awq.default_calibration_text())[:num_tokens]
    out = {n: (w.dequantize() if isinstance(w, PackedWeight) else w.float().clone()) for n, w in weights.items()}
    taps = _calibrate(cfg, out, ids, seq_len, rows)
    fq = _fake_quant(scheme, group_size)
    for i, tap in enumerate(taps):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        groups = [  # (tap, projections reading it, where 1 / s goes: (name, as rows or as a vector))
            ("qkv", [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"], p + "input_layernorm.weight"),
            ("gate_up", [mlp + "gate_proj.weight", mlp + "up_proj.weight"], p + "post_attention_layernorm.weight"),
            ("down", [mlp + "down_proj.weight"], mlp + "up_proj.weight"),
        ]
        if cfg.num_kv_heads == cfg.num_heads:  # o's input channel j is v's output channel j
            groups.append(("o", [attn + "o_proj.weight"], attn + "v_proj.weight"))
        scaled = {}
        for key, names, prev in groups:
            s, _, _ = awq.search_scales([out[n] for n in names], tap[key].sample(), tap[key].mean(), fq)
            for n in names:
                out[n] = out[n] * s
            out[prev] = out[prev] / (s if out[prev].dim() == 1 else s.unsqueeze(1))
            bias = prev.removesuffix(".weight") + ".bias"
            if key == "o" and bias in out:
                out[bias] = out[bias] / s
            scaled[key] = s
        if scheme != "int4" or not clip:
            continue
        for key, names in (("qkv", [attn + "v_proj.weight"]), ("o", [attn + "o_proj.weight"]),
                           ("gate_up", [mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
                           ("down", [mlp + "down_proj.weight"])):
            x = tap[key].sample()
            if key in scaled:
                x = x / scaled[key]
            for n in names:
                g = resolve_group_size(group_size, out[n].shape[1])
                lo, hi = awq.search_clip(out[n], x, g)
                out[n] = awq.clip(out[n], lo, hi)
    return out
