"""``compare``: exit codes and messages on real result files written with ``build_result``."""
from __future__ import annotations

import json

import pytest

from fastinfer.bench.compare import (DEFAULT_METRICS, CompareError, compare, main_compare,
                                     parse_threshold)
from fastinfer.bench.schema import build_result

ENV = {"fastinfer": "0.1.0", "torch": "2.0", "python": "3.11.0", "cpu": "test cpu", "gpu": None,
       "git_sha": None, "threads": 2}


def system(throughput: float = 300.0, ttft_p50: float = 40.0) -> dict:
    stats = {"mean": 30.0, "p50": 25.0, "p90": 50.0, "p99": 80.0}
    return {"output_throughput_tok_s": throughput, "request_throughput_req_s": throughput / 50,
            "total_time_s": 4.0, "ttft_ms": {**stats, "p50": ttft_p50}, "tpot_ms": dict(stats),
            "e2e_ms": dict(stats), "peak_memory_mb": 900.0}


def result(fastinfer: dict | None = None, transformers: dict | None = None, **workload) -> dict:
    wl = {"name": "mixed", "num_prompts": 2, "seed": 0, "input_lens": [32, 64],
          "output_lens": [16, 16], **workload}
    results = {"fastinfer": fastinfer or system(), "transformers": transformers or system(100.0)}
    return build_result("throughput", "smollm2-135m", "float32", "cpu", wl, results, ENV)


def write(tmp_path, name: str, doc: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc, indent=2))
    return str(path)


def run(tmp_path, base: dict, new: dict, **kwargs) -> int:
    return main_compare(write(tmp_path, "base.json", base), write(tmp_path, "new.json", new),
                        **kwargs)


def test_same_results_exit_0_and_print_the_table(tmp_path, capsys):
    assert run(tmp_path, result(), result(), threshold="5%") == 0
    out = capsys.readouterr().out
    for metric in DEFAULT_METRICS:
        assert metric in out
    assert "no regression" in out and "REGRESSED" not in out


def test_throughput_20_percent_lower_exits_1(tmp_path, capsys):
    assert run(tmp_path, result(), result(fastinfer=system(240.0)), threshold="5%") == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if line.startswith("fastinfer") and "output_throughput_tok_s" in line)
    assert "-20.0%" in row and "REGRESSED" in row


def test_ttft_20_percent_higher_exits_1(tmp_path, capsys):
    new = result(transformers=system(100.0, ttft_p50=48.0))
    assert run(tmp_path, result(), new, threshold="5%") == 1
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("transformers") and "ttft_ms.p50" in line)
    assert "+20.0%" in row and "REGRESSED" in row


def test_3_percent_worse_is_within_a_5_percent_threshold(tmp_path):
    new = result(fastinfer=system(291.0, ttft_p50=41.2))
    assert run(tmp_path, result(), new, threshold="5%") == 0
    assert run(tmp_path, result(), new, threshold="2%") == 1


def test_improvements_never_regress(tmp_path):
    new = result(fastinfer=system(600.0, ttft_p50=10.0))
    assert run(tmp_path, result(), new, threshold=0.0) == 0


def test_metrics_option_restricts_what_is_tracked(tmp_path):
    new = result(fastinfer=system(240.0))
    assert run(tmp_path, result(), new, metrics=["ttft_ms.p50"]) == 0
    report = compare(result(), new, metrics=["output_throughput_tok_s", "peak_memory_mb"])
    assert {(r.system, r.metric) for r in report.regressions} == {
        ("fastinfer", "output_throughput_tok_s")}


def test_on_ratios_judges_the_in_run_ratio(tmp_path, capsys):
    # A slower machine: every absolute number drops 30%, the ratio holds -> ratios pass.
    slow = result(fastinfer=system(210.0), transformers=system(70.0))
    assert run(tmp_path, result(), slow, on="absolute") == 1
    assert run(tmp_path, result(), slow, on="ratios") == 0
    # fastinfer alone got 20% slower: the ratio 3.0 -> 2.4 regresses.
    capsys.readouterr()
    assert run(tmp_path, result(), result(fastinfer=system(240.0)), on="ratios") == 1
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("transformers"))
    assert "ratio" in row and "-20.0%" in row and "REGRESSED" in row


def test_missing_file_exits_2_naming_it(tmp_path, capsys):
    base = write(tmp_path, "base.json", result())
    assert main_compare(base, str(tmp_path / "nope.json")) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


def test_broken_json_exits_2(tmp_path, capsys):
    base = write(tmp_path, "base.json", result())
    broken = tmp_path / "new.json"
    broken.write_text(json.dumps(result())[:-20])
    assert main_compare(base, str(broken)) == 2
    assert "new.json: not valid JSON" in capsys.readouterr().err


def test_wrong_schema_version_exits_2(tmp_path, capsys):
    assert run(tmp_path, result(), {**result(), "schema_version": 2}) == 2
    assert "new.json: schema_version: expected 1, got 2" in capsys.readouterr().err


def test_missing_field_exits_2_naming_the_path(tmp_path, capsys):
    new = result()
    del new["results"]["transformers"]["e2e_ms"]["p99"]
    assert run(tmp_path, result(), new) == 2
    assert "results.transformers.e2e_ms.p99: missing" in capsys.readouterr().err


@pytest.mark.parametrize("new, message", [
    (result(num_prompts=3, input_lens=[32, 64, 8], output_lens=[16, 16, 16]),
     "workload.num_prompts: 2 vs 3"),
    (result(seed=1), "workload.seed: 0 vs 1"),
    (result(output_lens=[16, 32]), "workload.output_lens"),
    ({**result(), "dtype": "bfloat16"}, "dtype: 'float32' vs 'bfloat16'"),
])
def test_different_runs_exit_2_with_the_difference(tmp_path, capsys, new, message):
    assert run(tmp_path, result(), new) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and message in err


def test_different_systems_are_not_comparable():
    only_fi = build_result("throughput", "smollm2-135m", "float32", "cpu",
                           result()["workload"], {"fastinfer": system()}, ENV)
    with pytest.raises(CompareError, match="different systems"):
        compare(result(), only_fi)


def test_bad_threshold_metric_or_mode_exit_2(tmp_path, capsys):
    assert run(tmp_path, result(), result(), threshold="fast") == 2
    assert "threshold" in capsys.readouterr().err
    assert run(tmp_path, result(), result(), metrics=["ttft"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert run(tmp_path, result(), result(), on="relative") == 2
    assert "on must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("5", 0.05),
                                         (" 12.5% ", 0.125), ("0", 0.0), (0.1, 0.1)])
def test_parse_threshold(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "%", "five", "-5%", "nan", "inf"])
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


def test_table_is_aligned_and_marks_missing_values():
    base = result()
    base["results"]["transformers"]["ttft_ms"]["p50"] = None
    report = compare(base, result())
    lines = report.to_table().splitlines()
    rows = lines[2:2 + len(report.rows)]
    assert len({line.index("higher") if "higher" in line else line.index("lower")
                for line in rows}) == 1
    row = next(line for line in rows if line.startswith("transformers") and "ttft_ms.p50" in line)
    assert "n/a" in row and not report.regressed
