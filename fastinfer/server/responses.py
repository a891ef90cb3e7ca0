"""OpenAI's response shapes: ``Shaper`` turns a request's engine outputs into choices (whole,
or a stream's deltas), log-probabilities, chunks and usage; ``collect`` answers a request
without ``stream`` with one JSON body once every prompt has finished, or 499 when the client
leaves first."""
from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fastinfer.engine.output_processor import GRAMMAR_ERROR
from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import EngineDeadError
from fastinfer.server.errors import APIError
from fastinfer.server.job import Job
from fastinfer.server.tools import ToolStream


class Shaper:
    """The OpenAI bodies of one request. Streaming, it remembers which choices have sent their
    finish and, for completions, which have echoed their prompt and where each one's text
    stands (for log-probabilities' ``text_offset``)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._done: set[int] = set()  # streamed choices whose finish was sent
        self._echoed: set[int] = set()  # completions' choices whose prompt was echoed
        self._text_offset: dict[int, int] = {}  # streamed completions: logprobs' text_offset so far
        self._tool_streams: dict[int, ToolStream] = {}  # streamed chat choices of a request with tools

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        """One stream chunk carrying ``choices`` (and ``usage``, when given)."""
        chunk = self.head("chat.completion.chunk" if self.job.chat else "text_completion")
        chunk["choices"] = choices
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def head(self, kind: str) -> dict:
        """The fields every response and chunk of the request starts with."""
        job = self.job
        return {"id": job.id, "object": kind, "created": job.created, "model": job.model_name,
                "system_fingerprint": job.fingerprint}

    def choice(self, index: int, c, full: bool) -> dict | None:
        """One choice of a response (``full``) or of a stream chunk (a delta); None for a
        streamed choice whose finish was already sent."""
        if not full:
            if index in self._done:
                return None
            if c.finish_reason is not None:
                self._done.add(index)
        reason = _openai_reason(c.finish_reason)
        wants_logprobs = self.job.user_logprobs is not None and c.logprobs is not None
        if self.job.chat:
            logprobs = self._chat_logprobs(c) if wants_logprobs else None
            message, calls = self._message(c) if full else self._delta(index, c)
            if calls and reason == "stop":
                reason = "tool_calls"
            return {"index": index, "message" if full else "delta": message, "logprobs": logprobs,
                    "finish_reason": reason}
        echo = self._echo(index)
        text = (self.job.prompt_text_of(index // self.job.body.n) if echo else "") + c.text
        logprobs = self._completion_logprobs(c, index, echo) if wants_logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _message(self, c) -> tuple[dict, bool]:
        """A whole chat choice's message, and whether it calls tools."""
        plan = self.job.tools
        content, calls = plan.parse(c.text) if plan is not None and c.finish_reason == "stop" else (c.text, [])
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        return message, bool(calls)

    def _delta(self, index: int, c) -> tuple[dict, bool]:
        """A streamed chat choice's delta, and whether it called tools (see ``ToolStream``)."""
        plan = self.job.tools
        if plan is None:
            return ({"content": c.text} if c.text else {}), False
        splitter = self._tool_streams.setdefault(index, plan.stream())
        text, calls = splitter.feed(c.text)
        called = False
        if c.finish_reason is not None:
            rest, more, called = splitter.finish(c.finish_reason == "stop")
            text, calls = text + rest, calls + more
        delta: dict = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        return delta, called

    @staticmethod
    def finish_apart(choices: list[dict]) -> list[list[dict]]:
        """A stream chunk's choices as the chunks to send: a choice that ends with tool-call
        deltas sends its ``finish_reason`` in a chunk of its own, as OpenAI does."""
        ending = [c for c in choices if c["finish_reason"] is not None and c["delta"].get("tool_calls")]
        if not ending:
            return [choices]
        last = [{"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
                for c in ending]
        return [[c | {"finish_reason": None} if c in ending else c for c in choices], last]

    def _echo(self, index: int) -> list[int]:
        """The prompt ids a completion's choice echoes before its text: with ``echo``, in its
        first chunk only; else none."""
        job = self.job
        if not job.body.echo or index in self._echoed:
            return []
        self._echoed.add(index)
        return job.prompt_ids[index // job.body.n]

    def _piece(self, token_id: int) -> str:
        return self.job.mv.engine.get_tokenizer().decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, c) -> dict:
        k, content = self.job.user_logprobs, []
        for tid, lp in zip(c.token_ids, c.logprobs):
            s = self._piece(tid)
            content.append({"token": s, "logprob": lp[tid], "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self._piece(t), "logprob": v,
                                              "bytes": list(self._piece(t).encode())} for t, v in _top(lp, k)]})
        return {"content": content}

    def _completion_logprobs(self, c, index: int, echo: list[int]) -> dict:
        """OpenAI's completion log-probabilities. Echoed prompt tokens come first with null
        log-probabilities (the engine does not score the prompt)."""
        k = max(self.job.user_logprobs, 1)
        pairs = [(t, None) for t in echo] + list(zip(c.token_ids, c.logprobs))
        tokens, offsets, pos = [], [], self._text_offset.get(index, 0)  # streamed: where the choice's text is
        for tid, _ in pairs:
            tokens.append(self._piece(tid))
            offsets.append(pos)
            pos += len(tokens[-1])
        self._text_offset[index] = pos
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp[t] for t, lp in pairs],
                "top_logprobs": [None if lp is None else {self._piece(t): v for t, v in _top(lp, k)}
                                 for _, lp in pairs],
                "text_offset": offsets}

    def usage(self) -> dict:
        """The request's token counts so far, as OpenAI's ``usage``; ``cached_tokens``: the
        prompt tokens read from the prefix cache (of the prompts that finished)."""
        job = self.job
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.output_tokens,
                "total_tokens": job.prompt_tokens + job.output_tokens,
                "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


def _top(logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, log-probability) pairs, best first."""
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:k]


def _openai_reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "stop"}.get(reason, reason)


# The engine ended a request the client still waits for (its version was unloaded, or the
# server is shutting down): an error, never a truncated answer that looks complete.
def server_abort(outputs=()) -> APIError:
    """The error for a request with an aborted sample among ``outputs`` (completion outputs): a
    failed grammar (500), else the server aborted it (503, retry)."""
    if any(c.stop_reason == GRAMMAR_ERROR for c in outputs):
        return APIError(500, "the structured output's grammar failed while generating (see the server log); "
                        "the text would not match it", code="grammar_error")
    return APIError(503, "the request was aborted by the server (shutdown or model unload); retry it",
                    code="aborted_by_server", retry_after=1)


async def collect(job: Job) -> Response:
    """Waits for every final output, or for the client to leave (then aborts)."""
    work = asyncio.ensure_future(_finals(job.streams))
    gone = asyncio.ensure_future(_disconnected(job.request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            await job.abandon(work)
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
            raise server_abort([c for out in outs for c in out.outputs])
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
    body = shaper.head("chat.completion" if job.chat else "text_completion")
    return JSONResponse(body | {"choices": choices, "usage": shaper.usage()})


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
