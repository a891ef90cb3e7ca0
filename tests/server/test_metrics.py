"""ServerMetrics: the exposed names and labels, the token and success counters, the
preemption-counter difference and removal of an unloaded version's series."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fastinfer.server.metrics import ServerMetrics

EXPECTED_SAMPLE_NAMES = {
    "fastinfer:time_to_first_token_seconds_bucket",
    "fastinfer:inter_token_latency_seconds_bucket",
    "fastinfer:e2e_request_latency_seconds_bucket",
    "fastinfer:request_queue_time_seconds_bucket",
    "fastinfer:prompt_tokens_total",
    "fastinfer:generation_tokens_total",
    "fastinfer:request_success_total",
    "fastinfer:num_preemptions_total",
    "fastinfer:num_requests_running",
    "fastinfer:num_requests_waiting",
    "fastinfer:kv_cache_usage_perc",
}

STATS = {"num_running": 3, "num_waiting": 2, "kv_blocks_total": 200, "kv_blocks_free": 150,
         "num_preemptions": 0}


def samples(metrics: ServerMetrics) -> list:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(metrics) if s.name == name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def fill(metrics: ServerMetrics, model: str, version: str) -> None:
    metrics.first_token(model, version, 0.05)
    metrics.tokens(model, version, 4, 0.08)
    metrics.finished(model, version, queue_time_s=0.01, e2e_s=0.5, prompt_tokens=7,
                     generation_tokens=5, finish_reason="stop")
    metrics.engine_stats(model, version, STATS)


def test_exposed_names_are_vllm_names_with_prefix_and_carry_model_labels():
    metrics = ServerMetrics()
    fill(metrics, "chat", "v1")
    found = samples(metrics)
    assert EXPECTED_SAMPLE_NAMES <= {s.name for s in found}
    for s in found:
        if s.name.startswith("fastinfer:"):
            assert s.labels["model_name"] == "chat" and s.labels["model_version"] == "v1", s
    assert not any(s.name.endswith("_total_total") for s in found)


def test_two_instances_do_not_share_a_registry():
    first, second = ServerMetrics(), ServerMetrics()
    first.first_token("chat", "v1", 0.1)
    assert value(first, "fastinfer:time_to_first_token_seconds_count", model_name="chat") == 1
    assert value(second, "fastinfer:time_to_first_token_seconds_count", model_name="chat") is None


def test_tokens_observes_one_inter_token_latency_per_token():
    metrics = ServerMetrics()
    metrics.tokens("chat", "v1", 4, 0.08)
    metrics.tokens("chat", "v1", 1, None)  # skipped
    assert value(metrics, "fastinfer:inter_token_latency_seconds_count") == 4
    assert abs(value(metrics, "fastinfer:inter_token_latency_seconds_sum") - 0.08) < 1e-9
    # each observation is 0.02 s: none falls in the 0.01 bucket, all in the 0.025 one
    assert value(metrics, "fastinfer:inter_token_latency_seconds_bucket", le="0.01") == 0
    assert value(metrics, "fastinfer:inter_token_latency_seconds_bucket", le="0.025") == 4


def test_aborted_requests_count_tokens_but_not_success():
    metrics = ServerMetrics()
    for reason in ("stop", "length", "length", "abort", "error"):
        metrics.finished("chat", "v2", queue_time_s=None, e2e_s=1.0, prompt_tokens=10,
                         generation_tokens=3, finish_reason=reason)
    assert value(metrics, "fastinfer:prompt_tokens_total") == 50
    assert value(metrics, "fastinfer:generation_tokens_total") == 15
    assert value(metrics, "fastinfer:request_success_total", finish_reason="stop") == 1
    assert value(metrics, "fastinfer:request_success_total", finish_reason="length") == 2
    assert value(metrics, "fastinfer:request_success_total", finish_reason="abort") is None
    assert value(metrics, "fastinfer:e2e_request_latency_seconds_count") == 5
    assert value(metrics, "fastinfer:request_queue_time_seconds_count") is None


def test_engine_stats_sets_gauges_and_kv_usage_as_a_fraction():
    metrics = ServerMetrics()
    metrics.engine_stats("chat", "v1", STATS)
    assert value(metrics, "fastinfer:num_requests_running") == 3
    assert value(metrics, "fastinfer:num_requests_waiting") == 2
    assert value(metrics, "fastinfer:kv_cache_usage_perc") == 0.25


def test_preemption_counter_grows_by_the_difference_per_version():
    metrics = ServerMetrics()
    for cumulative in (2, 5, 5, 9):
        metrics.engine_stats("chat", "v1", {"num_preemptions": cumulative})
    metrics.engine_stats("chat", "v2", {"num_preemptions": 1})
    assert value(metrics, "fastinfer:num_preemptions_total", model_version="v1") == 9
    assert value(metrics, "fastinfer:num_preemptions_total", model_version="v2") == 1
    # a restarted engine counts from zero again: its whole count is new
    metrics.engine_stats("chat", "v1", {"num_preemptions": 3})
    assert value(metrics, "fastinfer:num_preemptions_total", model_version="v1") == 12


def test_remove_drops_every_series_of_one_version_only():
    metrics = ServerMetrics()
    fill(metrics, "chat", "v1")
    fill(metrics, "chat", "v2")
    metrics.remove("chat", "v2")
    versions = {s.labels.get("model_version") for s in samples(metrics) if s.name.startswith("fastinfer:")}
    assert versions == {"v1"}
    metrics.remove("chat", "never-loaded")  # harmless
    # a version loaded again under the same label starts from zero preemptions
    metrics.engine_stats("chat", "v2", {"num_preemptions": 4})
    assert value(metrics, "fastinfer:num_preemptions_total", model_version="v2") == 4
