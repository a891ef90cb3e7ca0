"""Native CPU kernels from the optional torch C++ extension ``fastinfer._C_cpu``.

The extension registers its ops under ``torch.ops.fastinfer_cpu``; this module loads it once
and wraps the ops with shape handling. The package imports fine without the extension:
:func:`available` then returns False and the wrappers raise :class:`RuntimeError`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from fastinfer._native import extension_built
from fastinfer.common import kv_format as kv
from fastinfer.common.metadata import AttentionMetadata, int64_tensor

from fastinfer.common.packed import PackedWeight

__all__ = ["DecoderPlan", "argmax", "argmax_applies", "available", "decoder_layers", "decoder_layers_applies", "decoder_model", "decoder_model_applies", "decoder_plan", "embedding_q", "embedding_q_applies", "isa", "linear_f32", "linear_q", "linear_q_applies", "paged_attention",
           "paged_attention_applies", "reshape_and_cache", "reshape_and_cache_applies", "rms_norm", "set_isa_cap",
           "add_rms_norm", "silu_and_mul", "rotary_embedding"]


ISA_ENV = "FASTINFER_CPU_ISA"  # caps the kernels' code path, e.g. to measure an AVX2 machine's on a newer one
ISA_CAPS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_vnni": 3}


def available() -> bool:
    """True when ``fastinfer._C_cpu`` is built (importing it registers ``torch.ops.fastinfer_cpu``).
    The first call applies ``FASTINFER_CPU_ISA`` (see :func:`set_isa_cap`) when it is set."""
    if not extension_built("_C_cpu"):
        return False
    _apply_isa_env()
    return True


@functools.lru_cache(maxsize=1)
def _apply_isa_env() -> None:
    value = os.environ.get(ISA_ENV)
    if value:
        set_isa_cap(value, source=ISA_ENV)


def set_isa_cap(cap: int | str, source: str = "cap") -> str:
    """Caps the code path of every native CPU kernel at ``cap`` (a name of :data:`ISA_CAPS` or its
    number; the CPU's own best path is the ceiling) and returns the path now in use. Results do
    not change bits with the path (each kernel's contract); only speed does. Raises ValueError
    for an unknown cap."""
    level = ISA_CAPS.get(cap) if isinstance(cap, str) else cap
    if not isinstance(level, int) or isinstance(level, bool) or level not in ISA_CAPS.values():
        raise ValueError(f"{source} must be one of {list(ISA_CAPS)} (or 0..3), got {cap!r}")
    name = torch.ops.fastinfer_cpu.set_isa_cap(level)
    _int8_inputs_fast.cache_clear()
    return name


def _require() -> None:
    if not available():
        raise RuntimeError(
            "fastinfer._C_cpu is not built: run `python setup.py build_ext --inplace` "
            "(or `pip install -e . --no-build-isolation`)"
        )


def isa() -> str:
    """Code path the kernels use on this CPU: ``"avx512_vnni"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    _require()
    return torch.ops.fastinfer_cpu.isa_name()


@functools.lru_cache(maxsize=1)
def _linear_op():
    """``torch.ops.fastinfer_cpu.linear_f32.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.linear_f32.default


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias`` in float32 on the CPU.

    Args:
        x: float32 CPU tensor ``[..., K]`` (any leading dims and strides; copied to a
            row-contiguous layout only when its last dim is strided), or bfloat16 with a bfloat16
            weight (then widened to float32, computed as float32 and rounded back to bfloat16).
        weight: float32 (or bfloat16) CPU tensor ``[N, K]`` (copied when its rows are not
            contiguous, so keep weights contiguous).
        bias: optional CPU tensor ``[N]`` in x's dtype.

    Returns:
        CPU tensor ``[..., N]`` in x's dtype (contiguous).

    Raises:
        TypeError: a dtype other than float32 (or bfloat16 x and weight). ValueError: mismatched shapes.
        RuntimeError: a non-CPU tensor, or the extension is not built.

    Each output element ``y[m, n]`` is reduced over K in an order that depends only on K (16
    FMA lanes over K in chunks of 16, then a fixed pairwise tree, then ``+ bias[n]``): the
    result for a row is bit-identical whatever the other rows in the batch, the row's
    position, the thread count or the SIMD path (AVX-512, AVX2, scalar). No autograd.
    """
    op = _linear_op()
    if weight.dim() == 2 and weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.dim() == 1 and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:  # widened, computed in float32
        b = bias.float() if bias is not None else None
        return linear_f32(x.float(), weight, b).to(torch.bfloat16)
    if x.dim() == 2 and x.stride(1) == 1:
        return op(x, weight, bias)  # the hot path: the op checks dtypes, shapes and devices
    if x.dim() < 1:
        raise ValueError(f"linear_f32: x must be a tensor of shape [..., K], got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = op(x2, weight, bias)
    return y.view(*lead, y.shape[1])


_KIND_INDEX = {"u4": 0, "s8": 1, "e4m3": 2}
_LINEAR_Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _int8_inputs_fast() -> bool:
    """True when the code path in use has SIMD tiles for int8 inputs (AVX2 and up: VNNI dot
    products, or AVX2's byte multiply-adds). On the scalar path the default quantized linear
    keeps float inputs, which it computes faster there."""
    return isa() != "scalar"


@functools.lru_cache(maxsize=1)
def _linear_q_op():
    """``torch.ops.fastinfer_cpu.linear_q.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.linear_q.default


def linear_q_applies(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> bool:
    """True when :func:`linear_q` takes these inputs: x and the weight are on the CPU, x is
    float32, bfloat16 or float16, and the weight's groups are whole multiples of the kernel's
    chunk (32 inputs for u4, 16 otherwise)."""
    return x.is_cpu and x.dtype in _LINEAR_Q_DTYPES and weight.tensors[0].is_cpu and weight.native_applies()


def linear_q(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
             quantize_inputs: bool | None = None) -> torch.Tensor:
    """Batch-invariant ``x @ dequantize(weight).T + bias`` on the CPU.

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16 CPU tensor (computed in float32; the result
            is cast back to x's dtype).
        weight: a :class:`PackedWeight` whose groups are multiples of 32 (u4) or 16 inputs.
        bias: optional ``[N]`` tensor.
        quantize_inputs: (default: ``weight.quantize_inputs``, True unless changed, on a CPU
            with AVX2 or better; float inputs on the scalar path) for integer
            codes (u4, s8) and K a multiple of 32, quantize each row's
            inputs to int8 per block of 32 (scale ``max|x| / 127``), as llama.cpp does, and
            compute exact int8 dot products (AVX-512 VNNI, or AVX2 byte multiply-adds, else a scalar
            path with the same bits). Otherwise (and for fp8) each weight is formed as
            ``fma(code, scale, offset)`` in float32 and reduced in the float32 linear's order.

    Either way every output is reduced in an order fixed by K: a row's result is bit-identical
    whatever the rest of the batch, the thread count and the SIMD path (the two modes differ
    from each other by the inputs' quantization error, at most ``dx / 2`` per input).
    """
    op = _linear_q_op()
    codes, scales, offsets = weight.tensors
    if quantize_inputs is None:
        quantize_inputs = weight.quantize_inputs and _int8_inputs_fast()
    if x.dim() == 2 and x.dtype == torch.float32 and bias is None and x.stride(1) == 1:  # the decode hot path
        return op(x, codes, scales, offsets, _KIND_INDEX[weight.kind], weight.group_size, None, quantize_inputs)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y = op(x2, codes, scales, offsets, _KIND_INDEX[weight.kind], weight.group_size, b, quantize_inputs)
    y = y.view(*lead, y.shape[1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.lru_cache(maxsize=1)
def _embedding_q_op():
    """``torch.ops.fastinfer_cpu.embedding_q.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.embedding_q.default


def embedding_q_applies(token_ids: torch.Tensor, weight: PackedWeight) -> bool:
    """True when :func:`embedding_q` takes these inputs: int64 ids and the weight on the CPU,
    groups the native kernels take."""
    return (token_ids.is_cpu and token_ids.dtype == torch.int64 and weight.native_applies()
            and all(t is None or t.is_cpu for t in weight.tensors))


def embedding_q(token_ids: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """Rows ``token_ids [T]`` of a packed table, dequantized to float32 ``[T, K]``: bit for bit
    ``weight.dequantize(rows=token_ids)`` (each value ``code * scale``, then ``+ offset``), in
    one call where the reference's index_selects and elementwise ops cost ~50-100 us a decode
    step. Raises IndexError for an id outside the table."""
    codes, scales, offsets = weight.tensors
    ids = token_ids.reshape(-1)
    out = _embedding_q_op()(ids, codes, scales, offsets, _KIND_INDEX[weight.kind], weight.group_size)
    return out if token_ids.dim() == 1 else out.view(*token_ids.shape, out.shape[1])


@functools.lru_cache(maxsize=1)
def _paged_attention_op():
    """``torch.ops.fastinfer_cpu.paged_attention.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.paged_attention.default


_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)


def _cache_dtype_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         k_scale: torch.Tensor | None) -> bool:
    """The caches hold q's dtype, or int8 / fp8 codes with their scales."""
    if kv.is_quantized(k_cache.dtype):
        return v_cache.dtype == k_cache.dtype and k_scale is not None
    return k_cache.dtype == q.dtype and v_cache.dtype == q.dtype


def paged_attention_applies(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> bool:
    """True when :func:`paged_attention` takes these inputs: the extension is built, all
    tensors are on the CPU, q is float32 or bfloat16 ``[T, H, D]`` with D a multiple of 16 up
    to 256, and the caches are contiguous ``[num_blocks, block_size, Hkv, D]`` in q's dtype or
    quantized (int8 / float8_e4m3fn with float32 scales)."""
    return (
        q.is_cpu and q.dtype in _ATTENTION_DTYPES
        and _cache_dtype_applies(q, k_cache, v_cache, k_scale) and k_cache.is_cpu and v_cache.is_cpu
        and q.dim() == 3 and k_cache.dim() == 4 and q.shape[2] % 16 == 0 and 16 <= q.shape[2] <= 256
        and k_cache.shape[3] == q.shape[2] and k_cache.is_contiguous() and v_cache.is_contiguous()
    )


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over the paged KV cache (same contract as
    :func:`fastinfer.ops.reference.paged_attention`), batch-invariant.

    Args:
        q: ``[T, H, D]`` float32 or bfloat16 CPU tensor, any strides (copied only when its last
            dim is strided). D: a multiple of 16.
        k_cache, v_cache: contiguous ``[num_blocks, block_size, Hkv, D]`` in q's dtype, or int8 /
            float8_e4m3fn codes read as ``float(code) * scale`` (``fastinfer.common.kv_format``);
            ``H % Hkv == 0`` (query head h reads kv head ``h // (H // Hkv)``).
        k_scale, v_scale: float32 ``[num_blocks, block_size, Hkv]``, for quantized caches.
        meta: ``query_start_loc`` (B+1 ints), ``context_lens`` (B ints) and ``block_tables``
            (``[B, W]`` int32/int64) of the batch; sequence i's queries are the last
            ``query_start_loc[i+1] - query_start_loc[i]`` of its ``context_lens[i]`` tokens.
        scale: softmax scale (usually ``D ** -0.5``).

    Returns:
        ``[T, H, D]`` contiguous, q's dtype. Computed in float32 with an online softmax over
        key tiles of 16 at fixed positions: every (query, head) row is reduced in an order
        that depends only on its position and D, so a sequence's output is bit-identical
        whatever else is in the batch, its place in it, how its queries are chunked and the
        thread count. Slots past ``context_lens[i]`` are never read.

    Raises:
        TypeError: wrong dtypes. ValueError: inconsistent shapes, lengths or block ids.
        RuntimeError: a non-CPU tensor, or the extension is not built.
    """
    op = _paged_attention_op()
    if q.dim() == 3 and q.stride(2) != 1:
        q = q.contiguous()
    qsl, ctx = meta.query_start_loc_tensor, meta.context_lens_tensor
    if qsl.device.type != "cpu":
        qsl, ctx = int64_tensor(meta.query_start_loc), int64_tensor(meta.context_lens)
    if k_scale is None:
        return op(q, k_cache, v_cache, meta.block_tables, qsl, ctx, float(scale))
    return op(q, k_cache, v_cache, meta.block_tables, qsl, ctx, float(scale), k_scale, v_scale)


_CACHE_WRITE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reshape_and_cache_applies(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> bool:
    """True when :func:`reshape_and_cache` takes these inputs: CPU tensors, key/value float32,
    bfloat16 or float16 with a contiguous last dim, caches float32, bfloat16 or quantized."""
    return (
        key.is_cpu and k_cache.is_cpu and key.dtype in _CACHE_WRITE_DTYPES and value.dtype in _CACHE_WRITE_DTYPES
        and kv.is_quantized(k_cache.dtype) == (k_scale is not None)
        and (k_cache.dtype in _ATTENTION_DTYPES or kv.is_quantized(k_cache.dtype)) and v_cache.dtype == k_cache.dtype
        and key.dim() == 3 and value.dim() == 3 and key.stride(-1) == 1 and value.stride(-1) == 1
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Writes ``key/value [T, Hkv, D]`` into the caches at ``slot_mapping [T]`` (int64), as
    :func:`fastinfer.ops.reference.reshape_and_cache` does, bit for bit: a cast for float
    caches, per (token, head) quantization for int8 / fp8 ones (scales into ``k_scale``,
    ``v_scale``)."""
    _require()
    torch.ops.fastinfer_cpu.reshape_and_cache.default(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# ---------------------------------------------------------------- per-token ops of a layer
# These run ~10 times per layer and decode step, so their wrappers take the shortest path:
# the ops resolved once, 2-D inputs passed straight through (the C++ checks them).
_ROW_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _row_ops():
    """``(rms_norm, add_rms_norm, silu_and_mul, rotary_embedding_)`` overloads, resolved once."""
    _require()
    ns = torch.ops.fastinfer_cpu
    return ns.rms_norm.default, ns.add_rms_norm.default, ns.silu_and_mul.default, ns.rotary_embedding_.default


def _rows_apply(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype in _ROW_DTYPES and x.dim() >= 1


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1):
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[-1] <= 1 or x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_applies(x, weight, eps) -> bool:
    """float32 / bfloat16 CPU rows, the weight in x's dtype."""
    return _rows_apply(x) and weight.dtype == x.dtype and weight.is_cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row (the reference's math; the sum of squares in 16 lanes and a fixed
    tree, so a row's result never depends on the batch)."""
    y = _row_ops()[0](_as_rows(x), weight, eps)
    return y if x.dim() == 2 else y.view(x.shape)


def add_rms_norm_applies(x, residual, weight, eps) -> bool:
    return rms_norm_applies(x, weight, eps) and residual.dtype == x.dtype and residual.shape == x.shape


def add_rms_norm(x, residual, weight, eps):
    """``r = x + residual`` rounded to x's dtype, then ``(rms_norm(r), r)``, in one pass."""
    y, r = _row_ops()[1](_as_rows(x), _as_rows(residual), weight, eps)
    return (y, r) if x.dim() == 2 else (y.view(x.shape), r.view(x.shape))


def silu_and_mul_applies(x) -> bool:
    return _rows_apply(x) and x.shape[-1] % 2 == 0


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` per row."""
    y = _row_ops()[2](_as_rows(x))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=1)
def _argmax_op():
    _require()
    return torch.ops.fastinfer_cpu.argmax_rows.default


def argmax_applies(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of float32 rows ``[M, V]``, the same index (the first maximum; NaN counts
    as the greatest, the first NaN wins) in a few us where torch's takes ~50 us for V = 49,152."""
    return _argmax_op()(x)


def rotary_embedding_applies(positions, q, k, cos_sin) -> bool:
    return (q.is_cpu and q.dtype in _ROW_DTYPES and k.dtype in _ROW_DTYPES and q.dim() == 3 and k.dim() == 3
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.dtype == torch.float32
            and positions.dtype == torch.int64)


def rotary_embedding(positions, q, k, cos_sin):
    """Rotates ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place (the reference's products and
    sums, in its order); returns ``(q, k)``."""
    _row_ops()[3](positions if positions.is_contiguous() else positions.contiguous(), q, k, cos_sin)
    return q, k


# ---------------------------------------------------------------- a decoder's layers in one call
# Python's loop over layers costs ~100 us of interpreter and dispatch time per layer and step
# (module calls, op selection, wrappers): a third of a small model's decode step. The native
# decoder_layers op runs the same kernels in the same order for every layer in one call.


@dataclass(frozen=True, slots=True)
class DecoderPlan:
    """A Llama-family decoder's layer tensors, flattened for the native ``decoder_layers`` op.

    Per layer: ``norms`` holds the input and post-attention norm weights; the four linears
    (qkv, o, gate_up, down) each contribute one entry to ``weights`` (a dense weight, or a
    packed weight's codes), ``scales``, ``offsets``, ``biases`` (None where absent), ``kinds``
    (-1 dense, else the packed code kind) and ``group_sizes``. ``packed`` keeps the packed
    weights (None for dense ones) so that their ``quantize_inputs`` flags are read at each call.
    ``embed`` (the token table: a dense tensor or a :class:`PackedWeight`) and ``final_norm``
    (the last norm's weight) are set, together, where the native op can also run the model's
    embedding lookup and final norm (:func:`decoder_model`).
    """

    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    attn_scale: float
    cos_sin: torch.Tensor
    norms: list
    weights: list
    scales: list
    offsets: list
    biases: list
    kinds: list
    group_sizes: list
    packed: list
    embed: torch.Tensor | PackedWeight | None = None
    final_norm: torch.Tensor | None = None


@functools.lru_cache(maxsize=1)
def _decoder_op():
    """``torch.ops.fastinfer_cpu.decoder_layers.default``, resolved once."""
    _require()
    return torch.ops.fastinfer_cpu.decoder_layers.default


def decoder_plan(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 attn_scale: float, cos_sin: torch.Tensor, norms: list, linears: list,
                 embed: torch.Tensor | PackedWeight | None = None,
                 final_norm: torch.Tensor | None = None) -> DecoderPlan | None:
    """The plan for layers whose ``norms`` (two per layer) and ``linears`` (``(weight, bias)``
    four per layer: qkv, o, gate_up, down) are given, or None when a piece is not one the native
    kernels take (then the layers run one op at a time): every tensor on the CPU, the model in
    float32 or bfloat16, dense weights contiguous in the model's dtype, packed weights that
    :func:`linear_q` takes, and a head dim the attention kernel takes (a multiple of 16 up to 256).
    ``embed`` and ``final_norm`` (the model's token table and last norm weight) enter the plan
    where the native op takes them too (a table in the model's dtype, or packed with groups the
    native kernels take; the norm like the layers')."""
    if (not available() or dtype not in _ROW_DTYPES or head_dim % 16
            or not 16 <= head_dim <= 256 or cos_sin.dtype != torch.float32 or not cos_sin.is_cpu
            or not cos_sin.is_contiguous() or cos_sin.shape[1] != head_dim):
        return None
    if not all(_norm_applies(n, dtype) for n in norms):
        return None
    weights, scales, offsets, biases, kinds, groups, packed = [], [], [], [], [], [], []
    for weight, bias in linears:
        if bias is not None and (not bias.is_cpu or bias.dim() != 1 or not bias.is_contiguous()):
            return None
        if isinstance(weight, PackedWeight):
            codes, s, o = weight.tensors
            if not codes.is_cpu or not weight.native_applies():
                return None
            weights.append(codes), scales.append(s), offsets.append(o), kinds.append(_KIND_INDEX[weight.kind])
            groups.append(weight.group_size), packed.append(weight)
        else:
            if weight.dtype != dtype or not weight.is_cpu or not weight.is_contiguous():
                return None
            if bias is not None and bias.dtype != dtype:
                return None
            weights.append(weight), scales.append(None), offsets.append(None), kinds.append(-1)
            groups.append(0), packed.append(None)
        biases.append(bias)
    whole = embed is not None and final_norm is not None and _norm_applies(final_norm, dtype) and (
        all(t is None or t.is_cpu for t in embed.tensors) and embed.native_applies() if isinstance(embed, PackedWeight)
        else embed.dtype == dtype and embed.is_cpu and embed.dim() == 2 and embed.is_contiguous())
    return DecoderPlan(dtype, num_heads, num_kv_heads, head_dim, float(eps), float(attn_scale), cos_sin,
                       list(norms), weights, scales, offsets, biases, kinds, groups, packed,
                       embed if whole else None, final_norm if whole else None)


def _norm_applies(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    return weight.dtype == dtype and weight.is_cpu and weight.is_contiguous()


def decoder_layers_applies(layers, plan: DecoderPlan | None, positions, h, residual, kv_caches, meta) -> bool:
    """True when the native op takes this call: a plan, h ``[T, hidden]`` on the CPU in the
    plan's dtype (residual too, if given), int64 positions, and caches in the model's dtype or
    quantized with their scales, as the per-layer kernels require."""
    if plan is None or not h.is_cpu or h.dtype != plan.dtype or h.dim() != 2 or positions.dtype != torch.int64:
        return False
    if residual is not None and (residual.dtype != h.dtype or residual.shape != h.shape):
        return False
    return _caches_apply(plan, h, kv_caches)


def _caches_apply(plan: DecoderPlan, h: torch.Tensor, kv_caches) -> bool:
    """One CPU cache per layer, contiguous ``[blocks, block_size, Hkv, D]``, in h's dtype or quantized."""
    first = kv_caches[0]
    return (len(kv_caches) * 4 == len(plan.weights) and first.k.is_cpu
            and _cache_dtype_applies(h, first.k, first.v, first.k_scale)
            and first.k.is_contiguous() and first.v.is_contiguous() and first.k.dim() == 4)


def decoder_model_applies(model, plan: DecoderPlan | None, token_ids, positions, kv_caches, meta) -> bool:
    """True when the native op takes the whole model's call: a plan with the embedding and final
    norm, int64 token ids ``[T]`` and positions on the CPU, and caches as for :func:`decoder_layers`."""
    if plan is None or plan.final_norm is None or not token_ids.is_cpu or token_ids.dtype != torch.int64:
        return False
    return token_ids.dim() == 1 and positions.dtype == torch.int64 and _caches_apply(plan, plan.final_norm, kv_caches)


def decoder_layers(layers, plan: DecoderPlan, positions, h, residual, kv_caches, meta, whole: bool = False):
    """The layers' ``(h, residual)`` from one native call: bit-identical to running them one op
    at a time with the native kernels (:func:`fastinfer.ops.reference.decoder_layers`). With
    ``whole``, ``h`` holds the token ids, and the call also looks up their embedding rows first
    and applies the final norm last (:func:`decoder_model`)."""
    fast = _int8_inputs_fast()
    qi = [int(p is not None and p.quantize_inputs and fast) for p in plan.packed]
    qsl, ctx = meta.query_start_loc_tensor, meta.context_lens_tensor
    if qsl.device.type != "cpu":
        qsl, ctx = int64_tensor(meta.query_start_loc), int64_tensor(meta.context_lens)
    return _decoder_op()(
        h, residual, positions if positions.is_contiguous() else positions.contiguous(), plan.cos_sin,
        meta.slot_mapping, meta.block_tables, qsl, ctx, plan.attn_scale, plan.num_heads, plan.num_kv_heads,
        plan.head_dim, plan.eps, plan.norms, plan.weights, plan.scales, plan.offsets, plan.biases, plan.kinds,
        plan.group_sizes, qi, [c.k for c in kv_caches], [c.v for c in kv_caches],
        [c.k_scale for c in kv_caches], [c.v_scale for c in kv_caches], *(_embed_args(plan) if whole else ()))


def _embed_args(plan: DecoderPlan) -> tuple:
    """The native op's embedding and final-norm arguments for ``plan``."""
    e = plan.embed
    if isinstance(e, PackedWeight):
        codes, s, o = e.tensors
        return codes, s, o, _KIND_INDEX[e.kind], e.group_size, plan.final_norm
    return e, None, None, -1, 0, plan.final_norm


def decoder_model(model, plan: DecoderPlan, token_ids, positions, kv_caches, meta) -> torch.Tensor:
    """The final hidden states ``[T, hidden]`` of the model's embedding, layers and final norm in
    one native call: bit-identical to :func:`fastinfer.ops.reference.decoder_model` run on the
    native kernels. A decode step's Python-level ops around the layers (the lookup, the norm)
    cost 50-150 us each, their objects evicted by the step's weight stream."""
    return decoder_layers(None, plan, positions, token_ids, None, kv_caches, meta, whole=True)[0]


def _f32_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias=None) -> bool:
    return x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)


def register_ops(register) -> None:
    """Registers this backend's ops with ``register(op, backend, fn, applies)`` (the dispatch
    point's) where the extension is built. Every kernel here reduces in a fixed order per
    output, so each is batch-invariant like the reference."""
    if not available():
        return
    # The native linear's fixed reduction order per output element keeps results independent of
    # the batch (BUILD_NOTES.md, Numerics; oneDNN's bfloat16 matmul changes rows with the batch
    # from M = 128 at K = 1536): the default float32 and bfloat16 CPU path.
    register("linear", "cpu_native", linear_f32, _f32_linear_applies)
    register("paged_attention", "cpu_native", paged_attention, paged_attention_applies)
    # int8 inputs and exact int8 dot products (VNNI), or weights dequantized in registers.
    register("quantized_linear", "cpu_native", linear_q, linear_q_applies)
    register("quantized_embedding", "cpu_native", embedding_q, embedding_q_applies)
    register("argmax", "cpu_native", argmax, argmax_applies)
    # Row-wise, a fixed order per row.
    for fn, applies in ((rms_norm, rms_norm_applies), (add_rms_norm, add_rms_norm_applies),
                        (silu_and_mul, silu_and_mul_applies), (rotary_embedding, rotary_embedding_applies)):
        register(fn.__name__, "cpu_native", fn, applies)
    # Same casts and per-row quantization as the reference, bit for bit.
    register("reshape_and_cache", "cpu_native", reshape_and_cache, reshape_and_cache_applies)
    # The layers' native kernels in one call: the same results as the reference's layer loop
    # over the ops above, without ~100 us of Python per layer.
    register("decoder_layers", "cpu_native", decoder_layers, decoder_layers_applies, fused=True)
    register("decoder_model", "cpu_native", decoder_model, decoder_model_applies, fused=True)
