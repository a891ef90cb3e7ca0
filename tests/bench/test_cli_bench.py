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
    # the folders do not exist yet: they are made when the arguments are parsed
    paths = {k: str(out / "new" / k / f"r.{k}") for k in ("json", "md", "png")}
    code = main(["bench", "throughput", "--quick", "--num-prompts", "3", "--output-len", "4:8",
                 "--input-len", "16:32", "--baseline", "torch-naive", "--dtype", "float32",
                 "--kv-cache-memory", "64MiB", "--json", paths["json"], "--markdown", paths["md"],
                 "--plot", paths["png"]])
    assert code == 0
    return paths


def test_quick_throughput_writes_a_valid_document(quick_result):
    doc = load_result(quick_result["json"])  # validates the schema
    assert doc["command"] == "throughput" and doc["model"] == "smollm2-135m"
    assert doc["quantization"]["quantization"] is None and doc["quantization"]["kv_cache_dtype"] == "auto"
    assert 0 < doc["weight_bytes"] < 200e6  # the GGUF file's blocks, kept
    assert set(doc["results"]) == {"fastinfer", "torch-naive"}
    w = doc["workload"]
    assert w["num_prompts"] == 3 and all(4 <= n <= 8 for n in w["output_lens"])
    for res in doc["results"].values():
        assert res["output_tokens"] == sum(w["output_lens"])
        assert res["output_throughput_tok_s"] > 0 and res["ttft_ms"]["p50"] > 0
    assert doc["ratios"]["torch-naive"] == pytest.approx(
        doc["results"]["fastinfer"]["output_throughput_tok_s"] / doc["results"]["torch-naive"]["output_throughput_tok_s"])
    # the in-run compute roofline (CPU): the workload's FLOPs at the bf16 GEMM rate measured now
    roof = doc["roofline"]
    assert roof["gemm"]["flop_per_s"] > 0 and roof["workload_flops"]["total"] > roof["workload_flops"]["linear"] > 0
    assert roof["output_tok_s"] == pytest.approx(sum(w["output_lens"]) * roof["gemm"]["flop_per_s"]
                                                 / roof["workload_flops"]["total"])
    for res in doc["results"].values():
        assert res["roofline_fraction"] == pytest.approx(res["output_throughput_tok_s"] / roof["output_tok_s"])
    assert "| fastinfer |" in open(quick_result["md"]).read()
    assert "% roofline" in open(quick_result["md"]).read()
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
    assert _check_ratios(doc, [("torch-naive", ratio / 2)]) == 0
    assert _check_ratios(doc, [("torch-naive", ratio * 2)]) == 1
    assert _check_ratios(doc, [("transformers", 1.0)]) == 2


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


def test_prefix_runs_the_cache_on_and_off_side_by_side(tmp_path, capsys):
    path = tmp_path / "prefix.json"
    code = main(["bench", "prefix", "--num-prompts", "3", "--prefix-len", "40", "--input-len", "4:8",
                 "--output-len", "3", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--json", str(path),
                 "--markdown", str(tmp_path / "prefix.md")])
    assert code == 0
    doc = load_result(str(path))
    assert doc["command"] == "prefix" and all(44 <= n <= 48 for n in doc["workload"]["input_lens"])
    assert list(doc["results"]) == ["fastinfer", "fastinfer-no-prefix-cache"]  # no transformers by default
    on, off = doc["kv_cache"]["fastinfer"], doc["kv_cache"]["fastinfer-no-prefix-cache"]
    prompt_tokens = sum(doc["workload"]["input_lens"])
    assert on["prompt_tokens"] == off["prompt_tokens"] == prompt_tokens
    # the 40-token prefix holds 2 full blocks: the requests after the first read them (each run starts cold)
    assert on["prefix_cache_hits"] > 0 and 32 <= on["cached_prompt_tokens"] <= 2 * 32
    assert off["prefix_cache_hits"] == 0 and off["cached_prompt_tokens"] == 0
    gains = doc["prefix_cache"]
    assert gains["throughput_ratio"] == pytest.approx(doc["ratios"]["fastinfer-no-prefix-cache"])
    assert gains["ttft_p50_ratio"] == pytest.approx(gains["ttft_p50_ms_off"] / gains["ttft_p50_ms_on"])
    assert set(gains["met"]) == {"ttft_p50_ratio", "throughput_ratio"}
    out = capsys.readouterr().out
    assert "prefix cache on vs off: TTFT p50 lower by" in out and doc["env"]["cpu"] in out
    assert "prefix cache on vs off" in (tmp_path / "prefix.md").read_text()


def test_prefix_without_the_cache_off_baseline(tmp_path):
    path = tmp_path / "prefix.json"
    code = main(["bench", "prefix", "--num-prompts", "2", "--prefix-len", "20", "--input-len", "4",
                 "--output-len", "2", "--no-prefix-cache-baseline", "--dtype", "float32",
                 "--kv-cache-memory", "64MiB", "--json", str(path)])
    assert code == 0
    doc = load_result(str(path))
    assert list(doc["results"]) == ["fastinfer"] and "prefix_cache" not in doc
    assert doc["kv_cache"]["fastinfer"]["prefix_cache_hits"] > 0  # the second request reads the first block


def test_prefix_defaults_are_the_issue_workload():
    from fastinfer.bench.driver import NO_PREFIX_CACHE
    from fastinfer.cli import bench
    from fastinfer.cli.main import build_parser

    assert bench.NO_PREFIX_CACHE == NO_PREFIX_CACHE
    args = build_parser().parse_args(["bench", "prefix"])
    bench._apply_quick(args)
    assert (args.num_prompts, args.prefix_len, args.input_len, args.output_len) == (64, 512, (32, 32), (32, 32))
    assert args.baseline == ["none"] and not args.no_prefix_cache_baseline
    assert build_parser().parse_args(["bench", "prefix", "--baseline", "transformers"]).baseline == ["transformers"]
    assert bench.min_ratio_arg(f"{NO_PREFIX_CACHE}=2") == (NO_PREFIX_CACHE, 2.0)


@pytest.mark.parametrize("argv,message", [
    (["throughput", "--num-prompts", "0"], "argument --num-prompts: value must be an int >= 1, got 0"),
    (["throughput", "--num-prompts", "-1"], "argument --num-prompts: value must be an int >= 1, got -1"),
    (["throughput", "--num-prompts", "x"], "argument --num-prompts: expected an int, got 'x'"),
    (["throughput", "--batch-size", "0"], "argument --batch-size: value must be an int >= 1, got 0"),
    (["latency", "--num-iters", "0"], "argument --num-iters: value must be an int >= 1, got 0"),
    (["prefix", "--prefix-len", "0"], "argument --prefix-len: value must be an int >= 1, got 0"),
    (["prefix", "--num-prompts", "0"], "argument --num-prompts: value must be an int >= 1, got 0"),
    (["throughput", "--min-ratio", "transformers=abc"], "expected SYSTEM=X with X a number > 0"),
    (["throughput", "--min-ratio", "transformers=-1"], "expected SYSTEM=X with X a number > 0"),
    (["throughput", "--min-ratio", "vllm=2"], "expected SYSTEM=X with SYSTEM one of ['transformers'"),
    (["throughput", "--input-len", "0"], "length range must satisfy 1 <= LO <= HI"),
])
def test_bad_bench_arguments_are_refused_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as info:  # argparse: before any model is loaded
        main(["bench", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_output_paths_are_checked_when_parsed(tmp_path, capsys):
    from fastinfer.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--json", str(tmp_path)])
    assert "is a folder: expected a file path" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--plot", str(blocker / "sub" / "p.png")])
    assert "cannot create the folder of" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "latency", "--markdown", str(tmp_path / "a" / "b" / "r.md")])
    assert (tmp_path / "a" / "b").is_dir() and args.markdown.endswith("r.md")


def test_compare_refuses_a_result_with_no_requests(quick_result, tmp_path, capsys):
    doc = json.load(open(quick_result["json"]))
    empty = dict(doc, workload=dict(doc["workload"], num_prompts=0, input_lens=[], output_lens=[]))
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(empty))
    assert main(["bench", "compare", quick_result["json"], str(path)]) == 2
    assert "workload.num_prompts: expected at least 1 request, got 0" in capsys.readouterr().err
    no_requests = json.loads(json.dumps(doc))
    no_requests["results"]["fastinfer"]["num_requests"] = 0
    path.write_text(json.dumps(no_requests))
    assert main(["bench", "compare", str(path), quick_result["json"]]) == 2
    assert "results.fastinfer.num_requests: expected at least 1 request, got 0" in capsys.readouterr().err
