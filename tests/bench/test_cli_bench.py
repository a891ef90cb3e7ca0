"""``fastinfer bench`` end to end on the default model: a quick throughput run writes a valid
result document, Markdown and a plot; compare gates on real files."""
from __future__ import annotations

import json

import pytest

from fastinfer.bench.schema import load_result
from fastinfer.cli.main import main


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"r.{k}") for k in ("json", "md", "png")}
    code = main(["bench", "throughput", "--quick", "--num-prompts", "3", "--output-len", "4:8",
                 "--input-len", "16:32", "--baseline", "torch-naive", "--dtype", "float32",
                 "--kv-cache-memory", "64MiB", "--json", paths["json"], "--markdown", paths["md"],
                 "--plot", paths["png"]])
    assert code == 0
    return paths


def test_quick_throughput_writes_a_valid_document(quick_result):
    doc = load_result(quick_result["json"])  # validates the schema
    assert doc["command"] == "throughput" and doc["model"] == "smollm2-135m"
    assert set(doc["results"]) == {"fastinfer", "torch-naive"}
    w = doc["workload"]
    assert w["num_prompts"] == 3 and all(4 <= n <= 8 for n in w["output_lens"])
    for res in doc["results"].values():
        assert res["output_tokens"] == sum(w["output_lens"])
        assert res["output_throughput_tok_s"] > 0 and res["ttft_ms"]["p50"] > 0
    assert doc["ratios"]["torch-naive"] == pytest.approx(
        doc["results"]["fastinfer"]["output_throughput_tok_s"] / doc["results"]["torch-naive"]["output_throughput_tok_s"])
    assert "| fastinfer |" in open(quick_result["md"]).read()
    assert open(quick_result["png"], "rb").read(4) == b"\x89PNG"


def test_compare_cli_exit_codes(quick_result, tmp_path):
    base = quick_result["json"]
    assert main(["bench", "compare", base, base]) == 0
    doc = json.load(open(base))
    doc["results"]["fastinfer"]["output_throughput_tok_s"] *= 0.8
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(doc))
    assert main(["bench", "compare", base, str(worse), "--threshold", "5%"]) == 1
    assert main(["bench", "compare", base, str(tmp_path / "missing.json")]) == 2


def test_min_ratio_gate(quick_result, tmp_path, capsys):
    from fastinfer.cli.bench import _check_ratios

    doc = load_result(quick_result["json"])
    ratio = doc["ratios"]["torch-naive"]
    assert _check_ratios(doc, [f"torch-naive={ratio / 2}"]) == 0
    assert _check_ratios(doc, [f"torch-naive={ratio * 2}"]) == 1
    assert _check_ratios(doc, ["transformers=1"]) == 2


def test_latency_with_transformers_baselines(tmp_path):
    path = tmp_path / "lat.json"
    code = main(["bench", "latency", "--batch-size", "2", "--input-len", "16", "--output-len", "5",
                 "--num-iters", "2", "--baseline", "transformers", "transformers-batched",
                 "--dtype", "float32", "--kv-cache-memory", "64MiB", "--json", str(path)])
    assert code == 0
    doc = load_result(str(path))
    assert set(doc["results"]) == {"fastinfer", "transformers", "transformers-batched"}
    for res in doc["results"].values():  # 2 iterations x 2 requests x 5 tokens, for every system
        assert res["num_requests"] == 4 and res["output_tokens"] == 20
        assert res["tpot_ms"]["p50"] > 0


def test_prefix_workload_runs_with_the_cache_off(tmp_path):
    path = tmp_path / "prefix.json"
    code = main(["bench", "prefix", "--num-prompts", "3", "--prefix-len", "40", "--input-len", "4:8",
                 "--output-len", "3", "--baseline", "none", "--dtype", "float32", "--kv-cache-memory", "64MiB",
                 "--json", str(path)])
    assert code == 0
    doc = load_result(str(path))
    assert doc["command"] == "prefix" and all(44 <= n <= 48 for n in doc["workload"]["input_lens"])
