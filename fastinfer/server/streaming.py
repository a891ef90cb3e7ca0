"""Server-sent events for ``"stream": true``: one ``data:`` chunk per choice per engine output
(the chat role first), then the usage when asked for and ``data: [DONE]``. An error once the
stream is open ends it with an error event; a client that leaves aborts the engine work."""
from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import EngineDeadError
from fastinfer.server.errors import APIError, error_body
from fastinfer.server.job import Job
from fastinfer.server.responses import Shaper, server_abort


def stream_response(job: Job) -> StreamingResponse:
    """The event stream of a submitted request."""
    events = _events(job)
    # A client gone before the response starts leaves the generator unstarted (its
    # finally never runs): free the request's engine work and slots when it is dropped.
    weakref.finalize(events, job.dropped, asyncio.get_running_loop())
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(job: Job) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice per engine output, then usage and [DONE]."""
    shaper = Shaper(job)
    error: BaseException | None = None
    try:
        n = job.body.n
        if job.chat:  # the role comes first, once per choice
            for i in range(n * len(job.streams)):
                yield _event(shaper.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]))
        last: dict[int, float] = {}  # per stream: when its previous output came
        async for pi, out in _merge(job.streams):
            now = time.monotonic()
            # The first output's wait is its time to first token, not an inter-token gap.
            job.observe(pi, out, now - last[pi] if pi in last else None, streaming=True)
            last[pi] = now
            if any(c.finish_reason == "abort" for c in out.outputs):
                raise server_abort(out.outputs)
            choices = [shaper.choice(pi * n + c.index, c, full=False) for c in out.outputs
                       if c.token_ids or c.text or c.finish_reason]
            choices = [c for c in choices if c is not None]
            if choices:
                for part in shaper.finish_apart(choices) if job.chat else [choices]:
                    yield _event(shaper.chunk(part))
        if job.body.stream_options is not None and job.body.stream_options.include_usage:
            yield _event(shaper.chunk([], usage=shaper.usage()))
        yield "data: [DONE]\n\n"
    except (EngineDeadError, APIError) as exc:  # the stream is open: an error event ends it
        error = exc
        job.status = getattr(exc, "status", 503)
        yield _event(error_body(job.status, str(exc), code=getattr(exc, "code", None) or "engine_unavailable"))
    except BaseException as exc:  # the client left (cancelled) or a bug
        error = exc
        job.status = 499 if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else 500
        raise
    finally:
        job.abort_unfinished()
        job.end(error if job.status >= 500 else None)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out, None))
        except BaseException as exc:
            await queue.put((i, None, exc))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                left -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()

