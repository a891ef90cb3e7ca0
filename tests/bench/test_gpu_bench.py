"""The GPU benchmark (``fastinfer bench gpu``, ``benchmarks/gpu_bench.py``) checked on the CPU:
its options, its report, its kernel cases on the torch reference, the plain-torch baseline
against ``transformers``, and a whole run of the tiny shape (``--device cpu``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastinfer import ops
from fastinfer.bench import gpu
from fastinfer.bench.compiled import CompiledDecoder, PlainLlama, _decode_one
from fastinfer.bench.gpu_kernels import kernel_cases
from fastinfer.bench.gpu_report import summary, to_markdown
from fastinfer.bench.random_model import SHAPES, build_random_llama
from fastinfer.bench.systems import hf_generate
from fastinfer.cli.main import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RUN = ["--device", "cpu", "--shapes", "tiny", "--budget-s", "600", "--num-requests", "4",
            "--baseline-requests", "2", "--baseline-batch", "2", "--input-range", "8,24", "--output-range", "3,6",
            "--prompt-len", "16", "--decode-tokens", "8", "--max-model-len", "256", "--no-compile"]
MD_SECTIONS = ["# fastinfer GPU benchmark", "## Single-stream decode", "### Where a batch-1 decode step goes",
               "## Mixed workload", "## Models and start-up", "## Section times"]


def test_the_script_and_the_cli_take_the_same_options():
    script = gpu.parse_args(["--shapes", "tiny, llama-3.2-1b", "--quick", "--input-range", "8,16"])
    cli = gpu.finish_args(build_parser().parse_args(["bench", "gpu", "--shapes", "tiny, llama-3.2-1b", "--quick",
                                                     "--input-range", "8,16"]))
    for name in gpu.option_names():
        assert getattr(cli, name) == getattr(script, name), name
    assert script.shapes == ["tiny", "llama-3.2-1b"] and script.input_range == (8, 16)
    assert (script.num_requests, script.decode_tokens, script.baseline_requests) == (64, 128, 32)
    full = gpu.parse_args([])
    assert (full.num_requests, full.decode_tokens, full.baseline_requests, full.baseline_requests_8b) == \
        (256, 256, 64, 32)
    assert gpu.finish_args(full) is full and full.input_range == (32, 1024)  # completing twice changes nothing


def test_without_a_gpu_it_exits_2_with_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == gpu.NO_GPU
    assert not os.listdir(tmp_path)


def _doc_with_problems() -> dict:
    return {"env": {"gpu": "NVIDIA H100 80GB HBM3"}, "bandwidth": {"table_bytes_per_s": 3.35e12, "table_entry": "H100"},
            "args": {"budget_s": 60}, "elapsed_s": 12.0,
            "kernels": {"shape": "llama-3.2-1b", "dtype": "bfloat16",
                        "rows": [{"op": "rms_norm", "size": "T=64", "backend": "triton", "bytes": 10, "us": 2.0,
                                  "GBps": 5.0, "fraction_of_peak": 0.5, "us_graph": 1.0, "GBps_graph": 10.0},
                                 {"op": "rms_norm", "size": "T=64", "backend": "cuda", "bytes": 10,
                                  "error": "RuntimeError: a | b"}]},
            "shapes": {"llama-3.1-8b": {"skipped": "skipped: too little memory", "sections": {}},
                       "llama-3.2-1b": {"sections": {"fastinfer_decode": {"error": "ValueError: x"},
                                                     "transformers_decode": {"skipped": "skipped: budget"}}}},
            "sections": [{"section": "environment", "seconds": 0.5, "ok": True}],
            "errors": [{"section": "llama-3.2-1b: fastinfer single-stream decode", "error": "ValueError: x"}],
            "skipped": [{"section": "llama-3.1-8b", "reason": "skipped: too little memory"}]}


def test_the_report_shows_failures_skips_and_kernel_rows():
    md = to_markdown(_doc_with_problems())
    assert "| llama-3.2-1b | fastinfer | error: ValueError: x |" in md
    assert "| llama-3.2-1b | transformers | skipped: budget |" in md
    assert "## Kernels (llama-3.2-1b sizes, bfloat16): bytes moved / time" in md
    assert "| rms_norm | T=64 | triton | 2 | 5 | 50.0% | 1 | 10 |" in md
    assert "| rms_norm | T=64 | cuda | RuntimeError: a / b |" in md  # a pipe would break the table
    assert "- **llama-3.2-1b: fastinfer single-stream decode** failed: `ValueError: x`" in md
    assert "- **llama-3.1-8b** skipped: too little memory" in md
    assert "data sheet 3,350 GB/s (H100)" in md
    text = summary(_doc_with_problems())
    assert text.startswith("GPU NVIDIA H100 80GB HBM3") and "1 section(s) failed, 1 skipped" in text
    assert "skipped: too little memory" in text


def test_kernel_cases_run_on_the_torch_reference():
    """The GPU-only kernel section's inputs, checked where it can be: every case on the CPU
    (tiny dims), through the reference implementation, with the bytes it claims to move."""
    cases = kernel_cases(SHAPES["tiny"], torch.float32, device="cpu")
    assert sorted({c["op"] for c in cases}) == ["add_rms_norm", "paged_attention", "reshape_and_cache", "rms_norm",
                                                "rotary_embedding", "silu_and_mul"]
    for case in cases:
        ref = next(i for i in ops.implementations(case["op"]) if i.backend == "reference")
        assert case["bytes"] > 0
        if case["op"] == "paged_attention":
            case = dict(case, args=_fewer_sequences(case["args"], 4))  # the reference loops in Python
        assert ref.applies(*case["args"]), case["op"]
        out = ref.fn(*case["args"])
        if isinstance(out, torch.Tensor):
            assert torch.isfinite(out).all(), case["op"]


def _fewer_sequences(args: tuple, b: int) -> tuple:
    q, kc, vc, meta, scale, ks, vs = args
    small = type(meta)(slot_mapping=meta.slot_mapping[:b], query_start_loc=meta.query_start_loc[:b + 1],
                       context_lens=meta.context_lens[:b], block_tables=meta.block_tables[:b], max_query_len=1)
    return q[:b], kc, vc, small, scale, ks, vs


def test_the_plain_llama_decodes_as_transformers_does():
    """The torch.compile baseline's model (run eagerly here) gives transformers' greedy tokens,
    left padding included, and a record per real request."""
    hf = build_random_llama("tiny", torch.float32, seed=0, device="cpu", num_hidden_layers=2)
    prompts, lens = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [6, 4]
    decoder = CompiledDecoder(PlainLlama(hf, batch=3, max_seq=64), "cpu")
    decoder.step = _decode_one  # eager: compiling takes a minute on a CPU
    try:
        res = decoder.generate(prompts, lens, arrival=0.0)
    finally:
        CompiledDecoder.reset()
    for p, n, got in zip(prompts, lens, res.tokens):
        want = hf_generate(hf, torch.tensor([p]), None, n)[0, len(p):].tolist()
        assert got[:n] == want
    assert [r.output_tokens for r in res.records] == lens and len(res.tokens) == 2
    assert all(r.arrival == 0.0 and r.first_token <= r.finish for r in res.records)
    assert res.prefill_s > 0 and res.decode_s > 0


def test_a_cpu_run_of_the_tiny_shape_fills_every_section(tmp_path):
    out, models = tmp_path / "out", tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), *TINY_RUN,
                           "--out", str(out), "--model-dir", str(models)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu_bench.json").read_text())
    assert doc["errors"] == [] and doc["skipped"] == []
    sections = doc["shapes"]["tiny"]["sections"]
    assert set(sections) == {"build", "fastinfer_startup", "fastinfer_decode", "fastinfer_decode_async",
                             "fastinfer_step_profile", "fastinfer_throughput", "fastinfer_throughput_async",
                             "fastinfer_subset", "transformers_decode", "transformers_throughput"}
    fi, hf = sections["fastinfer_subset"], sections["transformers_throughput"]
    assert fi["requests"] == hf["requests"] == 2 and fi["output_tokens"] == hf["output_tokens"]
    assert set(fi["ttft_ms"]) == {"mean", "p50", "p90", "p99"} and fi["peak_allocated_gib"] is None
    assert doc["shapes"]["tiny"]["ratios"]["throughput_vs_transformers_same_subset"] > 0
    assert set(doc["args"]) == gpu.option_names()
    md = (out / "gpu_bench.md").read_text()
    assert [h for h in MD_SECTIONS if h not in md] == []
    assert "0 section(s) failed, 0 skipped" in proc.stdout


def test_the_step_profile_timers_leave_the_runner_as_it_was():
    from fastinfer.bench.gpu_profile import _timed

    class Runner:
        def execute(self):
            return "run"

    r = Runner()
    r.sampler = lambda: "sampled"
    sampler, spent = r.sampler, {"execute": 0.0, "sampler": 0.0}
    with _timed(r, ("execute", "sampler"), spent):
        assert r.execute() == "run" and r.sampler() == "sampled"
    assert spent["execute"] > 0 and spent["sampler"] > 0
    assert "execute" not in vars(r) and r.sampler is sampler
