"""The OpenAI-compatible server end to end, through the real ``openai`` client on 127.0.0.1:
completions and chat against the offline engine token for token, streaming, stop strings,
``n > 1`` and prompt batches, logprobs, seeds, model routing, the audit log and metrics, and
the 400, 401, 403, 404, 413, 429 and 503 paths."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .conftest import (ADMIN_KEY, API_KEY, Backend, DEFAULT_BACKENDS, ServerSpec, finish_tally, policy,
                       read_audit, start_server)

PROMPT = "The capital of France is"
OTHER_PROMPT = "Once upon a time there was"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi to the tests"}]
LIMITED_KEY, SERIAL_ONLY_KEY = "sk-limited", "sk-serial-only"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def api(bank, tmp_path_factory):
    """One server for the module: chat@v1, and serial@v1 (one sequence at a time, a queue of one);
    keys: API_KEY (no limits), LIMITED_KEY (2 requests a minute), SERIAL_ONLY_KEY (model serial)."""
    spec = ServerSpec(
        loads=[("chat", "v1", "v1"), ("serial", "v1", "serial")],
        backends={**DEFAULT_BACKENDS, "serial": Backend(max_num_seqs=1, max_queued_requests=1)},
        policies=[policy("limited", LIMITED_KEY, requests_per_minute=2),
                  policy("serial-only", SERIAL_ONLY_KEY, models=["serial"])])
    server = start_server(bank, spec, tmp_path_factory.mktemp("api") / "audit.jsonl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return api.client()


@pytest.fixture(scope="module")
def tok(api):
    return api.engine().get_tokenizer()


def chat_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


# --------------------------------------------------------------------------- generation
def test_completion_equals_offline_engine(client, tok, bank):
    r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=10, **GREEDY)
    ids = tok.encode(PROMPT)
    want = bank.greedy(ids, 10)
    assert r.object == "text_completion" and r.model == "chat@v1" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == want.text and choice.index == 0 and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)


def test_token_id_prompt_equals_text_prompt(client, tok):
    by_text = client.completions.create(model="chat", prompt=PROMPT, max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model="chat", prompt=tok.encode(PROMPT), max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_equals_offline_engine_on_the_chat_template(client, tok, bank):
    r = client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=9, **GREEDY)
    ids = chat_ids(tok, CHAT)
    want = bank.greedy(ids, 9)
    assert r.object == "chat.completion" and r.model == "chat@v1" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 9)


def test_streamed_completion_adds_up_to_the_whole(client):
    whole = client.completions.create(model="chat", prompt=PROMPT, max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="chat", prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    *deltas, usage = chunks
    assert "".join(c.choices[0].text for c in deltas) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason] == ["length"]
    assert deltas[-1].choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {"chat@v1"}


def test_streamed_chat_sends_the_role_first(client):
    whole = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, max_tokens=10, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert reasons == ["length"] and chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def _stop_in(text: str) -> str:
    """A two-character piece of ``text`` that first occurs past its start."""
    for i in range(2, len(text) - 2):
        piece = text[i:i + 2]
        if piece.strip() == piece and text.find(piece) == i:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_cuts_the_text_before_it(client, stream):
    full = client.completions.create(model="chat", prompt=OTHER_PROMPT, max_tokens=16, **GREEDY).choices[0].text
    stop = _stop_in(full)
    kwargs = dict(model="chat", prompt=OTHER_PROMPT, max_tokens=16, stop=["never-there", stop], **GREEDY)
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == full[:full.index(stop)] and reason == "stop"


def test_chat_stop_string(client):
    full = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=16, **GREEDY)
    stop = _stop_in(full.choices[0].message.content)
    r = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=16, stop=stop, **GREEDY)
    content = full.choices[0].message.content
    assert r.choices[0].message.content == content[:content.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_greedy_choices_are_identical(client):
    one = client.completions.create(model="chat", prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text
    r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=8, n=3, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == [one] * 3
    assert r.usage.completion_tokens == 24


def test_prompt_batch_with_n_orders_choices_by_prompt(client, tok, bank):
    r = client.completions.create(model="chat", prompt=[PROMPT, OTHER_PROMPT], max_tokens=7, n=2, **GREEDY)
    want = [bank.greedy(tok.encode(p), 7).text for p in (PROMPT, OTHER_PROMPT)]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]


def test_n_streamed_chat_choices_each_finish_once(client):
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, max_tokens=6, n=3, temperature=1.0,
                                                 seed=5, stream=True))
    finishes = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason)
    assert finishes == [0, 1, 2]
    whole = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=6, n=3, temperature=1.0, seed=5)
    streamed = ["".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i) for i in range(3)]
    assert streamed == [c.message.content for c in whole.choices]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int, n: int = 3) -> list[str]:
        r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=12, temperature=1.0, n=n, seed=seed,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in r.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first)) > 1, "n samples at temperature 1 should differ from each other"
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_completion_logprobs_match_the_engine(client, tok, bank):
    r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    want = bank.greedy(tok.encode(PROMPT), 6, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    expected = [d[t] for t, d in zip(want.token_ids, want.logprobs)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-5)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the best
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_and_top_logprobs(client, tok, bank):
    r = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    want = bank.greedy(chat_ids(tok, CHAT), 5, logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert [c.logprob for c in content] == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)],
                                                         abs=1e-5)
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=3, **GREEDY)
    assert plain.choices[0].logprobs is None


# --------------------------------------------------------------------------- routing, audit, metrics
def test_models_lists_names_and_versions(client):
    assert [m.id for m in client.models.list()] == ["chat", "chat@v1", "serial", "serial@v1"]


def test_pinned_version_is_named_in_the_response(client):
    assert client.completions.create(model="chat@v1", prompt=PROMPT, max_tokens=1).model == "chat@v1"
    assert client.chat.completions.create(model="serial", messages=CHAT, max_tokens=1).model == "serial@v1"


@pytest.mark.parametrize("model", ["nope", "chat@v9"])
def test_unknown_model_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


def test_audit_line_and_metrics_of_a_request(api, client):
    r = client.completions.create(model="chat", prompt=OTHER_PROMPT, max_tokens=4, **GREEDY)
    (line,) = [entry for entry in read_audit(api.audit_path) if entry["request_id"] == r.id]
    assert line["status"] == 200 and line["finish_reason"] == "length" and line["key_id"] == "key-1"
    assert (line["model"], line["version"], line["output_tokens"]) == ("chat", "v1", 4)
    assert line["endpoint"] == "/v1/completions" and "prompt" not in line
    metrics = httpx.get(api.url + "/metrics").text
    assert 'fastinfer:request_success_total{finish_reason="length",model_name="chat",model_version="v1"}' in metrics
    assert 'fastinfer:kv_cache_usage_perc{model_name="chat",model_version="v1"}' in metrics


# --------------------------------------------------------------------------- refusals
def test_wrong_or_missing_key_is_401(api):
    with pytest.raises(openai.AuthenticationError) as err:
        api.client("sk-wrong").completions.create(model="chat", prompt=PROMPT, max_tokens=1)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert httpx.post(api.url + "/v1/completions", json={"model": "chat", "prompt": "x"}).status_code == 401
    assert httpx.get(api.url + "/v1/models", headers={"Authorization": "Basic " + API_KEY}).status_code == 401
    # The API key is no admin key.
    admin = httpx.get(api.url + "/admin/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert admin.status_code == 401
    assert httpx.get(api.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200


def test_key_limited_to_other_models_is_403(api):
    serial_only = api.client(SERIAL_ONLY_KEY)
    with pytest.raises(openai.PermissionDeniedError) as err:
        serial_only.completions.create(model="chat", prompt=PROMPT, max_tokens=1)
    assert err.value.status_code == 403 and err.value.code == "model_not_allowed"
    assert [m.id for m in serial_only.models.list()] == ["serial", "serial@v1"]
    assert serial_only.completions.create(model="serial", prompt=PROMPT, max_tokens=1).choices


@pytest.mark.parametrize("endpoint,change,param", [
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"temperature": 3}, "temperature"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"bogus": 1}, "bogus"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [7] * 600}, None),  # longer than max_model_len (512)
    ("completions", {"stream_options": {"include_usage": True}}, None),  # without stream
    ("chat", {"top_logprobs": 2}, None),  # without logprobs
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ("chat", {"messages": []}, "messages"),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v))
def test_invalid_body_is_400(client, endpoint, change, param):
    # The bad values go in extra_body, which overrides the valid request's fields as sent.
    if endpoint == "completions":
        create, valid = client.completions.create, {"prompt": PROMPT}
    else:
        create, valid = client.chat.completions.create, {"messages": CHAT}
    with pytest.raises(openai.BadRequestError) as err:
        create(model="chat", max_tokens=2, **valid, extra_body=change)
    assert err.value.status_code == 400 and err.value.type == "invalid_request_error"
    if param is not None:
        assert err.value.param is not None and err.value.param.startswith(param)


def test_malformed_json_is_400(api):
    r = httpx.post(api.url + "/v1/completions", content=b'{"model": "chat", "prompt": ',
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_413_declared_or_chunked(api, client):
    limit = api.state.max_body_bytes
    body = json.dumps({"model": "chat", "prompt": "x" * (2 * limit), "max_tokens": 1}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    declared = httpx.post(api.url + "/v1/completions", content=body, headers=headers)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def pieces():
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    chunked = httpx.post(api.url + "/v1/completions", content=pieces(), headers=headers)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="chat", prompt="y" * (2 * limit), max_tokens=1)
    assert err.value.status_code == 413
    assert client.completions.create(model="chat", prompt=PROMPT, max_tokens=1).choices  # still serving


def test_requests_per_minute_quota_is_429_with_retry_after(api):
    limited = api.client(LIMITED_KEY)
    for _ in range(2):
        limited.completions.create(model="chat", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        limited.completions.create(model="chat", prompt=PROMPT, max_tokens=1)
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    # Other keys are not affected.
    assert api.client().completions.create(model="chat", prompt=PROMPT, max_tokens=1).choices


def test_full_engine_queue_is_429_then_serves_again(api, client):
    long = dict(model="serial", prompt=PROMPT, max_tokens=500, temperature=0, extra_body={"ignore_eos": True})
    running = client.completions.create(stream=True, **long)
    next(iter(running))  # the one sequence slot is taken
    queued = client.completions.create(stream=True, **long)  # accepted (headers sent): waits in the queue
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="serial", prompt=PROMPT, max_tokens=1)
        assert err.value.code == "engine_overloaded" and err.value.response.headers["retry-after"] == "1"
    finally:
        running.close()
        queued.close()
    api.wait_idle([api.engine("serial")])
    assert client.completions.create(model="serial", prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def _e2e_count(api, model: str) -> float:
    key = f'fastinfer:e2e_request_latency_seconds_count{{model_name="{model}",model_version="v1"}} '
    line = next((ln for ln in httpx.get(api.url + "/metrics").text.splitlines() if ln.startswith(key)), None)
    return 0.0 if line is None else float(line.split()[-1])


def test_client_leaving_a_non_streamed_request_aborts_it(api):
    e2e_before = _e2e_count(api, "serial")
    before = len(read_audit(api.audit_path))
    finishes = finish_tally(api.engine("serial"))
    body = {"model": "serial", "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}  # about a second
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(5.0, read=0.15))
    api.wait_idle([api.engine("serial")])
    deadline = time.monotonic() + 10
    while len(read_audit(api.audit_path)) == before:
        assert time.monotonic() < deadline, "no audit line for the request the client left"
        time.sleep(0.05)
    (line,) = read_audit(api.audit_path)[before:]
    assert line["status"] == 499 and line["finish_reason"] == "abort"
    assert line["model"] == "serial" and line["output_tokens"] < 500
    assert finishes == {"abort": 1}
    assert _e2e_count(api, "serial") == e2e_before + 1  # the metrics count the request too


def test_draining_server_answers_503(serve):
    server = serve()
    client = server.client()
    server.state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="chat", prompt=PROMPT, max_tokens=1)
        assert err.value.status_code == 503 and err.value.code == "draining"
        assert err.value.response.headers["retry-after"] == "5"
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="chat", messages=CHAT, max_tokens=1, stream=True)
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.state.draining = False
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert client.completions.create(model="chat", prompt=PROMPT, max_tokens=1).choices


def test_refused_requests_hold_nothing(serve):
    """A request the engine refuses (one prompt of a batch too long) leaves no request running and
    no in-flight count on its version, which would stall the version's unload."""
    server = serve()
    engine = server.engine()
    finishes = finish_tally(engine)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="chat", prompt=[[5] * 8, [7] * 600], max_tokens=400,
                                           extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="chat", prompt=[7] * 600, max_tokens=1)
    server.wait_idle([engine])
    assert finishes == {"abort": 1}  # the accepted first prompt was aborted, not run to its end
    listing = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert [m["in_flight"] for m in listing["models"]] == [0]


def test_a_long_prompt_is_tokenized_off_the_loop_and_refused_when_too_long(client):
    """Over 8192 characters the prompt is tokenized in a worker thread; the tiny model's 512
    positions cannot hold it, so the request is refused with 400 naming the limit."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chat", prompt="word " * 2000, max_tokens=1)
    assert err.value.status_code == 400 and "max_model_len" in str(err.value)
    r = client.completions.create(model="chat", prompt="word " * 60, max_tokens=2, **GREEDY)
    assert r.usage.completion_tokens == 2
