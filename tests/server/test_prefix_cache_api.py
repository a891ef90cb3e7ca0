"""The server reports the prefix cache, through the real ``openai`` client on 127.0.0.1:
``usage.prompt_tokens_details.cached_tokens`` (whole and streamed responses, completions and
chat), the ``/metrics`` prefix-cache counters and host-tier gauges, and the body's ``priority``
(vLLM's field) reaching the engine or refused with 400. The live server and the tiny model
are this folder's fixtures."""
from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastinfer.server.metrics import ServerMetrics

from .conftest import API_KEY, ServerSpec, start_server

BLOCK = 16  # the engines' KV block size (EngineConfig's default)
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@pytest.fixture(scope="module")
def api(bank, tmp_path_factory):
    """One server for the module: chat@v1 (tests/server's default backend)."""
    server = start_server(bank, ServerSpec(), tmp_path_factory.mktemp("prefix-cache") / "audit.jsonl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return api.client()


def long_prompt(tag: str) -> str:
    """A prompt of well over 4 KV blocks whose every block is new to the cache (``tag`` first)."""
    return f"Request {tag}: " + " ".join(WORDS * 3)


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def engine_metrics(api) -> dict[str, float]:
    """``/metrics``' samples of chat@v1, by sample name."""
    text = httpx.get(api.url + "/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("model_name") == "chat" and s.labels.get("model_version") == "v1"}


# --------------------------------------------------------------------------- usage
def test_completion_repeat_reads_the_prompt_from_the_cache(client):
    kwargs = dict(model="chat", prompt=long_prompt("completion"), max_tokens=4, **GREEDY)
    first = client.completions.create(**kwargs)
    assert first.usage.prompt_tokens > 4 * BLOCK
    assert cached(first.usage) == 0
    again = client.completions.create(**kwargs)
    assert 4 * BLOCK <= cached(again.usage) < again.usage.prompt_tokens  # the last token is computed
    assert again.choices[0].text == first.choices[0].text


def test_streamed_usage_carries_cached_tokens(client):
    kwargs = dict(model="chat", prompt=long_prompt("stream"), max_tokens=4, stream=True,
                  stream_options={"include_usage": True}, **GREEDY)
    *_, first = list(client.completions.create(**kwargs))
    *_, again = list(client.completions.create(**kwargs))
    assert first.choices == [] and cached(first.usage) == 0
    assert again.choices == [] and 4 * BLOCK <= cached(again.usage) < again.usage.prompt_tokens


def test_chat_usage_carries_cached_tokens_whole_and_streamed(client):
    messages = [{"role": "user", "content": long_prompt("chat")}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=3, **GREEDY)
    assert 0 <= cached(whole.usage) < whole.usage.prompt_tokens  # the chat template's start may be cached
    *_, last = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=3, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert 4 * BLOCK <= cached(last.usage) < last.usage.prompt_tokens


def test_whole_body_has_prompt_tokens_details_in_openai_shape(api):
    body = {"model": "chat", "prompt": "Hello there", "max_tokens": 2}
    r = httpx.post(api.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # a prompt under one block


# --------------------------------------------------------------------------- metrics
def test_metrics_prefix_cache_counters_move(api, client):
    before = engine_metrics(api)
    kwargs = dict(model="chat", prompt=long_prompt("metrics"), max_tokens=2, **GREEDY)
    client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    after = engine_metrics(api)
    queries = after["fastinfer:prefix_cache_queries_total"] - before.get("fastinfer:prefix_cache_queries_total", 0)
    hits = after["fastinfer:prefix_cache_hits_total"] - before.get("fastinfer:prefix_cache_hits_total", 0)
    assert hits >= cached(again.usage) > 0
    assert queries >= hits + cached(again.usage)  # the first request looked its prompt up too
    stats = api.engine().stats()
    assert after["fastinfer:kv_offload_blocks"] == stats["kv_offload_blocks"]
    assert after["fastinfer:kv_offload_blocks_total"] == stats["kv_offload_blocks_total"]
    assert after["fastinfer:num_swapped"] == stats["num_swapped"]


def _value(metrics: ServerMetrics, name: str, version: str) -> float | None:
    body, _ = metrics.render()
    found = [s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
             if s.name == name and s.labels["model_version"] == version]
    return found[0] if found else None


def test_prefix_cache_counters_grow_by_the_difference_and_gauges_follow_the_host_tier():
    metrics = ServerMetrics()
    for queries, hits in ((100, 0), (260, 96), (260, 96), (400, 200)):
        metrics.engine_stats("chat", "v1", {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
                                            "kv_offload_blocks": 3, "kv_offload_blocks_total": 64,
                                            "num_swapped": 1})
    assert _value(metrics, "fastinfer:prefix_cache_queries_total", "v1") == 400
    assert _value(metrics, "fastinfer:prefix_cache_hits_total", "v1") == 200
    assert _value(metrics, "fastinfer:kv_offload_blocks", "v1") == 3
    assert _value(metrics, "fastinfer:kv_offload_blocks_total", "v1") == 64
    assert _value(metrics, "fastinfer:num_swapped", "v1") == 1
    metrics.engine_stats("chat", "v1", {"prefix_cache_queries": 50, "prefix_cache_hits": 10})  # a restart
    assert _value(metrics, "fastinfer:prefix_cache_queries_total", "v1") == 450
    assert _value(metrics, "fastinfer:prefix_cache_hits_total", "v1") == 210
    metrics.remove("chat", "v1")
    assert _value(metrics, "fastinfer:prefix_cache_hits_total", "v1") is None
    assert _value(metrics, "fastinfer:kv_offload_blocks_total", "v1") is None
    metrics.engine_stats("chat", "v1", {"prefix_cache_hits": 7})  # loaded again: counts from zero
    assert _value(metrics, "fastinfer:prefix_cache_hits_total", "v1") == 7


# --------------------------------------------------------------------------- priority
def test_body_priority_reaches_the_engine(api, client):
    inner = api.engine().engine
    seen: list[int] = []
    add = inner.add_request

    def spying_add(*args, **kwargs):  # runs in the engine's thread
        seen.append(kwargs.get("priority"))
        return add(*args, **kwargs)

    inner.add_request = spying_add
    try:
        client.completions.create(model="chat", prompt=["one", "two"], max_tokens=1, extra_body={"priority": -3})
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"priority": 7})
        client.completions.create(model="chat", prompt="three", max_tokens=1)
    finally:
        del inner.add_request  # back to the class's method
    assert seen == [-3, -3, 7, 0]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("priority", ["high", 1.5, True, None, 2**63])
def test_non_int_priority_is_400_naming_it(client, endpoint, priority):
    if endpoint == "completions":
        create, valid = client.completions.create, {"prompt": "hi"}
    else:
        create, valid = client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError) as err:
        create(model="chat", max_tokens=1, **valid, extra_body={"priority": priority})
    assert err.value.status_code == 400 and err.value.param == "priority"
    assert "priority" in err.value.message
