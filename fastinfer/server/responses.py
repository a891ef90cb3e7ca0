"""OpenAI's response shapes: ``Shaper`` turns a request's engine outputs into choices (whole,
or a stream's deltas), log-probabilities, chunks and usage; ``collect`` answers a request
without ``stream`` with one JSON body once every prompt has finished, or 499 when the client
leaves first."""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import EngineDeadError
from fastinfer.server.errors import APIError
from fastinfer.server.job import Job


class Shaper:
    """The OpenAI bodies of one request. Streaming, it remembers which choices have sent their
    finish and, for completions' log-probabilities, where each choice's text stands."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._done: set[int] = set()  # streamed choices whose finish was sent
        self._text_offset: dict[int, int] = {}  # streamed completions: logprobs' text_offset so far

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        """One stream chunk carrying ``choices`` (and ``usage``, when given)."""
        job = self.job
        chunk = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                 "created": job.created, "model": job.model_name, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def choice(self, index: int, c, full: bool) -> dict | None:
        """One choice of a response (``full``) or of a stream chunk (a delta); None for a
        streamed choice whose finish was already sent."""
        if not full:
            if index in self._done:
                return None
            if c.finish_reason is not None:
                self._done.add(index)
        reason = _openai_reason(c.finish_reason)
        logprobs = self._logprobs(c, index) if self.job.user_logprobs is not None and c.logprobs is not None else None
        if self.job.chat:
            key = "message" if full else "delta"
            content = {"role": "assistant", "content": c.text} if full else ({"content": c.text} if c.text else {})
            return {"index": index, key: content, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, c, index: int) -> dict:
        tok = self.job.mv.engine.get_tokenizer()

        def piece(t: int) -> str:
            return tok.decode([t], skip_special_tokens=False)

        k = self.job.user_logprobs
        if self.job.chat:
            content = []
            for tid, lp in zip(c.token_ids, c.logprobs):
                top = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
                s = piece(tid)
                content.append({"token": s, "logprob": lp[tid], "bytes": list(s.encode()),
                                "top_logprobs": [{"token": piece(t), "logprob": v, "bytes": list(piece(t).encode())}
                                                 for t, v in top]})
            return {"content": content}
        tokens, offsets, pos = [], [], self._text_offset.get(index, 0)  # streamed: where the choice's text is
        for tid in c.token_ids:
            s = piece(tid)
            tokens.append(s)
            offsets.append(pos)
            pos += len(s)
        self._text_offset[index] = pos
        return {"tokens": tokens, "token_logprobs": [lp[t] for t, lp in zip(c.token_ids, c.logprobs)],
                "top_logprobs": [{piece(t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:max(k, 1)]}
                                 for lp in c.logprobs],
                "text_offset": offsets}

    def usage(self) -> dict:
        """The request's token counts so far, as OpenAI's ``usage``; ``cached_tokens``: the
        prompt tokens read from the prefix cache (of the prompts that finished)."""
        job = self.job
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.output_tokens,
                "total_tokens": job.prompt_tokens + job.output_tokens,
                "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


def _openai_reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "stop"}.get(reason, reason)


# The engine ended a request the client still waits for (its version was unloaded, or the
# server is shutting down): an error, never a truncated answer that looks complete.
def server_abort() -> APIError:
    """The error for a request the server aborted (503, retry)."""
    return APIError(503, "the request was aborted by the server (shutdown or model unload); retry it",
                    code="aborted_by_server", retry_after=1)


async def collect(job: Job) -> Response:
    """Waits for every final output, or for the client to leave (then aborts)."""
    work = asyncio.ensure_future(_finals(job.streams))
    gone = asyncio.ensure_future(_disconnected(job.request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            job.abandon()
            return Response(status_code=499)
        outs = work.result()
    except EngineDeadError as exc:
        err = APIError(503, str(exc), code="engine_unavailable")
        job.end(err)
        return err.response()
    except BaseException as exc:
        job.end(exc)
        raise
    finally:
        gone.cancel()
        work.cancel()  # a no-op once done; stops waiting when this handler is cancelled
        job.abort_unfinished()
    return _whole_response(job, outs)


def _whole_response(job: Job, outs: list[RequestOutput]) -> Response:
    """The one JSON body of a request whose every prompt finished."""
    shaper = Shaper(job)
    try:
        for i, out in enumerate(outs):
            job.observe(i, out, None, streaming=False)
        if any(c.finish_reason == "abort" for out in outs for c in out.outputs):
            raise server_abort()
        choices = []
        for pi, out in enumerate(outs):
            for c in out.outputs:
                choices.append(shaper.choice(pi * len(out.outputs) + c.index, c, full=True))
    except APIError as exc:
        job.end(exc)
        return exc.response()
    except BaseException as exc:
        job.end(exc)
        raise
    job.end(None)
    return JSONResponse({"id": job.id, "object": "chat.completion" if job.chat else "text_completion",
                         "created": job.created, "model": job.model_name, "choices": choices,
                         "usage": shaper.usage()})


async def _finals(streams) -> list[RequestOutput]:
    return [await _last(s) for s in streams]


async def _last(stream) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
