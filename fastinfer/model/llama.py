"""The Llama family (Llama, Mistral, Qwen2): a decoder of pre-norm blocks over a paged cache.

The model knows nothing of requests: it takes a packed batch (token ids, positions), the
per-layer cache tensors and one ``AttentionMetadata`` shared by all layers.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastinfer import ops
from fastinfer.distributed.comm import SINGLE, Communicator
from fastinfer.distributed.layout import TPLayout
from fastinfer.layers.attention import Attention
from fastinfer.layers.embedding import Embedding
from fastinfer.common.packed import WeightsVersion, share_version
from fastinfer.layers.mlp import GatedMLP
from fastinfer.layers.linear import TracksWeights
from fastinfer.layers.norm import RMSNorm
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.model.config import ModelConfig
from fastinfer.common.kv_format import CacheLayer
from fastinfer.common.metadata import AttentionMetadata


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``; each residual add is fused with the
    norm after it, so a layer takes and returns ``(h, residual)`` with ``x = h + residual``."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype,
                 comm: Communicator = SINGLE) -> None:
        super().__init__()
        self.comm = comm  # tensor parallelism: o_proj's and down's outputs are partial sums
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   rotary, cfg.attention_bias, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype)

    def forward(self, positions, h, residual, kv_cache, meta: AttentionMetadata):
        if residual is None:  # the first layer: h is the embedding
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.comm.all_reduce_(self.self_attn(positions, h, kv_cache, meta))
        h, residual = self.post_attention_layernorm(h, residual)
        return self.comm.all_reduce_(self.mlp(h)), residual


def _hook_dicts(modules) -> list[dict]:
    """The dicts that hold ``modules``' forward (pre-)hooks: ``register_forward_hook`` and
    ``register_forward_pre_hook`` add to them (and removing a handle deletes from them) in place."""
    return [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]


def _hooked(hook_dicts: list[dict]) -> bool:
    """True when a forward (pre-)hook is registered globally or in one of ``hook_dicts`` (from
    :func:`_hook_dicts`; one C-level truth test per dict, ~5 us for a 30-layer model where a
    Python loop over its 273 modules took 30-150 us of every decode step)."""
    g = torch.nn.modules.module
    if getattr(g, "_global_forward_hooks", None) or getattr(g, "_global_forward_pre_hooks", None):
        return True
    return any(hook_dicts)


class LlamaForCausalLM(nn.Module):
    """Embedding, ``num_layers`` decoder layers, final norm and the LM head (maybe tied).

    Under tensor parallelism (``layout`` of this rank, and its group's ``comm``) the model holds
    the rank's share (see :mod:`fastinfer.distributed.layout`; load it with weights cut by
    ``fastinfer.model.sharding.shard_weights``): ``config`` stays the whole model's, ``local``
    gives the rank's sizes, the embedding and the LM head hold the rank's vocabulary range, and
    the layers run module by module with an all-reduce after attention and after the MLP. The
    logits come out whole on every rank."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, layout: TPLayout | None = None,
                 comm: Communicator = SINGLE) -> None:
        super().__init__()
        self.config, self.comm = cfg, comm
        self.vocab_start = layout.vocab[0] if layout is not None else 0
        self.local = cfg if layout is None else dataclasses.replace(
            cfg, num_heads=layout.num_q_heads, num_kv_heads=layout.num_kv_heads,
            intermediate_size=layout.intermediate[1] - layout.intermediate[0],
            vocab_size=layout.vocab[1] - layout.vocab[0])
        local = self.local
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = Embedding(local.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(local, rotary, dtype, comm) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head_weight = (self.embed_tokens.weight if cfg.tie_word_embeddings else
                               nn.Parameter(torch.empty(local.vocab_size, cfg.hidden_size, dtype=dtype),
                                            requires_grad=False))
        # False runs the layers module by module, and the embedding and final norm as modules (as
        # forward hooks on them do, which is also detected at each step).
        self.fused_layers = True
        self._plan, self._plan_key = None, None
        # Bumped whenever a weight of a layer, the embedding or the final norm is replaced or
        # moved: the plan is then rebuilt.
        self.weights_version = WeightsVersion()
        # Forward hooks on a layer or its modules need the module loop, hooks on the embedding or
        # the final norm their modules: checked at each step.
        self._hook_dicts: list[dict] = []
        self.track_weights()

    def track_weights(self) -> None:
        """Shares the model's :class:`WeightsVersion` with every module of its layers, the
        embedding and the final norm, and bumps it. Replacing a weight needs no call; putting a
        new module in place of a layer's does (it tracks its weights from then on)."""
        modules = list(self.layers.modules())
        self._hook_dicts = _hook_dicts(modules)
        for module in (*modules, self.embed_tokens, self.norm):
            if isinstance(module, TracksWeights):
                share_version(module, self.weights_version)
        self.weights_version.bump()

    def decoder_plan(self):
        """The layers' weights as :func:`fastinfer.ops.decoder_layers`' fused backends take
        them (None: none does, or ``fused_layers`` is False), with the token table and the final
        norm's weight where :func:`fastinfer.ops.decoder_model` can run them too (the model's own
        ``Embedding`` and ``RMSNorm`` classes, the layers' eps). Rebuilt when a weight is replaced,
        moved or cast (``weights_version``), the embedding or final norm module is replaced, or
        the rotary table is."""
        if not self.fused_layers or self.comm.size > 1 or _hooked(self._hook_dicts):
            return None  # tensor parallelism runs the module path (its all-reduces are there)
        norm, embed = self.norm, self.embed_tokens
        key = (self.weights_version.value, id(norm), id(embed),
               self.layers[0].self_attn.rotary.cos_sin.data_ptr() if len(self.layers) else 0)
        if self._plan_key != key:
            cfg, attn = self.config, self.layers[0].self_attn if len(self.layers) else None
            norms, linears = [], []
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                linears += [(lin.weight, lin.bias) for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)]
            # the embedding and final norm join the native call only as the classes it imitates
            whole = (type(norm) is RMSNorm and type(embed) is Embedding and norm.eps == cfg.rms_norm_eps
                     and embed.dtype == norm.weight.dtype)
            self._plan = None if attn is None else ops.decoder_plan(
                norm.weight.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
                attn.scale, attn.rotary.cos_sin, norms, linears, embed.weight if whole else None,
                norm.weight if whole else None)
            self._plan_key = key
        return self._plan

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[CacheLayer], meta: AttentionMetadata) -> torch.Tensor:
        """``token_ids, positions [T]`` -> final hidden states ``[T, hidden]``: one native call on
        the CPU, else :meth:`forward_parts`."""
        plan = self.decoder_plan()
        if plan is not None and _hooked(_hook_dicts((self.embed_tokens, self.norm))):
            plan = None  # hooks on the embedding or the final norm: they run as modules
        return ops.decoder_model(self, plan, token_ids, positions, kv_caches, meta)

    def forward_parts(self, token_ids: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[CacheLayer], meta: AttentionMetadata) -> torch.Tensor:
        """:meth:`forward` part by part: the embedding, the layers (:func:`fastinfer.ops.decoder_layers`)
        and the final norm, each through its own op."""
        h = self._embed(token_ids)
        h, residual = ops.decoder_layers(self.layers, self.decoder_plan(), positions, h, None, kv_caches, meta)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows; vocab-parallel, each rank looks up the ids of its range (the
        others' rows are zeros) and the ranks' rows are summed."""
        if self.comm.size == 1:
            return self.embed_tokens(token_ids)
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.local.vocab_size)
        h = self.embed_tokens(torch.where(inside, local, 0))
        return self.comm.all_reduce_(h * inside.unsqueeze(1).to(h.dtype))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [B, hidden]`` -> ``logits [B, vocab]`` in float32 (vocab-parallel: each
        rank's range, gathered)."""
        return self.comm.gather_last(ops.linear(hidden, self.lm_head_weight).float())

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Loads Hugging Face-named weights (``model.layers.N.self_attn.q_proj.weight`` ...),
        fusing q/k/v and gate/up. Missing or unexpected weights raise ``ValueError``."""
        from fastinfer.model.weights import load_llama_weights
        load_llama_weights(self, weights)
