"""``fastinfer bench kv-cache`` on a tiny random model: every workload runs in a small
configuration and writes its document, and the counters show the cache at work (hits with it
on and none with it off, fewer prompt tokens computed, blocks loaded back from the host tier).
No timing is asserted."""
from __future__ import annotations

import json

import pytest

from fastinfer.bench.kv_cache import HOST, OFF, ON, RECOMPUTE, sched_step_times
from fastinfer.bench.schema import collect_env
from fastinfer.cli.main import main

from .conftest import save_tiny_model

SMALL = ["--conversations", "2", "--turns", "3", "--message-len", "20", "--turn-output-len", "6",
         "--offload-prefix-len", "96", "--offload-question-len", "8", "--offload-reps", "2",
         "--mixed-prompt-len", "160", "--mixed-decoders", "3", "--mixed-decoder-prompt-len", "16",
         "--mixed-output-len", "12", "--sched-seqs", "8,32", "--sched-steps", "5"]


@pytest.fixture(scope="module")
def result(tmp_path_factory, hf_smollm_tokenizer):
    folder = tmp_path_factory.mktemp("kv-bench")
    model = save_tiny_model(folder / "llama", "llama", hf_smollm_tokenizer)
    paths = {"json": str(folder / "out" / "kv.json"), "md": str(folder / "out" / "kv.md")}
    code = main(["bench", "kv-cache", "--model", model, "--dtype", "float32", "--device", "cpu", *SMALL,
                 "--json", paths["json"], "--markdown", paths["md"]])
    assert code == 0
    with open(paths["json"]) as f:
        doc = json.load(f)
    with open(paths["md"]) as f:
        return doc, f.read()


def test_the_document_names_the_machine_and_every_workload(result):
    doc, markdown = result
    assert doc["schema_version"] == 1 and doc["command"] == "kv-cache" and doc["dtype"] == "float32"
    assert doc["cpu"] == collect_env()["cpu"] and doc["cpu"] in markdown
    assert list(doc["workloads"]) == ["multiturn", "offload", "mixed", "sched"]
    for name in doc["workloads"]:
        assert f"### {name}" in markdown


def test_multiturn_reads_the_history_from_the_cache(result):
    r = result[0]["workloads"]["multiturn"]
    on, off = r["systems"][ON], r["systems"][OFF]
    assert [t["turn"] for t in on["turns"]] == [1, 2, 3] == [t["turn"] for t in off["turns"]]
    # the same prompts on both engines: the history grows by a message and an answer per turn
    lens = [t["prompt_tokens"] for t in on["turns"]]
    assert lens == [t["prompt_tokens"] for t in off["turns"]] and lens[0] == 2 * 20 and lens[1] == lens[0] + 2 * (6 + 20)
    assert on["turns"][0]["cached_prompt_tokens"] == 0  # nothing to reuse on the first turn
    assert all(t["cached_prompt_tokens"] > 0 for t in on["turns"][1:])
    assert all(t["cached_prompt_tokens"] == 0 for t in off["turns"])
    assert on["counters"]["prefix_cache_hits"] > 0 and off["counters"]["prefix_cache_hits"] == 0
    computed = {name: sum(t["prompt_tokens"] - t["cached_prompt_tokens"] for t in s["turns"])
                for name, s in r["systems"].items()}
    assert computed[ON] < computed[OFF] == sum(lens)
    for s in (on, off):
        assert s["turns"][-1]["ttft_ms"]["p50"] > 0 and s["last_over_first_ttft_p50"] > 0
    assert set(r["met"]) == {"last_over_first_ttft_p50_max"}


def test_offload_loads_the_evicted_prefix_back_from_the_host_tier(result):
    r = result[0]["workloads"]["offload"]
    host, recompute = r["systems"][HOST], r["systems"][RECOMPUTE]
    prefix_blocks = 96 // 16
    assert len(host["rehit_ttft_ms"]) == 2 == len(recompute["rehit_ttft_ms"])  # --offload-reps 2
    assert host["host_blocks"] > 0 and recompute["host_blocks"] == 0
    assert host["device_blocks"] == recompute["device_blocks"]
    for rep in range(2):
        assert host["stores_during_fill"][rep] >= prefix_blocks  # the prefix left the device pool...
        assert host["loads_on_rehit"][rep] >= prefix_blocks  # ...and came back from the host tier
        assert host["rehit_cached_tokens"][rep] >= 96
        assert recompute["loads_on_rehit"][rep] == 0 and recompute["rehit_cached_tokens"][rep] == 0  # evicted
    assert r["reload_speedup"] > 0 and r["config"]["fill_requests"] >= 1


def test_mixed_times_the_decoders_and_the_long_prompt(result):
    r = result[0]["workloads"]["mixed"]
    assert set(r["systems"]) == {ON, OFF}
    for s in r["systems"].values():
        assert s["itl_ms"]["p99"] >= s["itl_ms"]["p50"] > 0 and s["itl_max_ms"] >= s["itl_ms"]["p99"]
        assert s["tpot_ms"]["p99"] > 0 and s["long_ttft_ms"] > 0 and s["long_prefill_steps"] >= 1
        assert s["long_cached_tokens"] == 0  # a new prompt: nothing cached


def test_sched_times_both_sizes_with_the_cache_on_and_off(result):
    r = result[0]["workloads"]["sched"]
    for name in (ON, OFF):
        assert set(r["systems"][name]) == {"8", "32"}
        for s in r["systems"][name].values():
            assert s["step_ms"]["p50"] >= s["schedule_ms"]["p50"] > 0
    assert r["met"] == {}  # the targets are for 256 and 1,024 sequences


@pytest.mark.parametrize("caching", [True, False])
def test_sched_step_times_schedules_every_sequence_each_step(caching):
    # a budget of 100 tokens: prompts are admitted in pieces, some after a cached first half
    times = sched_step_times(40, caching, prompt_len=96, steps=7, budget=100)
    assert len(times["schedule"]) == len(times["step"]) == 7
    assert all(s <= t for s, t in zip(times["schedule"], times["step"]))


def test_the_command_line_knows_every_workload():
    from fastinfer.bench.kv_cache import WORKLOADS
    from fastinfer.cli.bench import KV_WORKLOADS

    assert KV_WORKLOADS == WORKLOADS


def test_bad_kv_cache_arguments_are_refused_when_parsed(capsys):
    for argv, message in ((["--workload", "nope"], "invalid choice: 'nope'"),
                          (["--sched-seqs", "0,4"], "expected ints >= 1"),
                          (["--turns", "0"], "value must be an int >= 1, got 0")):
        with pytest.raises(SystemExit) as info:
            main(["bench", "kv-cache", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
