"""Tensor parallelism's split, before any process runs (issue 24): each rank's heads,
intermediate channels and vocabulary (``plan_layout``), and the shards of quantized weights
(``take_rows`` column-parallel, ``take_inputs`` row-parallel) against the whole weight: a
column split's outputs concatenate, and a row split's partial outputs sum, to the full one."""
from __future__ import annotations

import pytest
import torch

from fastinfer.common.packed import PackedWeight, take_inputs, take_rows
from fastinfer.distributed.layout import plan_layout
from fastinfer.errors import ConfigError
from fastinfer.quant.pack import pack
from fastinfer.quant.rtn import quantize_fp8, quantize_int4, quantize_int8

from .tp_models import PROMPTS, checkpoint_for, prefill_logits, tiny_config


def _ranges(layouts, field):
    return [getattr(lay, field) for lay in layouts]


def test_default_model_splits_whole_groups_unevenly():
    """smollm2-135m: 9 query heads over 3 KV heads cannot split evenly 2 ways (vLLM refuses
    it): rank 0 gets one GQA group, rank 1 two."""
    layouts = plan_layout(9, 3, 1536, 49152, 2)
    assert _ranges(layouts, "kv_heads") == [(0, 1), (1, 3)]
    assert _ranges(layouts, "q_heads") == [(0, 3), (3, 9)]
    assert _ranges(layouts, "intermediate") == [(0, 768), (768, 1536)]
    assert _ranges(layouts, "vocab") == [(0, 24576), (24576, 49152)]
    assert [(lay.rank, lay.size) for lay in layouts] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("heads, kv, size, q_want, kv_want", [
    (8, 2, 2, [(0, 4), (4, 8)], [(0, 1), (1, 2)]),                      # KV heads split
    (8, 1, 2, [(0, 4), (4, 8)], [(0, 1), (0, 1)]),                      # one KV head, replicated
    (8, 2, 4, [(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 1), (0, 1), (1, 2), (1, 2)]),
    (12, 4, 3, [(0, 3), (3, 6), (6, 12)], [(0, 1), (1, 2), (2, 4)]),    # uneven: larger last
    (4, 4, 1, [(0, 4)], [(0, 4)]),
])
def test_head_ranges(heads, kv, size, q_want, kv_want):
    layouts = plan_layout(heads, kv, 256, 1001, size)
    assert _ranges(layouts, "q_heads") == q_want and _ranges(layouts, "kv_heads") == kv_want
    for lay in layouts:  # every query head reads a KV head its rank holds
        group = heads // kv
        assert all(lay.kv_heads[0] <= h // group < lay.kv_heads[1] for h in range(*lay.q_heads))
    assert sum(lay.num_q_heads for lay in layouts) == heads
    vocab = _ranges(layouts, "vocab")
    assert vocab[0][0] == 0 and vocab[-1][1] == 1001 and all(a[1] == b[0] for a, b in zip(vocab, vocab[1:]))


@pytest.mark.parametrize("args, words", [
    ((8, 2, 256, 100, 9), "exceeds the model's 8 attention heads"),
    ((8, 2, 256, 100, 3), "cannot share 2 KV heads"),
    ((8, 2, 32, 100, 2), "cannot be split 2 ways in pieces of 32"),
    ((8, 2, 80, 100, 2), "80 intermediate channels cannot be split"),
    ((8, 2, 256, 100, 0), "must be >= 1"),
])
def test_refusals_name_the_setting(args, words):
    with pytest.raises(ConfigError, match=words) as info:
        plan_layout(*args)
    assert info.value.argument == "tensor_parallel_size"


def _weights() -> dict[str, PackedWeight]:
    torch.manual_seed(0)
    w = torch.randn(24, 256)
    return {"int4 G32": pack(quantize_int4(w, 32)), "int4 G64": pack(quantize_int4(w, 64)),
            "int8 per channel": pack(quantize_int8(w)), "int8 G16": pack(quantize_int8(w, 16)),
            "fp8": pack(quantize_fp8(w))}


@pytest.mark.parametrize("name", list(_weights()))
def test_column_shards_concatenate_to_the_whole(name):
    p = _weights()[name]
    parts = [take_rows(p, a, b) for a, b in [(0, 7), (7, 20), (20, 24)]]
    assert torch.equal(torch.cat([q.dequantize() for q in parts]), p.dequantize())


@pytest.mark.parametrize("name", list(_weights()))
def test_row_shards_sum_to_the_whole(name):
    p = _weights()[name]
    x = torch.randn(5, 256)
    cuts = [(0, 64), (64, 192), (192, 256)]  # on group boundaries of every kind here
    parts = [take_inputs(p, a, b) for a, b in cuts]
    full = p.dequantize()
    for (a, b), q in zip(cuts, parts):  # each shard stands for exactly its columns
        assert q.in_features == b - a and torch.equal(q.dequantize(), full[:, a:b])
    partial = sum(x[:, a:b] @ q.dequantize().T for (a, b), q in zip(cuts, parts))
    torch.testing.assert_close(partial, x @ full.T, rtol=1e-5, atol=1e-4)  # float32 sums reordered


def test_per_channel_weights_split_anywhere_and_groups_only_on_boundaries():
    weights = _weights()
    assert take_inputs(weights["int8 per channel"], 5, 77).group_size == 72
    with pytest.raises(ValueError, match="at 48: its groups are 32 inputs"):
        take_inputs(weights["int4 G32"], 48, 256)
    with pytest.raises(ValueError, match="at 100: its groups are 64 inputs"):
        take_inputs(weights["int4 G64"], 0, 100)
    with pytest.raises(ValueError, match="at 8: its groups are 16 inputs"):
        take_inputs(weights["int8 G16"], 8, 256)
    with pytest.raises(ValueError, match="not a range of 24 rows"):
        take_rows(weights["fp8"], 10, 30)


def _checkpoint(kind: str | None) -> dict:
    """HF-named weights of a 2-layer GQA Llama (8 heads of 32, 2 KV heads, intermediate 256,
    vocab 1000), float or quantized as ``kind``."""
    torch.manual_seed(1)
    hidden, hd, inter, vocab = 256, 32, 256, 1000
    shapes = {"self_attn.q_proj": (8 * hd, hidden), "self_attn.k_proj": (2 * hd, hidden),
              "self_attn.v_proj": (2 * hd, hidden), "self_attn.o_proj": (hidden, 8 * hd),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    quant = {None: lambda w: w, "int4": lambda w: pack(quantize_int4(w, 64)), "int8": lambda w: pack(quantize_int8(w))}
    weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "lm_head.weight": torch.randn(vocab, hidden),
               "model.norm.weight": torch.randn(hidden)}
    for i in range(2):
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden)
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}.weight"] = quant[kind](torch.randn(*shape))
    return weights


def _dense(w):
    return w.dequantize() if isinstance(w, PackedWeight) else w


@pytest.mark.parametrize("kind", [None, "int4", "int8"])
def test_rank_shards_rebuild_the_checkpoint(kind):
    from fastinfer.model.sharding import shard_weights

    weights = _checkpoint(kind)
    layouts = plan_layout(8, 2, 256, 1000, 2)
    shards = [shard_weights(weights, lay, head_dim=32) for lay in layouts]
    for name, w in weights.items():
        parts = [_dense(s[name]) for s in shards]
        if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: inputs
            assert torch.equal(torch.cat(parts, dim=1), _dense(w)), name
        elif name.endswith("norm.weight"):
            assert all(torch.equal(p, w) for p in parts), name
        else:  # column-parallel: outputs (the vocabulary for the embedding and LM head)
            assert torch.equal(torch.cat(parts), _dense(w)), name
    assert shards[1]["model.layers.0.self_attn.k_proj.weight"].shape == (32, 256)


def test_a_split_that_cuts_a_group_names_the_layer():
    from fastinfer.model.sharding import shard_weights

    weights = _checkpoint("int4")  # groups of 64 inputs
    layout = plan_layout(8, 2, 256, 1000, 4)[1]  # o_proj inputs [64, 128): on group boundaries
    assert shard_weights(weights, layout, head_dim=32)["model.layers.0.self_attn.o_proj.weight"].in_features == 64
    odd = plan_layout(12, 4, 256, 1000, 3)[1]  # q heads [3, 6) of 32 dims: inputs [96, 192)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight cannot be split .* at 96: "
                                          r"its groups are 64 inputs"):
        shard_weights({"model.layers.0.self_attn.o_proj.weight": pack(quantize_int4(torch.randn(64, 384), 64))},
                      odd, head_dim=32)


# ------------------------------------------------------------------ the model's TP forward
class _ThreadComm:
    """Two or more ranks as threads of this process: a collective waits for every rank, then
    each computes the same sum (in rank order) or concatenation. A test stand-in for a process
    group; the model's tensor-parallel code cannot tell the difference."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.size, self.shared = rank, shared["size"], shared

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        s = self.shared
        s["slots"][self.rank] = t.clone()
        s["barrier"].wait()
        values = list(s["slots"])
        s["barrier"].wait()  # every rank has read the slots before any writes the next ones
        return values

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return t.copy_(total)

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(t), dim=-1)


@pytest.mark.parametrize("heads, kv, size, tied, kind", [
    (8, 2, 2, False, None),     # KV heads split
    (8, 1, 2, True, None),      # one KV head, replicated; tied embeddings
    (12, 3, 2, False, None),    # whole groups dealt unevenly (as the default model's 9 / 3)
    (8, 2, 2, False, "int4"),
    (8, 2, 2, False, "int8"),
])
def test_tensor_parallel_logits_match_one_rank(heads, kv, size, tied, kind):
    """Each rank's model holds its share; the ranks run as threads with a stand-in
    communicator: the gathered logits equal one rank's within float32 reordering."""
    import threading

    from fastinfer.model.llama import LlamaForCausalLM
    from fastinfer.model.sharding import shard_weights

    cfg = tiny_config(heads, kv, tied)
    weights = checkpoint_for(cfg, kind)
    whole = LlamaForCausalLM(cfg)
    whole.load_weights(weights)
    prompts = PROMPTS
    want = prefill_logits(whole, kv, prompts)
    layouts = plan_layout(heads, kv, cfg.intermediate_size, cfg.vocab_size, size)
    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    got: list = [None] * size

    def rank(r: int) -> None:
        model = LlamaForCausalLM(cfg, layout=layouts[r], comm=_ThreadComm(r, shared))
        model.load_weights(shard_weights(weights, layouts[r], cfg.head_dim))
        got[r] = prefill_logits(model, layouts[r].num_kv_heads, prompts)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(g is not None for g in got), "a rank failed (see its traceback above)"
    for g in got:  # every rank gets the whole logits
        assert g.shape == want.shape
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[0].argmax(-1), want.argmax(-1))
