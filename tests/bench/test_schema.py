"""The benchmark result document: percentiles, environment, ratios, validation and loading."""
from __future__ import annotations

import copy
import json

import pytest

from fastinfer.bench.schema import (SCHEMA_VERSION, SchemaError, build_result, collect_env,
                                    load_result, percentiles, validate)

ENV = {"fastinfer": "0.1.0", "torch": "2.0", "python": "3.11.0", "cpu": "test cpu", "gpu": None,
       "git_sha": None, "threads": 2}
WORKLOAD = {"name": "mixed", "num_prompts": 3, "seed": 0, "input_lens": [10, 20, 30],
            "output_lens": [4, 5, 6]}


def system(throughput: float, ttft_p50: float = 10.0) -> dict:
    stats = {"mean": 12.0, "p50": 11.0, "p90": 15.0, "p99": 19.0}
    return {"output_throughput_tok_s": throughput, "request_throughput_req_s": throughput / 10,
            "total_time_s": 2.0, "ttft_ms": {**stats, "p50": ttft_p50}, "tpot_ms": dict(stats),
            "e2e_ms": dict(stats), "peak_memory_mb": 512.0}


def make_doc(**results) -> dict:
    results = results or {"fastinfer": system(300.0), "transformers": system(100.0)}
    return build_result("throughput", "smollm2-135m", "float32", "cpu", dict(WORKLOAD),
                        results, dict(ENV))


def test_percentiles_match_linear_interpolation():
    stats = percentiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert stats["mean"] == pytest.approx(3.0)
    assert stats["p50"] == pytest.approx(3.0)
    assert stats["p90"] == pytest.approx(4.6)
    assert stats["p99"] == pytest.approx(4.96)


def test_percentiles_of_one_value_and_of_nothing():
    assert percentiles([7.5]) == {"mean": 7.5, "p50": 7.5, "p90": 7.5, "p99": 7.5}
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_build_result_computes_ratios_against_fastinfer():
    doc = make_doc()
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["ratios"] == {"transformers": pytest.approx(3.0)}
    assert json.loads(json.dumps(doc)) == doc  # plain JSON round trip


def test_build_result_without_fastinfer_has_no_ratios_and_zero_throughput_gives_null():
    assert make_doc(transformers=system(100.0))["ratios"] == {}
    assert make_doc(fastinfer=system(100.0), naive=system(0.0))["ratios"] == {"naive": None}


def test_build_result_rejects_bad_results_naming_the_field():
    bad = system(100.0)
    del bad["tpot_ms"]["p90"]
    with pytest.raises(SchemaError, match=r"results\.transformers\.tpot_ms\.p90: missing"):
        make_doc(fastinfer=system(200.0), transformers=bad)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["results"]["transformers"]["ttft_ms"].__setitem__("p50", "fast"),
     r"results\.transformers\.ttft_ms\.p50: expected a number or null, got str"),
    (lambda d: d["results"]["fastinfer"].__setitem__("output_throughput_tok_s", float("nan")),
     r"results\.fastinfer\.output_throughput_tok_s: expected a finite number"),
    (lambda d: d["results"]["fastinfer"].__setitem__("total_time_s", True),
     r"results\.fastinfer\.total_time_s: expected a number, got bool"),
    (lambda d: d["workload"].pop("seed"), r"workload\.seed: missing"),
    (lambda d: d["workload"]["input_lens"].append(5), r"workload\.input_lens: expected num_prompts=3"),
    (lambda d: d["workload"]["output_lens"].__setitem__(1, 2.5),
     r"workload\.output_lens\[1\]: expected an integer, got float"),
    (lambda d: d.pop("dtype"), r"^dtype: missing"),
    (lambda d: d["env"].__setitem__("threads", "2"), r"env\.threads: expected an integer"),
    (lambda d: d.__setitem__("results", {}), r"results: expected at least one system"),
    (lambda d: d["ratios"].__setitem__("llamacpp", 2.0), r"ratios\.llamacpp: no such system"),
    (lambda d: d.__setitem__("schema_version", 2), r"schema_version: expected 1, got 2"),
])
def test_validate_names_the_bad_field(mutate, message):
    doc = copy.deepcopy(make_doc())
    mutate(doc)
    with pytest.raises(SchemaError, match=message):
        validate(doc)


def test_validate_accepts_unknown_extra_fields_and_null_measurements():
    doc = make_doc()
    doc["notes"] = "added by a later version"
    doc["results"]["transformers"]["peak_memory_mb"] = None
    doc["results"]["transformers"]["ttft_ms"] = percentiles([])
    validate(doc)


def test_collect_env_reports_versions_and_threads():
    import torch

    import fastinfer

    env = collect_env(threads=3)
    assert env["fastinfer"] == fastinfer.__version__
    assert env["torch"] == torch.__version__
    assert env["threads"] == 3
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["gpu"] is None or isinstance(env["gpu"], str)
    assert env["git_sha"] is None or len(env["git_sha"]) == 40
    assert collect_env()["threads"] == torch.get_num_threads()
    validate({**make_doc(), "env": env})


def test_load_result_round_trips_a_written_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(make_doc()))
    assert load_result(path) == make_doc()


def test_load_result_errors_name_the_file(tmp_path):
    with pytest.raises(SchemaError, match=r"missing\.json: no such file"):
        load_result(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,')
    with pytest.raises(SchemaError, match=r"broken\.json: not valid JSON"):
        load_result(broken)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**make_doc(), "schema_version": 99}))
    with pytest.raises(SchemaError, match=r"future\.json: schema_version: expected 1, got 99"):
        load_result(future)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(SchemaError, match=r"list\.json: document: expected an object, got list"):
        load_result(listed)
