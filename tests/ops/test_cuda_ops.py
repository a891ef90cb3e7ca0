"""CUDA kernels (``fastinfer._C_cuda``): they compile wherever the toolchain exists; their argument
checks run on the CPU (the ops are registered for CPU tensors too, which reach the checks and
get "... must be a CUDA tensor"); on a GPU they match the reference.

GPU tests (``-m gpu``): ``paged_decode_attention`` is compared with
:func:`fastinfer.ops.reference.paged_attention` computed in float64 on the same (upcast) inputs.
Tolerances (atol = rtol): float32 1e-5, float16 2e-3, bfloat16 2e-2 (the kernel reads the
inputs exactly, accumulates in float32 and rounds the output once, so float16 / bfloat16 are
within about half an ulp of the output). The cache write is compared bit for bit.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastinfer.ops import reference
from fastinfer.ops.backends import cuda_native
from fastinfer.common.metadata import AttentionMetadata

TOOLCHAIN = bool(torch.version.cuda) and shutil.which("nvcc") is not None and os.path.isdir(
    os.environ.get("CUDA_HOME", "/usr/local/cuda"))

needs_build = pytest.mark.skipif(not cuda_native.built(), reason="fastinfer._C_cuda is not built")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not TOOLCHAIN or os.environ.get("FASTINFER_BUILD_CUDA") == "0",
                    reason="no CUDA build of torch or no nvcc here")
def test_cuda_extension_was_built():
    assert cuda_native.built(), "fastinfer._C_cuda should have been compiled where nvcc and CUDA torch exist"


# ---------------------------------------------------------------------------------------------
# Argument checks (CPU tensors reach them: no GPU needed)
# ---------------------------------------------------------------------------------------------

def _cache_args(T=5, nb=4, bs=16, hkv=2, d=64, dtype=torch.float32):
    key = torch.randn(T, hkv, d, dtype=dtype)
    value = torch.randn(T, hkv, d, dtype=dtype)
    k_cache = torch.zeros(nb, bs, hkv, d, dtype=dtype)
    v_cache = torch.zeros(nb, bs, hkv, d, dtype=dtype)
    slots = torch.arange(T, dtype=torch.int64)
    return dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)


def _write(a, check_slots=True):
    torch.ops.fastinfer_cuda.reshape_and_cache(a["key"], a["value"], a["k_cache"], a["v_cache"],
                                               a["slot_mapping"], check_slots)


@needs_build
@pytest.mark.parametrize("change, match", [
    ({}, r"key must be a CUDA tensor"),
    ({"key": torch.randn(5, 2, 64, dtype=torch.float16)}, r"key dtype must equal the cache dtype"),
    ({"value": torch.randn(5, 2, 64, dtype=torch.bfloat16)}, r"value dtype must equal the cache dtype"),
    ({"v_cache": torch.zeros(4, 16, 2, 64, dtype=torch.float16)}, r"v_cache dtype must equal k_cache dtype"),
    ({"v_cache": torch.zeros(4, 16, 2, 32)}, r"v_cache must have the shape of k_cache"),
    ({"k_cache": torch.zeros(4, 16, 128)}, r"k_cache must be 4-D"),
    ({"k_cache": torch.zeros(4, 2, 16, 64).transpose(1, 2)}, r"k_cache must be contiguous"),
    ({"key": torch.randn(5, 3, 64)}, r"key\.size\(1\) \(num_kv_heads\) must equal .*k_cache\.size\(2\) = 2, got 3"),
    ({"value": torch.randn(5, 2, 32)}, r"value\.size\(2\) \(head_dim\) must equal .*k_cache\.size\(3\) = 64, got 32"),
    # the old check compared only Hkv * D: 4 * 32 == 2 * 64 must now be refused
    ({"key": torch.randn(5, 4, 32)}, r"key\.size\(1\) \(num_kv_heads\)"),
    ({"key": torch.randn(6, 2, 64)}, r"key\.size\(0\) \(num_tokens\) must equal slot_mapping\.size\(0\) = 5, got 6"),
    ({"key": torch.randn(5, 128)}, r"key must be 3-D"),
    ({"key": torch.randn(5, 64, 2).transpose(1, 2)}, r"key must be contiguous in its last dim"),
    ({"slot_mapping": torch.arange(5, dtype=torch.int32)}, r"slot_mapping must be int64, got Int"),
    ({"slot_mapping": torch.arange(5).view(5, 1)}, r"slot_mapping must be 1-D"),
])
def test_reshape_and_cache_argument_errors(change, match):
    a = _cache_args()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _write(a)


@needs_build
def test_reshape_and_cache_wrapper_checks_on_cpu():
    a = _cache_args()
    with pytest.raises(RuntimeError, match=r"key must be a CUDA tensor"):
        cuda_native.reshape_and_cache(**a)
    with pytest.raises(ValueError, match=r"k_scale"):
        cuda_native.reshape_and_cache(**a, k_scale=torch.ones(1))


def _attn_args(B=3, H=4, hkv=2, d=64, nb=6, bs=16, W=3, dtype=torch.float32):
    return dict(
        q=torch.randn(B, H, d, dtype=dtype), k_cache=torch.randn(nb, bs, hkv, d, dtype=dtype),
        v_cache=torch.randn(nb, bs, hkv, d, dtype=dtype), block_tables=torch.zeros(B, W, dtype=torch.int64),
        context_lens=torch.tensor([1, 17, 0]), scale=0.125)


def _attend(a):
    return torch.ops.fastinfer_cuda.paged_decode_attention(a["q"], a["k_cache"], a["v_cache"], a["block_tables"],
                                                           a["context_lens"], a["scale"])


@needs_build
@pytest.mark.parametrize("change, match", [
    ({}, r"q must be a CUDA tensor"),
    ({"block_tables": torch.zeros(3, 3, dtype=torch.int32), "context_lens": torch.tensor([1, 2, 3], dtype=torch.int32)},
     r"q must be a CUDA tensor"),  # int32 metadata is accepted
    ({"q": torch.randn(3, 256)}, r"q must be 3-D \[num_seqs, num_heads, head_dim\]"),
    ({"q": torch.randn(3, 4, 64, dtype=torch.float64)}, r"q dtype must be float32, float16 or bfloat16"),
    ({"q": torch.randn(3, 64, 4).transpose(1, 2)}, r"q must be contiguous in its last dim"),
    ({"q": torch.randn(3, 4, 64, dtype=torch.float16)}, r"k_cache dtype must equal q dtype Half, got Float"),
    ({"v_cache": torch.randn(6, 16, 2, 64, dtype=torch.bfloat16)}, r"v_cache dtype must equal k_cache dtype"),
    ({"v_cache": torch.randn(6, 16, 1, 64)}, r"v_cache must have the shape of k_cache"),
    ({"k_cache": torch.randn(6, 16, 128)}, r"k_cache must be 4-D"),
    ({"q": torch.randn(3, 4, 128)}, r"k_cache\.size\(3\) \(head_dim\) must equal q\.size\(2\) = 128, got 64"),
    ({"q": torch.randn(3, 4, 96), "k_cache": torch.randn(6, 16, 2, 96), "v_cache": torch.randn(6, 16, 2, 96)},
     r"head_dim must be 64, 128 or 256 .*got 96"),
    ({"q": torch.randn(3, 5, 64)}, r"q\.size\(1\) \(num_heads = 5\) must be a multiple of k_cache\.size\(2\) \(num_kv_heads = 2\)"),
    ({"block_tables": torch.zeros(3, 3)}, r"block_tables must be int32 or int64, got Float"),
    ({"block_tables": torch.zeros(9, dtype=torch.int64)}, r"block_tables must be 2-D"),
    ({"block_tables": torch.zeros(2, 3, dtype=torch.int64)}, r"block_tables\.size\(0\) must equal q\.size\(0\) \(num_seqs\) = 3, got 2"),
    ({"block_tables": torch.zeros(3, 6, dtype=torch.int64)[:, ::2]}, r"block_tables must be contiguous in its last dim"),
    ({"context_lens": torch.tensor([1.0, 2.0, 3.0])}, r"context_lens must be int32 or int64, got Float"),
    ({"context_lens": torch.tensor([[1, 2, 3]])}, r"context_lens must be 1-D"),
    ({"context_lens": torch.tensor([1, 2])}, r"context_lens\.size\(0\) must equal q\.size\(0\) \(num_seqs\) = 3, got 2"),
])
def test_paged_decode_attention_argument_errors(change, match):
    a = _attn_args()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _attend(a)


@needs_build
def test_paged_attention_applies_only_to_cuda_decode():
    a = _attn_args()
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.int64), query_start_loc=[0, 1, 2, 3],
                             context_lens=[1, 17, 0], block_tables=a["block_tables"], max_query_len=1)
    assert not cuda_native.paged_attention_applies(a["q"], a["k_cache"], a["v_cache"], meta, 0.125)


# ---------------------------------------------------------------------------------------------
# GPU: the cache write
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv, d, bs", [(3, 64, 16), (2, 128, 32), (1, 36, 16)])  # d=36: rows too short for 16-byte copies in f16
def test_reshape_and_cache_matches_reference(dtype, hkv, d, bs):
    torch.manual_seed(0)
    nb, T = 7, 37
    qkv = torch.randn(T, (9 + 2 * hkv) * d, device="cuda", dtype=dtype)
    key = qkv[:, 9 * d:(9 + hkv) * d].view(T, hkv, d)  # strided over tokens, like the model's split
    value = qkv[:, (9 + hkv) * d:].view(T, hkv, d)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    sentinel = torch.full((nb, bs, hkv, d), 7.0, device="cuda", dtype=dtype)
    k1, v1, k2, v2 = (sentinel.clone() for _ in range(4))
    cuda_native.reshape_and_cache(key, value, k1, v1, slots)
    reference.reshape_and_cache(key, value, k2, v2, slots)
    torch.testing.assert_close(k1, k2, rtol=0, atol=0)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
def test_reshape_and_cache_slot_bounds():
    a = _cache_args()
    a = {k: v.cuda() for k, v in a.items()}
    num_slots = 4 * 16
    for bad in (num_slots, num_slots + 1000, -2):
        a["slot_mapping"] = torch.tensor([0, 1, bad, 3, 4], device="cuda")
        with pytest.raises(RuntimeError, match=rf"slot_mapping holds slot {bad}\b.*{num_slots}"):
            _write(a, check_slots=True)
        with pytest.raises(RuntimeError, match=rf"slot_mapping holds slot {bad}\b"):
            cuda_native.reshape_and_cache(**a)  # checks by default outside graph capture
    assert torch.count_nonzero(a["k_cache"]) == 0, "a refused write must not store anything"
    # unchecked: the kernel skips the bad slot (and -1, padding) and stores the others
    a["slot_mapping"] = torch.tensor([0, -1, num_slots, 3, num_slots - 1], device="cuda")
    cuda_native.reshape_and_cache(**a, check_slots=False)
    torch.cuda.synchronize()
    flat = a["k_cache"].view(num_slots, 2, 64)
    torch.testing.assert_close(flat[[0, 3, num_slots - 1]], a["key"][[0, 3, 4]], rtol=0, atol=0)
    assert torch.count_nonzero(flat[1:3]) == 0 and torch.count_nonzero(flat[4:num_slots - 1]) == 0
    # -1 is padding, accepted by the check
    a["slot_mapping"] = torch.tensor([-1, 5, 6, -1, 7], device="cuda")
    _write(a, check_slots=True)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
def test_device_mismatch_is_named():
    a = _cache_args()
    a = {k: v.cuda() for k, v in a.items()}
    a["slot_mapping"] = a["slot_mapping"].cpu()
    with pytest.raises(RuntimeError, match=r"slot_mapping must be a CUDA tensor"):
        _write(a)
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _attn_args().items()}
    b["context_lens"] = b["context_lens"].cpu()
    with pytest.raises(RuntimeError, match=r"context_lens must be a CUDA tensor"):
        _attend(b)


# ---------------------------------------------------------------------------------------------
# GPU: paged decode attention
# ---------------------------------------------------------------------------------------------

def make_decode_batch(lens, h, hkv, d, bs, dtype, seed=0, extra_width=1, spare_blocks=3,
                      table_dtype=torch.int64, lens_dtype=torch.int64, device="cuda"):
    """Caches with shuffled blocks; every slot no sequence owns is NaN (a read past a sequence's end
    shows). Returns q [B, H, D] (a strided view, like a slice of a fused qkv), the caches, the
    block table [B, W] (W = the longest sequence's blocks + extra_width, padded with 0) and the
    context lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + spare_blocks
    k_cache = torch.full((nb, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    free = torch.randperm(nb, generator=g).tolist()
    W = max(need + [0]) + extra_width
    tables = torch.zeros(len(lens), W, dtype=torch.int64)
    for i, n in enumerate(lens):
        blocks = [free.pop() for _ in range(need[i])]
        tables[i, :need[i]] = torch.tensor(blocks, dtype=torch.int64)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)], dtype=torch.int64)
        k_cache.view(-1, hkv, d)[slots] = torch.randn(n, hkv, d, generator=g).to(dtype)
        v_cache.view(-1, hkv, d)[slots] = torch.randn(n, hkv, d, generator=g).to(dtype)
    qkv = torch.randn(len(lens), (h + 2) * d, generator=g).to(dtype)
    q = qkv[:, :h * d].view(len(lens), h, d)
    return (q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device, table_dtype),
            torch.tensor(lens, dtype=lens_dtype, device=device))


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """The reference in float64 on the upcast inputs; rows with context length 0 are zeros."""
    lens_list = [int(n) for n in lens.tolist()]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    rows = [i for i, n in enumerate(lens_list) if n > 0]
    if rows:
        idx = torch.tensor(rows, device=q.device)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(len(rows), dtype=torch.int64, device=q.device),
            query_start_loc=list(range(len(rows) + 1)), context_lens=[lens_list[i] for i in rows],
            block_tables=tables.long().index_select(0, idx), max_query_len=1)
        out[idx] = reference.paged_attention(q.double().index_select(0, idx), k_cache.double(), v_cache.double(),
                                             meta, scale)
    return out


def check_close(out, ref, dtype):
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("bs", [16, 32])
def test_paged_decode_attention_matches_reference(dtype, d, group, bs):
    hkv = 2
    h = hkv * group
    # lengths: 1, a block, a block + 1, several hundred, exactly one partition, one past it,
    # more than two partitions, and a padded row (0)
    lens = [1, bs, bs + 1, 300, 512, 513, 1300, 0, 77]
    q, kc, vc, tables, ctx = make_decode_batch(lens, h, hkv, d, bs, dtype, seed=d + group + bs)
    scale = d ** -0.5
    out = cuda_native.paged_decode_attention(q, kc, vc, tables, ctx, scale)
    ref = reference_decode(q, kc, vc, tables, ctx, scale)
    check_close(out, ref, dtype)
    assert torch.count_nonzero(out[7]) == 0, "a row with context length 0 gives zeros"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, hkv, group", [(128, 2, 2), (128, 1, 8), (64, 2, 12), (128, 1, 7), (256, 2, 4), (256, 1, 8)])
def test_paged_decode_attention_group_sizes_and_head_dims(dtype, d, hkv, group):
    """Group chunks (H / Hkv > 8 takes several blocks per kv head), odd groups, D = 256."""
    lens = [5, 700, 1, 1100]
    q, kc, vc, tables, ctx = make_decode_batch(lens, hkv * group, hkv, d, 16, dtype, seed=group,
                                               table_dtype=torch.int32, lens_dtype=torch.int32)
    out = cuda_native.paged_decode_attention(q, kc, vc, tables, ctx, 0.1)
    check_close(out, reference_decode(q, kc, vc, tables, ctx, 0.1), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_batch_and_width_invariant(dtype):
    """A sequence's output is bit-identical alone, inside a batch at any position, and with any
    block-table width (one partition, where the kernel writes the output itself, or several,
    where the combine kernel does)."""
    lens = [40, 1300, 300, 512, 3]
    q, kc, vc, tables, ctx = make_decode_batch(lens, 8, 2, 128, 16, dtype, extra_width=40)
    full = cuda_native.paged_decode_attention(q, kc, vc, tables, ctx, 0.09)
    for i, n in enumerate(lens):
        need = -(-n // 16)
        for W in sorted({need, 32, tables.shape[1]}):
            if W < need:
                continue
            alone = cuda_native.paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1, :W].contiguous(),
                                                       ctx[i:i + 1], 0.09)
            assert torch.equal(alone[0], full[i]), (i, n, W)
    perm = torch.tensor([3, 0, 4, 2, 1], device="cuda")
    shuffled = cuda_native.paged_decode_attention(q[perm], kc, vc, tables[perm], ctx[perm], 0.09)
    assert torch.equal(shuffled, full[perm])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
def test_paged_attention_op_signature_and_applies():
    lens = [9, 600, 1]
    q, kc, vc, tables, ctx = make_decode_batch(lens, 4, 2, 64, 16, torch.float16)
    q = q.contiguous()
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.int64, device="cuda"),
                             query_start_loc=[0, 1, 2, 3], context_lens=lens, block_tables=tables, max_query_len=1)
    assert cuda_native.paged_attention_applies(q, kc, vc, meta, 0.125)
    out = cuda_native.paged_attention(q, kc, vc, meta, 0.125)
    check_close(out, reference_decode(q, kc, vc, tables, ctx, 0.125), torch.float16)
    prefill = AttentionMetadata(slot_mapping=meta.slot_mapping, query_start_loc=[0, 1, 2, 3], context_lens=lens,
                                block_tables=tables, max_query_len=2)
    assert not cuda_native.paged_attention_applies(q, kc, vc, prefill, 0.125)
    assert not cuda_native.paged_attention_applies(q, kc, vc, meta, 0.125, k_scale=torch.ones(1, device="cuda"))
    assert not cuda_native.paged_attention_applies(q.float(), kc, vc, meta, 0.125)
    assert not cuda_native.paged_attention_applies(q[:2], kc, vc, meta, 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged_decode_attention_cuda_graph_replay(dtype):
    """Captured once on static buffers (with the cache write), replayed with other context lengths,
    other block-table contents, other queries: every replay matches the reference."""
    B, h, hkv, d, bs, W = 6, 8, 2, 128, 16, 100  # W * bs = 1600 tokens: 4 partitions
    nb = B * W + 4
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).cuda()
    v_cache = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).cuda()
    s_q = torch.zeros(B, h, d, dtype=dtype, device="cuda")
    s_key = torch.zeros(B, hkv, d, dtype=dtype, device="cuda")
    s_value = torch.zeros(B, hkv, d, dtype=dtype, device="cuda")
    s_slots = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    s_tables = torch.zeros(B, W, dtype=torch.int32, device="cuda")
    s_lens = torch.zeros(B, dtype=torch.int64, device="cuda")

    def step():
        cuda_native.reshape_and_cache(s_key, s_value, k_cache, v_cache, s_slots)  # no slot check while capturing
        return cuda_native.paged_decode_attention(s_q, k_cache, v_cache, s_tables, s_lens, d ** -0.5)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = step()

    for trial, lens in enumerate([[1, 17, 512, 513, 1600, 0], [1300, 0, 5, 1024, 16, 33], [0] * B]):
        perm = torch.randperm(nb, generator=g)[: B * W].view(B, W)
        s_tables.copy_(perm.to(torch.int32))
        s_lens.copy_(torch.tensor(lens))
        s_q.copy_(torch.randn(B, h, d, generator=g).to(dtype))
        s_key.copy_(torch.randn(B, hkv, d, generator=g).to(dtype))
        s_value.copy_(torch.randn(B, hkv, d, generator=g).to(dtype))
        # this step's token is the last of each sequence: its slot (padding rows: -1)
        slots = [int(perm[i, (n - 1) // bs]) * bs + (n - 1) % bs if n > 0 else -1 for i, n in enumerate(lens)]
        s_slots.copy_(torch.tensor(slots))
        graph.replay()
        torch.cuda.synchronize()
        flat_k = k_cache.view(-1, hkv, d)
        for i, s in enumerate(slots):
            if s >= 0:
                assert torch.equal(flat_k[s], s_key[i]), (trial, i)
        ref = reference_decode(s_q, k_cache, v_cache, s_tables, s_lens, d ** -0.5)
        check_close(s_out.clone(), ref, dtype)
        eager = cuda_native.paged_decode_attention(s_q, k_cache, v_cache, s_tables, s_lens, d ** -0.5)
        assert torch.equal(eager, s_out), trial


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
def test_paged_decode_attention_bad_metadata_stays_in_bounds():
    """Lengths past the table's width and block ids past the cache are clamped on the device: wrong
    numbers (sequence 0 may read NaN slots), but no fault."""
    q, kc, vc, tables, ctx = make_decode_batch([20, 40], 4, 2, 64, 16, torch.float32, extra_width=0)
    tables[0, 0] = 10_000
    tables[1, 1] = -5
    ctx[0] = 1 << 40
    ctx[1] = -3
    out = cuda_native.paged_decode_attention(q, kc, vc, tables, ctx, 0.125)
    torch.cuda.synchronize()
    assert out.shape == q.shape
    assert torch.count_nonzero(out[1]) == 0  # a negative length reads as 0
