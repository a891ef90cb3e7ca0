"""The OpenAI-compatible app: ``build_app(state)`` returns a FastAPI app over a
``ModelRegistry`` of ``AsyncEngine``s.

A request's path: key check (401), drain check (503), body validation (400), routing to a model
version (404; 403 when the key may not use it), quota (429 with ``Retry-After``), submission
(429 when the engine's queue is full), then the outputs: one JSON body, or server-sent events
of deltas. Whatever ends it (the last token, a stop, the client leaving, an error) releases the
quota and the version's in-flight slot and writes one audit line and the metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import (EngineDeadError, EngineOverloadedError, EngineShutdownError, InvalidArgumentError,
                              ModelLoadError)
from fastinfer.sampling.params import SamplingParams
from fastinfer.server.audit import AuditLog
from fastinfer.server.errors import APIError, error_body
from fastinfer.server.keys import KeyPolicy, KeyStore, QuotaExceeded, QuotaTracker, hash_key
from fastinfer.server.metrics import ServerMetrics
from fastinfer.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadBody, RollbackBody,
                                       TrafficBody, VersionBody)
from fastinfer.server.registry import ModelRegistry

_log = logging.getLogger("fastinfer.server")
DEFAULT_MAX_BODY_BYTES = 1 << 20
_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_INLINE_PROMPT_CHARS = 8192  # longer prompts are tokenized in a worker thread


@dataclass
class ServerState:
    """Everything the app serves with. ``draining``: set on SIGTERM; new requests get 503."""

    registry: ModelRegistry
    keys: KeyStore = field(default_factory=KeyStore)
    quotas: QuotaTracker = field(default_factory=QuotaTracker)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))
    admin_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    draining: bool = False

    def __post_init__(self) -> None:
        self._admin_hash = None if self.admin_key is None else hash_key(self.admin_key)
        self.admin_key = None  # kept only as a hash


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app; its lifespan shuts every engine down (draining first) at exit."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.draining = True
        await state.registry.shutdown(state.shutdown_timeout)

    app = FastAPI(title="fastinfer", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    _install_error_handlers(app)

    async def gate(request: Request) -> KeyPolicy | None:
        policy = _authenticate(state, request)
        if state.draining:
            raise APIError(503, "the server is shutting down", code="draining", retry_after=5)
        return policy

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        for mv in state.registry.versions():
            state.metrics.engine_stats(mv.name, mv.version, mv.engine.stats())
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models(policy: KeyPolicy | None = Depends(gate)) -> dict:
        names = [n for n in state.registry.served_names() if policy is None or policy.allows(n.split("@")[0])]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "fastinfer"}
                                           for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          policy: KeyPolicy | None = Depends(gate)) -> Response:
        return await _Job(state, request, policy, body, chat=False).run()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               policy: KeyPolicy | None = Depends(gate)) -> Response:
        return await _Job(state, request, policy, body, chat=True).run()

    _add_admin_routes(app, state)
    return app


# ---------------------------------------------------------------------------- auth
def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _authenticate(state: ServerState, request: Request) -> KeyPolicy | None:
    """The caller's key policy (None when the server has no keys); 401 without a valid key."""
    if not state.keys.enabled:
        return None
    policy = state.keys.authenticate(_bearer(request))
    if policy is None:
        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return policy


# ---------------------------------------------------------------------------- one request
class _Job:
    """One completion or chat request from validation to its audit line."""

    def __init__(self, state: ServerState, request: Request, policy: KeyPolicy | None, body, chat: bool) -> None:
        self.state, self.request, self.policy, self.body, self.chat = state, request, policy, body, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.monotonic()
        self.mv = None
        self.lease = None
        self.streams: list = []
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.ttft: float | None = None
        self.finish_reasons: list[str] = []
        self.logprob_sum, self.logprob_count = 0.0, 0
        self.status = 200
        self.user_logprobs: int | None = None
        self._generated: dict[int, int] = {}  # tokens per engine request
        self._done: set[int] = set()  # streamed choices whose finish was sent
        self._text_offset: dict[int, int] = {}  # streamed completions: logprobs' text_offset so far
        self._observed: set[int] = set()  # engine requests whose final output reached the metrics
        self._engine_dead = False
        self._charge_estimate = False  # the client left a whole-response request: bill the estimate
        self._prompt_lens: list[int] = []
        self._ended = False
        self._holds_slot = False  # counted in the version's in_flight

    # -- setup ------------------------------------------------------------------
    async def run(self) -> Response:
        try:
            await self._submit()
        except BaseException as exc:
            self._abort_unfinished()  # prompts of a batch accepted before one was refused
            self._end(exc)
            raise
        if self.body.stream:
            events = self._sse()
            # A client gone before the response starts leaves the generator unstarted (its
            # finally never runs): free the request's engine work and slots when it is dropped.
            weakref.finalize(events, self._dropped, asyncio.get_running_loop())
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect()

    async def _submit(self) -> None:
        body, state = self.body, self.state
        self.mv = mv = state.registry.route(body.model)
        if self.policy is not None and not self.policy.allows(mv.name):
            raise APIError(403, f"this API key may not use model {mv.name!r}", param="model", code="model_not_allowed")
        engine = mv.engine
        mv.acquire()  # before any await: an unload waits for this request from here on
        self._holds_slot = True
        # A long prompt's tokenization (or chat template) would stall every stream of this loop.
        prompts = (await asyncio.to_thread(self._prompt_ids, engine) if self._prompt_chars() > _INLINE_PROMPT_CHARS
                   else self._prompt_ids(engine))
        self.prompt_tokens = sum(len(p) for p in prompts)
        self._prompt_lens = [len(p) for p in prompts]
        params = self._params(engine, prompts)
        estimate = self.prompt_tokens + params.max_tokens * params.n * len(prompts)
        try:
            self.lease = state.quotas.acquire(self.policy, estimate) if self.policy is not None else None
        except QuotaExceeded as exc:
            if exc.never_fits:  # waiting never helps: a request error, not a rate limit
                raise APIError(400, f"{exc.reason}; lower max_tokens", param="max_tokens",
                               code="exceeds_token_quota") from exc
            raise APIError(429, str(exc.reason), code="rate_limit_exceeded", retry_after=exc.retry_after) from exc
        # A batch's prompts are submitted together (one engine step, not one each); whatever
        # ends this early (a refusal, a cancellation), every accepted prompt is kept to abort.
        tasks = [asyncio.ensure_future(engine.add_request(ids, params)) for ids in prompts]
        try:
            await asyncio.wait(tasks)
        finally:
            for t in tasks:
                t.cancel()  # a no-op for the finished ones; a pending add aborts itself
            self.streams = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:  # a request error first: a 429 must not hide a 400 that no retry fixes
            error = next((e for e in errors if isinstance(e, InvalidArgumentError)), errors[0])
            if isinstance(error, EngineOverloadedError):
                raise APIError(429, str(error), code="engine_overloaded", retry_after=1) from error
            if isinstance(error, EngineDeadError):
                self._engine_dead = True  # a canary whose loop died must count as failing
            if isinstance(error, (EngineShutdownError, EngineDeadError)):
                raise APIError(503, str(error), code="engine_unavailable", retry_after=5) from error
            if isinstance(error, InvalidArgumentError):
                raise APIError(400, str(error), param=error.argument) from error
            raise error
        self._prompt_lens = self._prompt_lens[:len(self.streams)]

    def _prompt_chars(self) -> int:
        if self.chat:
            return sum(len(m.text()) for m in self.body.messages)
        return sum(len(p) for p in self.body.prompts() if isinstance(p, str))

    def _prompt_ids(self, engine) -> list[list[int]]:
        tok = engine.get_tokenizer()
        try:
            if self.chat:
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in self.body.messages]
                return [list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))]
            return [tok.encode(p) if isinstance(p, str) else list(p) for p in self.body.prompts()]
        except (InvalidArgumentError, ValueError, TypeError) as exc:
            raise APIError(400, f"cannot build the prompt: {exc}", param="messages" if self.chat else "prompt") from exc

    def _params(self, engine, prompts: list[list[int]]) -> SamplingParams:
        body = self.body
        max_tokens = body.max_tokens
        if self.chat:
            max_tokens = body.max_completion_tokens or max_tokens
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            top = body.logprobs
        if max_tokens is None:  # chat: the rest of the context (vLLM's default); completions: 16
            room = engine.max_model_len - max(len(p) for p in prompts)
            max_tokens = max(1, room) if self.chat else _COMPLETION_DEFAULT_MAX_TOKENS
        self.user_logprobs = top
        # A version under canary watch reports its sampled tokens' log-probabilities.
        watched = top is None and self.state.registry.monitored(self.mv)
        try:
            return SamplingParams(n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  stop=body.stop, seed=body.seed, ignore_eos=body.ignore_eos,
                                  logprobs=0 if watched else top,
                                  output_kind="delta" if body.stream else "final_only")
        except InvalidArgumentError as exc:
            raise APIError(400, str(exc), param=exc.argument) from exc

    # -- outputs ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return f"{self.mv.name}@{self.mv.version}"

    def _observe(self, index: int, out: RequestOutput, gap: float | None, streaming: bool = False) -> None:
        """Counts one engine output's tokens (and, streaming, the gap since the stream's
        previous output: None for its first)."""
        m, (name, version) = self.state.metrics, (self.mv.name, self.mv.version)
        new = sum(len(c.token_ids) for c in out.outputs)
        if self.ttft is None and out.metrics.ttft is not None:
            self.ttft = out.metrics.ttft
        self.output_tokens += new
        self._generated[index] = self._generated.get(index, 0) + new
        if gap is not None:  # each sample's own gap: n samples step together
            for c in out.outputs:
                if c.token_ids:
                    m.tokens(name, version, len(c.token_ids), gap)
        for c in out.outputs:
            if c.logprobs:
                for tid, lp in zip(c.token_ids, c.logprobs):
                    self.logprob_sum += lp[tid]
                    self.logprob_count += 1
        if out.finished:
            mt = out.metrics
            if mt.ttft is not None:
                m.first_token(name, version, mt.ttft)
            if not streaming and mt.first_token_time is not None and mt.finished_time:
                span = mt.finished_time - mt.first_token_time  # each sample: its tokens after the first
                for c in out.outputs:
                    if len(c.token_ids) > 1:
                        m.tokens(name, version, len(c.token_ids) - 1, span)
            reason = _overall_reason(out)
            self.finish_reasons.append(reason)
            self._observed.add(index)
            m.finished(name, version, queue_time_s=mt.time_in_queue,
                       e2e_s=(mt.finished_time - mt.arrival_time) if mt.finished_time else None,
                       prompt_tokens=len(out.prompt_token_ids), generation_tokens=self._generated[index],
                       finish_reason=reason)

    async def _collect(self) -> Response:
        """Waits for every final output, or for the client to leave (then aborts)."""
        async def finals() -> list[RequestOutput]:
            return [await _last(s) for s in self.streams]

        work = asyncio.ensure_future(finals())
        gone = asyncio.ensure_future(_disconnected(self.request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                self.status = 499
                self._charge_estimate = True  # what it generated is unknown here: the estimate
                self._end(None)
                return Response(status_code=499)
            outs = work.result()
        except EngineDeadError as exc:
            err = APIError(503, str(exc), code="engine_unavailable")
            self._end(err)
            return err.response()
        except BaseException as exc:
            self._end(exc)
            raise
        finally:
            gone.cancel()
            work.cancel()  # a no-op once done; stops waiting when this handler is cancelled
            self._abort_unfinished()
        try:
            for i, out in enumerate(outs):
                self._observe(i, out, None, streaming=False)
            if any(c.finish_reason == "abort" for out in outs for c in out.outputs):
                raise _server_abort()
            choices = []
            for pi, out in enumerate(outs):
                for c in out.outputs:
                    choices.append(self._choice(pi * len(out.outputs) + c.index, c, full=True))
        except APIError as exc:
            self._end(exc)
            return exc.response()
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.model_name, "choices": choices,
                             "usage": self._usage()})

    async def _sse(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice per engine output, then usage and [DONE]."""
        error: BaseException | None = None
        try:
            n = self.body.n
            if self.chat:  # the role comes first, once per choice
                for i in range(n * len(self.streams)):
                    yield _event(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]))
            last: dict[int, float] = {}  # per stream: when its previous output came
            async for pi, out in _merge(self.streams):
                now = time.monotonic()
                # The first output's wait is its time to first token, not an inter-token gap.
                self._observe(pi, out, now - last[pi] if pi in last else None, streaming=True)
                last[pi] = now
                if any(c.finish_reason == "abort" for c in out.outputs):
                    raise _server_abort()
                choices = [self._choice(pi * n + c.index, c, full=False) for c in out.outputs
                           if c.token_ids or c.text or c.finish_reason]
                choices = [c for c in choices if c is not None]
                if choices:
                    yield _event(self._chunk(choices))
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield _event(self._chunk([], usage=self._usage()))
            yield "data: [DONE]\n\n"
        except (EngineDeadError, APIError) as exc:  # the stream is open: an error event ends it
            error = exc
            self.status = 503
            yield _event(error_body(503, str(exc), code=getattr(exc, "code", None) or "engine_unavailable"))
        except BaseException as exc:  # the client left (cancelled) or a bug
            error = exc
            self.status = 499 if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else 500
            raise
        finally:
            self._abort_unfinished()
            self._end(error if self.status >= 500 else None)

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _choice(self, index: int, c, full: bool) -> dict | None:
        """One choice of a response (``full``) or of a stream chunk (a delta)."""
        if not full:
            if index in self._done:
                return None
            if c.finish_reason is not None:
                self._done.add(index)
        reason = _openai_reason(c.finish_reason)
        logprobs = self._logprobs(c, index) if self.user_logprobs is not None and c.logprobs is not None else None
        if self.chat:
            key = "message" if full else "delta"
            content = {"role": "assistant", "content": c.text} if full else ({"content": c.text} if c.text else {})
            return {"index": index, key: content, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, c, index: int) -> dict:
        tok = self.mv.engine.get_tokenizer()

        def piece(t: int) -> str:
            return tok.decode([t], skip_special_tokens=False)

        k = self.user_logprobs
        if self.chat:
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

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.prompt_tokens + self.output_tokens}

    # -- the end ------------------------------------------------------------------
    def _abort_unfinished(self) -> None:
        for s in self.streams:
            if not s.finished:
                s.finished = True
                self.mv.engine.abort_nowait(s.request_id)

    def _dropped(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event generator was dropped (maybe by the garbage collector, on any thread):
        clean up on the request's own loop."""
        def cleanup() -> None:
            if not self._ended:
                self._abort_unfinished()
                self.status = 499
                self._end(None)
        try:
            loop.call_soon_threadsafe(cleanup)
        except RuntimeError:  # the loop is closed: the server is gone, and its engines with it
            pass

    def _end(self, error: BaseException | None) -> None:
        """Releases what the request held and writes its audit line and metrics (once)."""
        if self._ended:
            return
        self._ended = True
        if isinstance(error, APIError):
            self.status = error.status
            error.audited = True  # this line is its audit record: the error handler adds none
        elif error is not None and self.status < 400:
            self.status = 499 if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else 500
        latency = time.monotonic() - self.start
        if self.lease is not None:
            self.lease.release(None if self._charge_estimate else self.prompt_tokens + self.output_tokens)
        mv = self.mv
        for i in range(len(self.streams)):  # ended without a final output read (the client left)
            if i not in self._observed:
                self.state.metrics.finished(mv.name, mv.version, queue_time_s=None, e2e_s=latency,
                                            prompt_tokens=self._prompt_lens[i],
                                            generation_tokens=self._generated.get(i, 0), finish_reason="abort")
        if self._holds_slot:  # also when the engine refused the request: unload waits for in_flight
            mv.release()
        if mv is not None and (self.streams or self._engine_dead):
            self.state.registry.record_result(
                mv, ok=self.status < 500, ttft=self.ttft,
                mean_logprob=self.logprob_sum / self.logprob_count if self.logprob_count else None)
        reason = ",".join(sorted(set(self.finish_reasons))) or ("abort" if self.status == 499 else None)
        _audit(self.state.audit,
            request_id=self.id, endpoint="/v1/chat/completions" if self.chat else "/v1/completions",
            key_id=self.policy.id if self.policy is not None else None,
            model=mv.name if mv is not None else self.body.model, version=mv.version if mv is not None else None,
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, ttft=self.ttft, latency=latency,
            finish_reason=reason, status=self.status, prompt=self._prompt_text())

    def _prompt_text(self) -> str | None:
        if self.chat:
            return json.dumps([{"role": m.role, "content": m.text()} for m in self.body.messages])
        p = self.body.prompt
        return p if isinstance(p, str) else json.dumps(p)


def _audit(log: AuditLog, **fields) -> None:
    """Writes an audit line; a failed write (a full disk) is reported, never turned into the
    request's error."""
    try:
        log.record(**fields)
    except OSError as exc:
        _log.error("audit log write failed: %s", exc)


def _overall_reason(out: RequestOutput) -> str:
    reasons = [c.finish_reason or "abort" for c in out.outputs]
    return "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")


def _openai_reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "stop"}.get(reason, reason)


# The engine ended a request the client still waits for (its version was unloaded, or the
# server is shutting down): an error, never a truncated answer that looks complete.
def _server_abort() -> APIError:
    return APIError(503, "the request was aborted by the server (shutdown or model unload); retry it",
                    code="aborted_by_server", retry_after=1)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _last(stream) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


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


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------- admin
def _add_admin_routes(app: FastAPI, state: ServerState) -> None:
    async def admin(request: Request) -> None:
        if state._admin_hash is None:
            raise APIError(403, "the admin API is off: start the server with --admin-key", code="admin_disabled")
        presented = _bearer(request)
        if presented is None or not hmac.compare_digest(hash_key(presented), state._admin_hash):
            raise APIError(401, "the admin API needs 'Authorization: Bearer <admin key>'", code="invalid_admin_key")

    reg = state.registry

    @app.get("/admin/models", dependencies=[Depends(admin)])
    async def list_models() -> dict:
        return {"models": reg.list_models(), "events": reg.events[-100:]}

    @app.post("/admin/models/{name}/load", dependencies=[Depends(admin)])
    async def load(name: str, body: LoadBody) -> dict:
        try:
            await reg.load(name, body.version, body.source)
        except (ModelLoadError, InvalidArgumentError) as exc:  # a source that is not a model: the caller's
            raise APIError(400, f"cannot load {name}@{body.version}: {exc}", param="source",
                           code="model_load_failed") from exc
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/promote", dependencies=[Depends(admin)])
    async def promote(name: str, body: VersionBody) -> dict:
        reg.promote(name, body.version)
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/traffic", dependencies=[Depends(admin)])
    async def traffic(name: str, body: TrafficBody) -> dict:
        reg.set_traffic(name, body.weights)
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/rollback", dependencies=[Depends(admin)])
    async def rollback(name: str, body: RollbackBody | None = None) -> dict:
        reg.rollback(name, reason=body.reason if body is not None else "manual")
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/unload", dependencies=[Depends(admin)])
    async def unload(name: str, body: VersionBody) -> dict:
        await reg.unload(name, body.version, timeout=state.shutdown_timeout)
        state.metrics.remove(name, body.version)
        return {"models": reg.list_models()}


# ---------------------------------------------------------------------------- errors and limits
def _audit_refusal(request: Request, status: int, reason: str) -> None:
    """One audit line for an API request refused before it was handled (bad key, draining,
    invalid body): failed authentication is what an audit log is most for."""
    state: ServerState = request.app.state.server
    if request.url.path.startswith("/v1/"):
        _audit(state.audit, request_id=None, endpoint=request.url.path, key_id=None, model=None, version=None,
               prompt_tokens=0, output_tokens=0, ttft=None, latency=None, finish_reason=reason, status=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        if not getattr(exc, "audited", False):
            _audit_refusal(request, exc.status, exc.code or "refused")
        return exc.response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:  # a bug: still OpenAI-shaped
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        _audit_refusal(request, 400, "invalid_request")
        return JSONResponse(error_body(400, f"{param + ': ' if param else ''}{message}{more}", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = exceeded = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # FastAPI answers a body it failed to read with a 400: the 413 below replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(413, f"the request body is larger than {self.limit} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass

