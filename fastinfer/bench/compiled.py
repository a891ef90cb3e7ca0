"""The ``torch.compile`` baseline of the GPU benchmark: a plain Llama forward written in torch
with a static KV cache (gpt-fast style) over a ``transformers`` model's weights, an eager
prefill of a left-padded static batch, then one compiled decode step per token
(``mode="reduce-overhead"``: CUDA graphs; on a CPU, inductor's default mode)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastinfer.bench.gpu_hardware import sync
from fastinfer.bench.systems import Progress, RequestRecord, SystemRun, _noop, timed_run


class _Layer(torch.nn.Module):
    """One decoder layer's buffers: fused qkv and gate/up weights, norms, static KV cache."""

    def __init__(self, layer, batch: int, nkv: int, max_seq: int, hd: int) -> None:
        super().__init__()
        a, f = layer.self_attn, layer.mlp
        w = a.q_proj.weight
        self.register_buffer("wqkv", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                             persistent=False)
        self.register_buffer("wo", a.o_proj.weight.detach(), persistent=False)
        self.register_buffer("wgu", torch.cat([f.gate_proj.weight, f.up_proj.weight]), persistent=False)
        self.register_buffer("wd", f.down_proj.weight.detach(), persistent=False)
        self.register_buffer("ln1", layer.input_layernorm.weight.detach(), persistent=False)
        self.register_buffer("ln2", layer.post_attention_layernorm.weight.detach(), persistent=False)
        self.register_buffer("k_cache", torch.zeros(batch, nkv, max_seq, hd, dtype=w.dtype, device=w.device),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros_like(self.k_cache), persistent=False)


class PlainLlama(torch.nn.Module):
    """A minimal Llama forward in plain torch (gpt-fast style) over a transformers model's
    weights: fused qkv and gate/up matrices, static KV cache ``[B, Hkv, S, D]`` per layer,
    rotate-half rotary from the model's own (scaled) frequencies, SDPA with a mask (left
    padding: row ``b``'s keys start at ``pad[b]``)."""

    @torch.no_grad()
    def __init__(self, hf, batch: int, max_seq: int) -> None:
        super().__init__()
        cfg, m = hf.config, hf.model
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.eps, self.batch, self.max_seq = cfg.rms_norm_eps, batch, max_seq
        w = m.embed_tokens.weight
        dev, dt = w.device, w.dtype
        self.register_buffer("embed", w.detach(), persistent=False)
        self.register_buffer("lm_head", hf.lm_head.weight.detach(), persistent=False)
        self.register_buffer("norm", m.norm.weight.detach(), persistent=False)
        self.layers = torch.nn.ModuleList(_Layer(L, batch, self.nkv, max_seq, self.hd) for L in m.layers)
        rot = m.rotary_emb
        inv = rot.inv_freq.to(device=dev, dtype=torch.float32)
        scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
        freqs = torch.outer(torch.arange(max_seq, device=dev, dtype=torch.float32), inv)
        self.register_buffer("cos", (freqs.cos() * scale).to(dt), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(dt), persistent=False)
        self.register_buffer("pad", torch.zeros(batch, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("kpos", torch.arange(max_seq, device=dev), persistent=False)
        self.eval()

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T]`` at cache positions ``input_pos [T]`` -> last position's logits
        ``[B, vocab]`` (float32)."""
        B, T = tokens.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        h = F.embedding(tokens, self.embed)
        pos = (input_pos[None, :] - self.pad[:, None]).clamp(min=0)  # rotary positions [B, T]
        cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]
        kp, qp = self.kpos[None, None, :], input_pos[None, :, None]
        # keys of the row's own tokens up to the query; a padded query sees only itself
        mask = ((kp <= qp) & (kp >= self.pad[:, None, None])) | (kp == qp)
        mask = mask[:, None]  # [B, 1, T, S]
        for L in self.layers:
            x = self.rms(h, L.ln1)
            q, k, v = F.linear(x, L.wqkv).split([nh * hd, nkv * hd, nkv * hd], -1)
            q = self.rope(q.view(B, T, nh, hd), cos, sin).transpose(1, 2)
            k = self.rope(k.view(B, T, nkv, hd), cos, sin).transpose(1, 2)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            L.k_cache.index_copy_(2, input_pos, k)
            L.v_cache.index_copy_(2, input_pos, v)
            o = F.scaled_dot_product_attention(q, L.k_cache, L.v_cache, attn_mask=mask, enable_gqa=nh != nkv)
            h = h + F.linear(o.transpose(1, 2).reshape(B, T, nh * hd), L.wo)
            gate, up = F.linear(self.rms(h, L.ln2), L.wgu).chunk(2, -1)
            h = h + F.linear(F.silu(gate) * up, L.wd)
        return F.linear(self.rms(h[:, -1], self.norm), self.lm_head).float()


def _decode_one(model: PlainLlama, cur: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    return model(cur[:, None], input_pos).argmax(-1)


@dataclass(slots=True)
class BatchResult:
    """One static batch: a record per real request (arrival, first token, finish, tokens),
    the prefill and decode times, and the generated token ids of the real rows."""

    records: list[RequestRecord]
    prefill_s: float
    decode_s: float
    tokens: list[list[int]]


class CompiledDecoder:
    """Greedy generation with :class:`PlainLlama`: eager prefill of a left-padded static batch,
    then one compiled decode step per token."""

    _compiled: dict = {}

    @classmethod
    def reset(cls) -> None:
        """Drops the compiled step and its CUDA graphs (their memory pools)."""
        if cls._compiled:
            cls._compiled.clear()
            torch._dynamo.reset()

    def __init__(self, model: PlainLlama, device: str | torch.device) -> None:
        self.model, self.device = model, torch.device(device)
        self.mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        key = (id(model), self.mode)
        if key not in CompiledDecoder._compiled:
            CompiledDecoder._compiled.clear()  # one model at a time
            CompiledDecoder._compiled[key] = torch.compile(_decode_one, mode=self.mode, fullgraph=True, dynamic=False)
        self.step = CompiledDecoder._compiled[key]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, width]`` (rows right-aligned) and each row's padding ``[B]``."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        return ids, torch.tensor([width - len(p) for p in prompts], dtype=torch.int64)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], new_tokens: list[int], arrival: float | None = None) -> BatchResult:
        """Request ``i`` generates ``new_tokens[i]`` tokens; the batch is padded to the model's
        batch size with copies of the first prompt (not counted)."""
        m, dev, real = self.model, self.device, len(prompts)
        prompts = list(prompts) + [prompts[0]] * (m.batch - real)
        lens = list(new_tokens) + [1] * (m.batch - real)
        ids, pad = self._left_padded(prompts)
        width, n = ids.shape[1], max(lens)
        if width + n > m.max_seq:
            raise ValueError(f"{width} + {n} tokens exceed the static cache ({m.max_seq})")
        arrival = time.monotonic() if arrival is None else arrival
        m.pad.copy_(pad)
        pos = torch.tensor([width - 1], dtype=torch.int64, device=dev)  # advanced on the device
        t0 = time.monotonic()
        cur = m(ids.to(dev), torch.arange(width, device=dev)).argmax(-1)
        out = torch.empty(m.batch, n, dtype=torch.int64, device=dev)
        out[:, 0] = cur
        sync(dev)
        t_first = time.monotonic()
        for i in range(1, n):
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            pos += 1  # the cache position of ``cur``
            nxt = self.step(m, cur, pos)
            out[:, i] = nxt
            cur = nxt.clone()
        sync(dev)
        t_end = time.monotonic()
        # tokens arrive at a steady rate after the first: a request of k tokens ends at step k
        per = (t_end - t_first) / max(n - 1, 1)
        records = [RequestRecord(arrival, t_first, t_first + (k - 1) * per, k) for k in lens[:real]]
        return BatchResult(records, t_first - t0, t_end - t_first, out[:real].tolist())


class CompiledBatchedSystem:
    """The compiled plain loop on static batches of the decoder's batch size (left padding);
    a batch runs until its longest request is done, and only each request's own tokens
    count (as ``TransformersBatchedSystem``)."""

    name = "torch-compile-batched"

    def __init__(self, decoder: CompiledDecoder) -> None:
        self.decoder = decoder

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Serves every request (all arriving now); ``progress(k)`` after each batch of k."""
        return timed_run(self.name, self.decoder.device, prompts, output_lens,
                         lambda ps, ns, arrival: self.decoder.generate(ps, ns, arrival).records, progress,
                         self.decoder.model.batch)
