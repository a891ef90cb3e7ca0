"""The targets of ``fastinfer bench serve``: an OpenAI ``/v1/completions`` endpoint streamed over
HTTP (``fastinfer serve`` or ``llama-server``), and the in-process ``AsyncEngine`` (no HTTP: the
baseline that shows the server's overhead). Each yields the new tokens of every event."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator


from fastinfer.bench.process import ServerProcess, free_port
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.sampling.params import SamplingParams

SERVED_NAME = "bench"


class EngineTarget:
    """The in-process ``AsyncEngine``: requests go straight to its loop."""

    name = "fastinfer-engine"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def stream(self, prompt: list[int], max_tokens: int) -> AsyncIterator[int]:
        """Greedy, EOS ignored, delta outputs: one event per engine step."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind="delta")
        async for out in self.engine.generate(prompt, params):
            yield len(out.outputs[0].token_ids)

    async def aclose(self) -> None:
        await self.engine.shutdown()


class CompletionsTarget:
    """A streamed ``POST {base_url}/v1/completions`` with the prompt as token ids. A chunk with
    text counts as one token (as vLLM's benchmark counts); the usage chunk adds the tokens whose
    text was held back, so the count is exact. ``extra_body`` adds server-specific fields."""

    def __init__(self, name: str, base_url: str, model: str, extra_body: dict | None = None) -> None:
        self.name, self.model, self.extra_body = name, model, extra_body or {}
        # Prompt tokens of finished requests, and those the server read from its prefix cache
        # (``usage.prompt_tokens_details.cached_tokens``), summed over this target's life.
        self.prompt_tokens = self.cached_tokens = 0
        self.url = base_url.rstrip("/") + "/v1/completions"
        # No pool limit: every request in flight holds its own connection, as separate clients would.
        import httpx  # the bench/serve extras' dependency: only when a server is driven

        self.client = httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    def body(self, prompt: list[int], max_tokens: int) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **self.extra_body}

    async def stream(self, prompt: list[int], max_tokens: int) -> AsyncIterator[int]:
        """Raises RuntimeError on a non-200 answer or an error event."""
        seen, total = 0, None
        async with self.client.stream("POST", self.url, json=self.body(prompt, max_tokens)) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{self.name} answered {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"{self.name} sent an error event: {chunk['error']}")
                if chunk.get("usage"):
                    total = chunk["usage"]["completion_tokens"]
                    self._count_usage(chunk["usage"])
                if any(c.get("text") for c in chunk.get("choices") or ()):
                    seen += 1
                    yield 1
        if total is not None and total > seen:
            yield total - seen

    def _count_usage(self, usage: dict) -> None:
        self.prompt_tokens += usage.get("prompt_tokens") or 0
        self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    async def aclose(self) -> None:
        await self.client.aclose()


def fastinfer_server(model: str, options: dict[str, object], threads: int) -> ServerProcess:
    """``fastinfer serve MODEL`` as a child process on a free port (served as ``SERVED_NAME``,
    no audit log, ``threads`` OpenMP threads like this process), started and ready.
    ``options``: engine options of ``fastinfer serve`` by attribute name (None: its default)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fastinfer.cli.main", "serve", model, "--served-model-name", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--audit-log", "none"]
    for key, value in options.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return ServerProcess("fastinfer serve", cmd, port, env).start(ready_timeout_s=300)
