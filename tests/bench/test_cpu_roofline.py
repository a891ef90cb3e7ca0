"""The CPU roofline of the benchmarks (issue 25): workload FLOPs counted by hand on a small
config, and the measured rates are positive and sane."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastinfer.bench.cpu_roofline import compute_roofline, decode_roofline, gemm_rate, read_bandwidth, workload_flops

CFG = SimpleNamespace(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, intermediate_size=16, num_layers=3,
                      vocab_size=100)


def test_workload_flops_by_hand():
    # one request: prompt 3, 2 outputs -> tokens at positions 0..3 go through the layers
    f = workload_flops(CFG, [3], [2])
    qkv, o, mlp = 8 * (4 + 2 * 2) * 2, 4 * 2 * 8, 3 * 8 * 16
    assert f["linear"] == 2 * 3 * (qkv + o + mlp) * 4
    assert f["attention"] == 4 * 3 * 4 * 2 * (1 + 2 + 3 + 4)
    assert f["lm_head"] == 2 * 8 * 100 * 2
    assert f["total"] == f["linear"] + f["attention"] + f["lm_head"]
    # requests add up
    assert workload_flops(CFG, [3, 5], [2, 1])["total"] == f["total"] + workload_flops(CFG, [5], [1])["total"]


def test_compute_roofline_is_flops_over_rate():
    roof = compute_roofline(CFG, [3], [2], {"flop_per_s": 1e9})
    assert roof["seconds"] == pytest.approx(workload_flops(CFG, [3], [2])["total"] / 1e9)
    assert roof["output_tok_s"] == pytest.approx(2 / roof["seconds"])


def test_measured_rates():
    bw = read_bandwidth(64 * 2**20, repeats=2)
    assert 1e8 < bw["read_bytes_per_s"] < 1e13 and bw["threads"] == torch.get_num_threads()
    rate = gemm_rate(16, 64, 64, torch.float32, repeats=2)
    assert 1e7 < rate["flop_per_s"] < 1e14 and rate["dtype"] == "float32"
    assert decode_roofline(10**6, bw)["tok_s"] == pytest.approx(bw["read_bytes_per_s"] / 1e6)
