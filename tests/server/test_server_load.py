"""A bounded load test on loopback: 1,000 requests (completions and chat, streamed and whole) at
up to 64 at a time, 10% of the clients leaving a stream after a few chunks. Every completed
request must equal the same request's output computed once beforehand (greedy float32 on the
CPU is batch-invariant), every one that left must be aborted (audit status 499, finish reason
abort), the KV blocks must all come back, and no response may be a 5xx."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx
import pytest

from .conftest import API_KEY, finish_tally, read_audit

N_REQUESTS = 1000
CONCURRENCY = 64
N_LEAVING = N_REQUESTS // 10
MAX_TOKENS = 12
LEAVER_MAX_TOKENS = 300  # far more than a leaver waits for: it cannot finish before it leaves
TOPICS = ["rivers", "prime numbers", "the moon", "bread", "glaciers", "jazz", "compilers", "owls",
          "tea", "volcanoes", "chess", "maps", "bees", "copper", "sailing", "clocks"]
PROMPTS = [f"Write one sentence about {topic}." for topic in TOPICS]


@dataclass
class Outcome:
    """What one client saw: the HTTP status, the response id, the text, and whether it left."""

    status: int
    request_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    left: bool = False


def _body(chat: bool, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": "chat", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    return body


def _path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def _piece(chat: bool, choice: dict) -> str:
    return (choice["delta"].get("content") or "") if chat else choice["text"]


async def _whole(client: httpx.AsyncClient, chat: bool, prompt: str) -> Outcome:
    r = await client.post(_path(chat), json=_body(chat, prompt, MAX_TOKENS, stream=False))
    if r.status_code != 200:
        return Outcome(r.status_code)
    data = r.json()
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Outcome(200, data["id"], text, choice["finish_reason"])


async def _streamed(client: httpx.AsyncClient, chat: bool, prompt: str, leave_after: int | None) -> Outcome:
    """A streaming client; with ``leave_after`` it closes the connection after that many chunks."""
    max_tokens = MAX_TOKENS if leave_after is None else LEAVER_MAX_TOKENS
    async with client.stream("POST", _path(chat), json=_body(chat, prompt, max_tokens, stream=True)) as r:
        out = Outcome(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return out
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            out.request_id = chunk["id"]
            for choice in chunk["choices"]:
                out.text += _piece(chat, choice)
                out.finish_reason = choice["finish_reason"] or out.finish_reason
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                out.left = True
                break  # leaving the block closes the connection mid-stream
    return out


async def _expected(url: str) -> dict[tuple[bool, str], str]:
    """Each (endpoint, prompt)'s greedy text, asked once, one request at a time."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        want = {}
        for chat in (False, True):
            for prompt in PROMPTS:
                out = await _whole(c, chat, prompt)
                assert out.status == 200 and out.finish_reason == "length"
                want[(chat, prompt)] = out.text
        return want


async def _load(url: str, rng: random.Random) -> list[tuple[int, bool, str, Outcome]]:
    leavers = set(rng.sample(range(N_REQUESTS), N_LEAVING))
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                                 limits=limits) as client:
        async def one(i: int):
            chat, prompt = i % 2 == 1, PROMPTS[(i // 2) % len(PROMPTS)]
            async with gate:
                if i in leavers:
                    out = await _streamed(client, chat, prompt, leave_after=rng.randint(1, 4))
                elif i % 4 == 0:
                    out = await _whole(client, chat, prompt)
                else:
                    out = await _streamed(client, chat, prompt, leave_after=None)
            return i, chat, prompt, out

        return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))


@pytest.mark.slow
def test_thousand_requests_with_clients_leaving(serve):
    server = serve()
    engine = server.engine()
    initial = engine.stats()
    assert initial["kv_blocks_free"] == initial["kv_blocks_total"] > 0
    want = asyncio.run(_expected(server.url))
    assert len(set(want.values())) > 1, "distinct prompts should give distinct outputs"
    before = len(read_audit(server.audit_path))
    finishes = finish_tally(engine)

    results = asyncio.run(_load(server.url, random.Random(0)))

    assert [out.status for *_, out in results if out.status != 200] == []  # no 5xx, nor anything else
    left = [out for *_, out in results if out.left]
    done = [(chat, prompt, out) for _, chat, prompt, out in results if not out.left]
    assert len(left) == N_LEAVING and len(done) == N_REQUESTS - N_LEAVING
    wrong = [(chat, prompt, out.text) for chat, prompt, out in done if out.text != want[(chat, prompt)]]
    assert wrong == [], f"{len(wrong)} completed requests differ from their reference output"
    assert all(out.finish_reason == "length" for _, _, out in done)

    server.wait_idle([engine])  # every request ended and every KV block is free again
    stats = engine.stats()
    assert stats["num_requests"] == 0 and stats["kv_blocks_free"] == initial["kv_blocks_free"]
    # In the engine too, each request that lost its client ended by an abort, not by running on.
    assert finishes == {"length": N_REQUESTS - N_LEAVING, "abort": N_LEAVING}

    audit = {line["request_id"]: line for line in read_audit(server.audit_path)[before:]}
    assert len(audit) == N_REQUESTS
    assert [line for line in audit.values() if line["status"] >= 500] == []
    for out in left:
        line = audit[out.request_id]
        assert (line["status"], line["finish_reason"]) == (499, "abort"), line
        assert line["output_tokens"] < LEAVER_MAX_TOKENS
    for _, _, out in done:
        line = audit[out.request_id]
        assert (line["status"], line["finish_reason"], line["output_tokens"]) == (200, "length", MAX_TOKENS), line
