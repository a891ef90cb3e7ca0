"""The server against a hostile or careless user (issue 23), through the real ``openai`` client,
httpx and raw sockets: what a key outside a model's scope learns, defaults that fit the key's
quota and the context, strict JSON types, error messages that name the field and the rule,
timeouts for slow clients, draining on shutdown, what is open without a key, what the audit
log records, and the OpenAI features ``models.retrieve``, ``echo``, content-part arrays and
``system_fingerprint``."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from fastinfer import __version__

from .conftest import ADMIN_KEY, API_KEY, ServerSpec, policy, read_audit, start_server

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hi to the tests"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
ELSEWHERE_KEY, TPM_KEY = "sk-elsewhere", "sk-tokens-per-minute"
TPM = 400  # below the tiny model's context (max_model_len 512)
CONTEXT = 512


@pytest.fixture(scope="module")
def api(bank, tmp_path_factory):
    """One server for the module: chat@v1; keys: API_KEY (no limits), ELSEWHERE_KEY (only the
    model "elsewhere", which is not served), TPM_KEY (TPM tokens a minute)."""
    spec = ServerSpec(policies=[policy("elsewhere", ELSEWHERE_KEY, models=["elsewhere"]),
                                policy("tpm", TPM_KEY, tokens_per_minute=TPM)])
    server = start_server(bank, spec, tmp_path_factory.mktemp("trial") / "audit.jsonl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return api.client()


def _post(api, path: str, body: dict, key: str = API_KEY) -> httpx.Response:
    return httpx.post(api.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# --------------------------------------------------------------------------- 1, 10: a key's scope
def test_unknown_model_404_names_only_the_models_in_the_keys_scope(api):
    elsewhere = api.client(ELSEWHERE_KEY)
    assert [m.id for m in elsewhere.models.list()] == []
    with pytest.raises(openai.NotFoundError) as err:
        elsewhere.completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    assert err.value.code == "model_not_found" and "chat" not in err.value.message
    assert "available: none" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        api.client().completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    assert "available: chat, chat@v1" in err.value.message


def test_models_retrieve_is_scoped_by_the_key(api, client):
    for name in ("chat", "chat@v1"):
        card = client.models.retrieve(name)
        assert (card.id, card.object, card.owned_by) == (name, "model", "fastinfer")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:  # served, but not to this key
        api.client(ELSEWHERE_KEY).models.retrieve("chat")
    assert "chat" not in err.value.message.partition("available:")[2]
    with pytest.raises(openai.AuthenticationError):
        api.client("sk-wrong").models.retrieve("chat")


# --------------------------------------------------------------------------- 2, 4: max_tokens
def test_chat_without_max_tokens_fits_the_keys_token_allowance(api):
    tpm = api.client(TPM_KEY)
    r = tpm.chat.completions.create(model="chat", messages=CHAT, **GREEDY)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == TPM  # the whole allowance, no more
    with pytest.raises(openai.RateLimitError) as err:  # nothing left: wait, not a 400
        tpm.chat.completions.create(model="chat", messages=CHAT, **GREEDY)
    assert err.value.code == "rate_limit_exceeded" and int(err.value.response.headers["retry-after"]) >= 1


def test_chat_without_max_tokens_gets_the_rest_of_the_context(client):
    r = client.chat.completions.create(model="chat", messages=CHAT, **GREEDY)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_max_tokens_over_the_context_is_400_naming_the_numbers(client, chat):
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=1_000_000)
        else:
            client.completions.create(model="chat", prompt=PROMPT, max_tokens=1_000_000)
    e = err.value
    assert e.code == "context_length_exceeded" and e.param == ("max_completion_tokens" if chat else "max_tokens")
    assert f"maximum context length (max_model_len) is {CONTEXT} tokens" in e.message
    assert "1000000 in the completion" in e.message and ("in the messages" if chat else "in the prompt") in e.message


# --------------------------------------------------------------------------- 5, 6: types and messages
@pytest.mark.parametrize("field,value", [
    ("temperature", "0.5"), ("top_p", "1"), ("max_tokens", "5"), ("n", "1"), ("presence_penalty", "0"),
    ("frequency_penalty", "0"), ("min_p", "0"), ("repetition_penalty", "1"), ("seed", "1"), ("logprobs", "1"),
    ("temperature", True), ("top_k", 1.0), ("echo", "true"), ("stream", 1),
])
def test_every_field_refuses_a_wrong_json_type(api, field, value):
    r = _post(api, "/v1/completions", {"model": "chat", "prompt": PROMPT, "max_tokens": 1, field: value})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field, error
    assert error["message"].startswith(f"{field} must be ") and f"got {json.dumps(value)}" in error["message"]


def test_an_integer_is_a_valid_float(client):
    assert client.completions.create(model="chat", prompt=PROMPT, max_tokens=1, temperature=1, top_p=1).choices


@pytest.mark.parametrize("body,param,message", [
    ({"prompt": [-1]}, "prompt", "vocabulary"),  # the engine's rule: >= 0 and < the vocabulary size
    ({"prompt": [1.5]}, "prompt.0", "prompt.0 must be an integer, got 1.5"),
    ({"prompt": 5}, "prompt", "prompt must be a string, an array of token ids, or an array of strings or of "
                              "token-id arrays, got 5"),
    ({"prompt": ["a", 1]}, "prompt.1", "prompt.1 must be a string, got 1"),
    ({"prompt": [[1], "a"]}, "prompt.1", "prompt.1 must be an array, got \"a\""),
    ({"prompt": []}, "prompt", "prompt must have at least 1 item(s), got []"),
    ({"stop": 5}, "stop", "stop must be a string or an array of up to 4 strings, got 5"),
    ({"temperature": 3}, "temperature", "temperature must be <= 2, got 3"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"bogus": 1}, "bogus", "bogus is not a field of this request"),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed when stream is true"),
], ids=lambda v: json.dumps(v)[:30] if isinstance(v, dict) else None)
def test_completion_errors_name_the_field_and_the_rule(api, body, param, message):
    r = _post(api, "/v1/completions", {"model": "chat", "prompt": PROMPT, "max_tokens": 1, **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and message in error["message"], error
    for internal in ("constrained", "Input should", "more problem", "pydantic", "function-"):
        assert internal not in error["message"]


@pytest.mark.parametrize("change,param,message", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     "messages.0.content must be a string or an array of content parts, got 5"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role",
     "messages.0.role must be 'system', 'user', 'assistant', 'developer' or 'tool', got \"robot\""),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "messages.0.role is required"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs=true"),
], ids=["content", "role", "missing", "combination"])
def test_chat_errors_name_the_field_and_the_rule(api, change, param, message):
    r = _post(api, "/v1/chat/completions", {"model": "chat", "messages": CHAT, "max_tokens": 1, **change})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and error["message"] == message, error


def test_a_body_that_is_no_json_object_is_400_in_words(api):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    broken = httpx.post(api.url + "/v1/completions", content=b'{"model": ', headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith(
        "the request body is not valid JSON: Expecting value at character")
    array = httpx.post(api.url + "/v1/completions", content=b"[1]", headers=headers)
    assert array.json()["error"]["message"] == "the request body must be an object, got [1]"


# --------------------------------------------------------------------------- 9: the audit log
def test_a_validation_400_is_audited_with_the_key_id(api):
    before = len(read_audit(api.audit_path))
    assert _post(api, "/v1/completions", {"model": "chat", "prompt": PROMPT, "n": "2"}).status_code == 400
    (line,) = read_audit(api.audit_path)[before:]
    assert (line["status"], line["key_id"], line["finish_reason"]) == (400, "key-1", "invalid_request")


# --------------------------------------------------------------------------- 11, 12, 13
def test_echo_puts_the_prompt_before_each_choice(api, client):
    plain = client.completions.create(model="chat", prompt=PROMPT, max_tokens=5, **GREEDY)
    echoed = client.completions.create(model="chat", prompt=PROMPT, max_tokens=5, n=2, echo=True, **GREEDY)
    assert [c.text for c in echoed.choices] == [PROMPT + plain.choices[0].text] * 2
    chunks = list(client.completions.create(model="chat", prompt=PROMPT, max_tokens=5, echo=True, stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain.choices[0].text
    ids = api.engine().get_tokenizer().encode(PROMPT)
    by_ids = client.completions.create(model="chat", prompt=ids, max_tokens=5, echo=True, **GREEDY)
    assert by_ids.choices[0].text.endswith(plain.choices[0].text) and PROMPT in by_ids.choices[0].text


def test_echo_with_logprobs_gives_the_prompt_tokens_null_logprobs(api, client):
    ids = api.engine().get_tokenizer().encode(PROMPT)
    r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids) + 4
    assert lp.token_logprobs[:len(ids)] == [None] * len(ids) and lp.top_logprobs[:len(ids)] == [None] * len(ids)
    assert all(isinstance(v, float) for v in lp.token_logprobs[len(ids):])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_content_parts_are_joined_with_a_newline(client):
    parts = [{"type": "text", "text": "Say hi"}, {"type": "text", "text": "to the tests"}]
    by_parts = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": parts}],
                                              max_tokens=6, **GREEDY)
    joined = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Say hi\nto the tests"}],
                                            max_tokens=6, **GREEDY)
    assert by_parts.usage.prompt_tokens == joined.usage.prompt_tokens
    assert by_parts.choices[0].message.content == joined.choices[0].message.content


def test_system_fingerprint_names_the_server_and_the_model_version(client):
    want = f"fastinfer-{__version__}-v1"
    assert client.completions.create(model="chat", prompt=PROMPT, max_tokens=1).system_fingerprint == want
    assert client.chat.completions.create(model="chat", messages=CHAT, max_tokens=1).system_fingerprint == want
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.system_fingerprint for c in chunks} == {want}


def test_a_left_whole_response_request_records_the_tokens_it_generated(serve):
    server = serve()
    engine = server.engine()
    body = json.dumps({"model": "chat", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(_head("POST", len(body)) + body)
    steps = engine.stats()["num_steps"]
    deadline = time.monotonic() + 30
    while engine.stats()["num_steps"] < steps + 10:  # some tokens generated, far from all
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.005)
    sock.close()
    server.wait_idle([engine])
    line = _wait_for_audit(server, lambda entry: entry["status"] == 499)
    assert line["finish_reason"] == "abort" and 10 <= line["output_tokens"] < 480


# --------------------------------------------------------------------------- 7: slow clients
def _head(method: str, length: int, key: str = API_KEY, path: str = "/v1/completions") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _wait_for_audit(server, match, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        lines = [entry for entry in read_audit(server.audit_path) if match(entry)]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, "no matching audit line"
        time.sleep(0.05)


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_the_api_key_is_checked_before_the_body_is_read(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head("POST", 1000, key="sk-wrong"))  # the body never comes
        answer = _answer(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer


def test_a_body_that_does_not_arrive_in_time_is_408(serve):
    server = serve(ServerSpec(options={"body_timeout": 0.5}))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head("POST", 1000) + b'{"model": "chat", ')
        start = time.monotonic()
        answer = _answer(sock, timeout=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.monotonic() - start < 5
    assert server.client().completions.create(model="chat", prompt=PROMPT, max_tokens=1).choices


def test_connections_that_send_no_whole_head_are_closed(serve):
    server = serve(ServerSpec(options={"header_timeout": 0.5}))
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(15)]
    partial = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(15)]
    for sock in partial:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
    start = time.monotonic()
    for sock in silent + partial:
        assert _answer(sock, timeout=10) == b""  # closed, with nothing sent
        sock.close()
    assert time.monotonic() - start < 5
    assert server.client().completions.create(model="chat", prompt=PROMPT, max_tokens=1).choices


# --------------------------------------------------------------------------- 8: what is open
def test_metrics_behind_the_metrics_key_or_the_admin_key(serve):
    server = serve(ServerSpec(options={"metrics_key": "sk-metrics"}))

    def scrape(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(server.url + "/metrics", headers=headers).status_code

    assert [scrape(k) for k in (None, API_KEY, "sk-metrics", ADMIN_KEY)] == [401, 401, 200, 200]


def test_open_endpoints_and_docs_off_by_default(api):
    assert httpx.get(api.url + "/metrics").status_code == 200  # no metrics key: open, as vLLM's
    assert httpx.get(api.url + "/health").json() == {"status": "ok"}
    assert "/v1/completions" in httpx.get(api.url + "/openapi.json").json()["paths"]
    assert httpx.get(api.url + "/docs").status_code == 404
    assert httpx.get(api.url + "/redoc").status_code == 404


def test_docs_when_enabled_need_no_cdn(serve):
    server = serve(ServerSpec(options={"enable_docs": True}))
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "/admin/models/{name}/load" in r.text
    assert "<script" not in r.text and "<link" not in r.text and "://" not in r.text


# --------------------------------------------------------------------------- 3: draining
def _drain(server) -> asyncio.Future:
    return asyncio.run_coroutine_threadsafe(server.state.drain(), server.loop)


def test_a_draining_server_answers_503_and_finishes_what_is_in_flight(serve):
    server = serve(ServerSpec(shutdown_timeout=30))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            drained = _drain(server)
            deadline = time.monotonic() + 5
            while not server.state.draining:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            health = httpx.get(server.url + "/health")
            refused = httpx.post(server.url + "/v1/completions", json={"model": "chat", "prompt": PROMPT},
                                 headers=headers)
            rest = [line for line in lines if line.startswith("data: ")]
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"] == "5"
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert drained.result(timeout=30) is True


def test_draining_aborts_what_outlives_the_shutdown_timeout(serve):
    server = serve(ServerSpec(shutdown_timeout=0))
    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            drained = _drain(server)
            rest = [line for line in lines if line.startswith("data: ")]
    assert drained.result(timeout=30) is False
    assert json.loads(rest[-1][6:])["error"]["code"] == "aborted_by_server"


def test_serve_flags_reach_the_server_state():
    from fastinfer.cli.main import build_parser
    from fastinfer.cli.serve import build_state

    args = build_parser().parse_args(["serve", "--metrics-key", "sk-m", "--enable-docs", "--header-timeout", "2",
                                      "--body-timeout", "3", "--shutdown-timeout", "4", "--audit-log", "none"])
    state = build_state(args)
    assert (state.header_timeout, state.body_timeout, state.shutdown_timeout, state.enable_docs) == (2, 3, 4, True)
    assert state.metrics_protected and state.may_read_metrics("sk-m") and not state.may_read_metrics("sk-x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--body-timeout", "0"])
