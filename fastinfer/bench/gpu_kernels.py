"""Kernel micro-timings of the GPU benchmark: each op's implementations (``fastinfer.ops``:
triton, cuda and the torch reference) at decode-relevant sizes of a model shape, timed with
``triton.testing.do_bench`` (median, L2 flushed) and by CUDA-graph replay, reported as bytes
moved / time."""
from __future__ import annotations

from typing import Any

import torch

from fastinfer import ops
from fastinfer.bench.gpu_hardware import free_memory

KERNEL_SHAPE = "llama-3.2-1b"


class _Inputs:
    """Random inputs on one device, from one seeded generator."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32).to(self.dtype)


def kernel_cases(s: dict, dtype: torch.dtype, device: str = "cuda") -> list[dict[str, Any]]:
    """Inputs of each op at decode-relevant sizes of a shape (a dict of
    ``random_model.SHAPES``): ``op``, ``size`` (a label), ``args`` and ``bytes``, the bytes an
    implementation must move (read + write, each tensor once)."""
    x = _Inputs(device, dtype)
    cases = []
    for T in (64, 4096):
        cases += _row_op_cases(s, x, T)
    cases.append(_decode_attention_case(s, x))
    return cases


def _row_op_cases(s: dict, x: _Inputs, T: int) -> list[dict[str, Any]]:
    """The per-token ops over ``T`` tokens: norms, activation, rotary, the KV-cache write."""
    e = torch.finfo(x.dtype).bits // 8
    H, I = s["hidden_size"], s["intermediate_size"]  # noqa: E741 - the model's own names
    nh, nkv, hd = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    label = f"T={T}" + (" (decode batch)" if T == 64 else " (prefill chunk)")
    h, res, w = x.randn(T, H), x.randn(T, H), x.randn(H)
    act = x.randn(T, 2 * I)
    qkv = x.randn(T, (nh + 2 * nkv) * hd)  # q and k as the model has them: strided views of the qkv output
    q = qkv[:, :nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
    max_pos = 4096
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(max_pos, device=x.device, dtype=torch.float32), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    positions = torch.randint(0, max_pos, (T,), generator=x.gen, device=x.device)
    bs, nblocks = 16, max(T // 16 * 2, 64)
    kc = torch.zeros(nblocks, bs, nkv, hd, dtype=x.dtype, device=x.device)
    slots = torch.randperm(nblocks * bs, generator=x.gen, device=x.device)[:T]
    return [
        dict(op="rms_norm", size=label, args=(h, w, 1e-5), bytes=2 * T * H * e + H * e),
        dict(op="add_rms_norm", size=label, args=(h, res, w, 1e-5), bytes=4 * T * H * e + H * e),
        dict(op="silu_and_mul", size=f"{label}, d={I}", args=(act,), bytes=3 * T * I * e),
        dict(op="rotary_embedding", size=f"{label}, {nh}/{nkv} heads x {hd}", args=(positions, q, k, cos_sin),
             bytes=2 * T * (nh + nkv) * hd * e + T * hd * 4 + T * 8),
        dict(op="reshape_and_cache", size=f"{label}, {nkv} kv heads x {hd}",
             args=(k, v, kc, torch.zeros_like(kc), slots, None, None), bytes=4 * T * nkv * hd * e + T * 8),
    ]


def _decode_attention_case(s: dict, x: _Inputs) -> dict[str, Any]:
    """Decode attention: batch 64, context 2048, paged with shuffled blocks."""
    e = torch.finfo(x.dtype).bits // 8
    nh, nkv, hd = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    B, ctx, bs = 64, 2048, 16
    per = ctx // bs
    nblocks = B * per
    kc, vc = x.randn(nblocks, bs, nkv, hd), x.randn(nblocks, bs, nkv, hd)
    tables = torch.randperm(nblocks, generator=x.gen, device=x.device).view(B, per)
    q = x.randn(B, nh, hd)
    slots = tables[:, -1] * bs + (bs - 1)
    qsl = list(range(B + 1))
    # the one step-metadata object of this module, taken from the ops package that consumes it
    meta = ops.AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, context_lens=[ctx] * B,
                                 block_tables=tables, max_query_len=1,
                                 query_start_loc_tensor=torch.tensor(qsl, dtype=torch.int64, device=x.device),
                                 context_lens_tensor=torch.full((B,), ctx, dtype=torch.int64, device=x.device))
    return dict(op="paged_attention", size=f"decode B={B}, context {ctx}, {nh}/{nkv} heads x {hd}, block {bs}",
                args=(q, kc, vc, meta, hd ** -0.5, None, None),
                bytes=2 * B * ctx * nkv * hd * e + 2 * B * nh * hd * e + B * per * 8)


def time_kernel_case(case: dict[str, Any], peak: float | None) -> list[dict[str, Any]]:
    """One row per backend of ``case['op']`` (triton, cuda, reference; others too when
    registered; the CPU backends left out): median time by ``do_bench`` (L2 flushed between
    runs) and by CUDA-graph replay, GB/s and the fraction of ``peak`` bytes/s."""
    rows = []
    for impl in ops.implementations(case["op"]):
        if impl.backend.startswith("cpu"):
            continue
        row = {"op": case["op"], "backend": impl.backend, "size": case["size"], "bytes": case["bytes"]}
        rows.append(row)
        try:
            if not impl.applies(*case["args"]):
                row["note"] = "does not apply to these inputs"
                continue
            _time_impl(impl, case, peak, row)
        except Exception as exc:  # noqa: BLE001 - one backend's failure is a row, not the end
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            free_memory()
    return rows


def _time_impl(impl, case: dict[str, Any], peak: float | None, row: dict[str, Any]) -> None:
    import triton.testing

    args = case["args"]

    def fn():
        return impl.fn(*args)

    fn()
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except TypeError:  # older triton: quantiles
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])[0]
    row["us"] = ms * 1e3
    row["GBps"] = case["bytes"] / (ms * 1e-3) / 1e9
    if peak:
        row["fraction_of_peak"] = case["bytes"] / (ms * 1e-3) / peak
    if impl.backend == "reference":
        return
    try:
        gms = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        row["us_graph"] = gms * 1e3
        row["GBps_graph"] = case["bytes"] / (gms * 1e-3) / 1e9
    except Exception as exc:  # noqa: BLE001 - graph timing is a bonus
        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
