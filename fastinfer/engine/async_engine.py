"""``AsyncEngine``: the engine core for asyncio servers.

One background thread owns the ``Engine`` and runs its ``step`` loop; nothing else touches it.
Submissions, aborts and shutdown reach the thread through a thread-safe inbox; outputs go back
to each request's ``RequestStream`` on the event loop that submitted it (one
``call_soon_threadsafe`` per loop per step). It installs no signal handler and changes no
event-loop policy, so it embeds in FastAPI, aiohttp or a plain ``asyncio.run``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import EngineDeadError, EngineOverloadedError, EngineShutdownError, InvalidRequestError
from fastinfer.kv_cache.events import KVEventBatch
from fastinfer.sampling.grammar import Grammar
from fastinfer.sampling.params import SamplingParams
from fastinfer.validation import Prompt, check_float, check_int, check_str, fail


class RequestStream:
    """The outputs of one accepted request, in order: ``async for out in stream``. Ends after
    the output with ``finished=True``; raises ``EngineDeadError`` if the engine's loop died."""

    __slots__ = ("request_id", "loop", "finished", "_queue")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def _push(self, item: RequestOutput | BaseException) -> None:  # on ``loop``
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


def _push_batch(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream._push(item)


def _send(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> list[RequestStream]:
    """Pushes each item to its stream with one ``call_soon_threadsafe`` per event loop; returns
    the streams whose loop is closed (nothing was delivered to them)."""
    batches: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        batches.setdefault(stream.loop, []).append((stream, item))
    closed = []
    for loop, batch in batches.items():
        try:
            loop.call_soon_threadsafe(_push_batch, batch)
        except RuntimeError:
            closed.extend(stream for stream, _ in batch)
    return closed


class AsyncEngine:
    """``AsyncEngine(model, **engine_options)`` (the options of ``LLM``), or
    ``AsyncEngine.from_config(config)``.

    ``max_queued_requests`` / ``max_queued_tokens`` bound the requests (and their prompt tokens
    times ``n``) accepted but not yet started; past them ``add_request`` and ``generate`` raise
    ``EngineOverloadedError`` instead of growing the queue. Use it as ``async with`` or call
    ``await shutdown()``.
    """

    def __init__(self, model: str = "smollm2-135m", *, max_queued_requests: int | None = None,
                 max_queued_tokens: int | None = None, **options: Any) -> None:
        config = EngineConfig.from_options(model, **options)
        self._start(Engine(config), max_queued_requests, max_queued_tokens)

    @classmethod
    def from_config(cls, config: EngineConfig, *, loaded=None, max_queued_requests: int | None = None,
                    max_queued_tokens: int | None = None) -> AsyncEngine:
        """An engine for ``config`` (``loaded``: an already loaded model to reuse)."""
        return cls.from_engine(Engine(config, loaded), max_queued_requests=max_queued_requests,
                               max_queued_tokens=max_queued_tokens)

    @classmethod
    def from_engine(cls, engine: Engine, *, max_queued_requests: int | None = None,
                    max_queued_tokens: int | None = None) -> AsyncEngine:
        """Takes over ``engine``: from now on only this object's thread may touch it."""
        if not isinstance(engine, Engine):
            fail("engine", "an Engine", engine, wrong_type=True)
        self = cls.__new__(cls)
        self._start(engine, max_queued_requests, max_queued_tokens)
        return self

    def _start(self, engine: Engine, max_queued_requests: int | None, max_queued_tokens: int | None) -> None:
        self.engine = engine
        self.max_queued_requests = None if max_queued_requests is None else \
            check_int("max_queued_requests", max_queued_requests, lo=1)
        self.max_queued_tokens = None if max_queued_tokens is None else \
            check_int("max_queued_tokens", max_queued_tokens, lo=1)
        self._cond = threading.Condition()
        self._inbox: deque[tuple] = deque()
        self._accepting = True
        self._dead: BaseException | None = None
        # Owned by the engine thread:
        self._streams: dict[str, RequestStream] = {}
        self._queued: dict[str, int] = {}  # accepted, not yet run: prompt tokens
        self._queued_tokens = 0
        self._drain_waiters: list[concurrent.futures.Future] = []
        self._stop_waiter: concurrent.futures.Future | None = None
        self._more_stop_waiters: list[concurrent.futures.Future] = []  # concurrent shutdown() calls
        self._closed = False  # the loop has exited: posts are answered at once
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="fastinfer-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def get_tokenizer(self):
        """The model's tokenizer (read-only use from any thread)."""
        return self.engine.tokenizer

    @property
    def accepting(self) -> bool:
        """False once ``shutdown`` began or the loop died."""
        return self._accepting and self._dead is None

    def stats(self) -> dict[str, int]:
        """``Engine.stats()`` as of the last step, with ``num_queued`` (accepted, not started)."""
        return dict(self._stats)

    def kv_events(self) -> list[KVEventBatch]:
        """``Engine.kv_events()``: the blocks the prefix cache stored and removed since the
        previous call, one batch per step (safe to call from any thread)."""
        return self.engine.kv_events()

    def on_kv_events(self, callback: Callable[[KVEventBatch], None]) -> None:
        """``Engine.on_kv_events``: ``callback`` is called with each step's batch of KV events,
        in the engine's thread (hand it on to your loop with ``call_soon_threadsafe``)."""
        self.engine.on_kv_events(callback)

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) a request may reach."""
        return self.engine.max_model_len

    def memory_bytes(self) -> int:
        """Bytes of weights and KV cache this engine holds."""
        return self.engine.weight_bytes + self.engine.kv_cache.nbytes

    async def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                          request_id: str | None = None, *, priority: int = 0) -> RequestStream:
        """Submits one request and waits until the engine has accepted it; returns its stream.
        ``priority``: as ``Engine.add_request`` (a lower value is served first). Raises what
        ``Engine.add_request`` raises for bad input, ``EngineOverloadedError`` when the queue
        is full, ``EngineShutdownError`` while shutting down, ``EngineDeadError`` when the loop
        died. Cancelled while waiting, the request is aborted."""
        self._check_accepting()
        rid = uuid.uuid4().hex if request_id is None else check_str("request_id", request_id,
                                                                    error=InvalidRequestError)
        grammar = None
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            # Compiled off the engine's thread, under the time limit; this coroutine waits for it.
            grammar = await self.engine.structured.compile_async(params.structured_outputs)
        stream = RequestStream(rid, asyncio.get_running_loop())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        # The engine thread validates ``priority`` (in Engine.add_request) and answers ``accepted``.
        self._post(("add", rid, prompt, params, priority, stream, accepted, grammar))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            self._post(("abort", rid, stream))
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Streams the outputs of one request (as ``params.output_kind`` asks); the last has
        ``finished=True``. ``priority``: a lower value is served first (see
        ``Engine.add_request``). A consumer that stops iterating, or is cancelled, aborts the
        request and its KV blocks are freed before the next step."""
        stream = await self.add_request(prompt, params, request_id, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self._post(("abort", stream.request_id, stream))

    async def abort(self, request_id: str) -> None:
        """Ends a request; its stream gets a final output with ``finish_reason="abort"``
        (unknown or finished ids are ignored)."""
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` from synchronous code (any thread, a finalizer)."""
        self._post(("abort", check_str("request_id", request_id, error=InvalidRequestError), None))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets the running ones finish for up to ``timeout`` seconds
        (None: as long as they take), aborts the rest (each still gets exactly one final
        output) and stops the loop."""
        if timeout is not None:
            timeout = check_float("timeout", timeout, lo=0)
        self._accepting = False
        if self._thread.is_alive():
            drained: concurrent.futures.Future = concurrent.futures.Future()
            self._post(("drain", drained))
            try:
                await asyncio.wait_for(asyncio.wrap_future(drained), timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                pass
            stopped: concurrent.futures.Future = concurrent.futures.Future()
            self._post(("stop", stopped))
            await asyncio.wrap_future(stopped)
        await asyncio.to_thread(self._thread.join)
        self.engine.shutdown()  # tensor-parallel workers, if any

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ callers' side
    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}") from self._dead
        if not self._accepting:
            raise EngineShutdownError("the engine is shutting down and takes no new request")

    def _post(self, item: tuple) -> None:
        with self._cond:
            if not self._closed:
                self._inbox.append(item)
                self._cond.notify()
                return
        _answer_closed(item, self._dead)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._inbox and not engine.has_unfinished():
                        self._resolve_drained()
                        if self._stop_waiter is not None:
                            return
                        self._cond.wait()
                    items = list(self._inbox)
                    self._inbox.clear()
                for i, item in enumerate(items):
                    try:
                        self._handle(item)
                    except Exception as exc:  # a bad item fails only its own caller
                        if not _fail_item(item, exc):
                            with self._cond:  # answered by _finish_stop
                                self._inbox.extendleft(reversed(items[i + 1:]))
                            raise
                if engine.has_unfinished():
                    outputs = engine.step()
                    self._refresh()  # a reader who has seen this step's outputs sees its stats
                    self._deliver(outputs)
                self._refresh()
        except BaseException as exc:  # a bug or a broken device: fail everyone, loudly
            self._die(exc)
        finally:
            self._finish_stop()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "add":
            self._add(*item[1:])
        elif kind == "abort":
            rid, stream = item[1], item[2]
            if stream is None or self._streams.get(rid) is stream:
                self.engine.abort(rid)
        elif kind == "drain":
            self._drain_waiters.append(item[1])
        elif kind == "stop":
            if self._stop_waiter is None:
                self._stop_waiter = item[1]
            else:
                self._more_stop_waiters.append(item[1])
            for rid in list(self._streams):
                self.engine.abort(rid)

    def _add(self, rid: str, prompt: Prompt, params: SamplingParams | None, priority: int,
             stream: RequestStream, accepted: concurrent.futures.Future, grammar: Grammar | None) -> None:
        if not accepted.set_running_or_notify_cancel():
            return  # the caller was cancelled before the engine saw it
        if self._stop_waiter is not None:
            accepted.set_exception(EngineShutdownError("the engine is shutting down and takes no new request"))
            return
        admitted: list[int] = []  # what ``_admit`` accepted: the request's prefill tokens
        try:
            self.engine.add_request(prompt, params, rid, priority=priority, grammar=grammar,
                                    admit=lambda n: admitted.append(self._admit(n)))
        except Exception as exc:  # bad input or a full queue: refused, nothing changed
            accepted.set_exception(exc)
            return
        self._streams[rid] = stream
        tokens = admitted[0]
        self._queued[rid] = tokens
        self._queued_tokens += tokens
        accepted.set_result(rid)

    def _admit(self, tokens: int) -> int:
        """Refuses a request of ``tokens`` prefill tokens that would overflow the queue (a first
        one always fits); returns ``tokens`` when it fits."""
        if self.max_queued_requests is not None and len(self._queued) >= self.max_queued_requests:
            raise EngineOverloadedError(f"the queue is full: {len(self._queued)} requests wait to start "
                                        f"(max_queued_requests={self.max_queued_requests})")
        if self.max_queued_tokens is not None and self._queued and \
                self._queued_tokens + tokens > self.max_queued_tokens:
            raise EngineOverloadedError(f"the queue is full: {self._queued_tokens} prompt tokens wait to start and "
                                        f"this request adds {tokens} (max_queued_tokens={self.max_queued_tokens})")
        return tokens

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands each output to its stream: one ``call_soon_threadsafe`` per event loop."""
        items = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            items.append((stream, out))
        for stream in _send(items):  # its loop is closed: nobody listens, free the blocks
            self._streams.pop(stream.request_id, None)
            self.engine.abort(stream.request_id)

    def _refresh(self) -> None:
        for rid in [r for r in self._queued if not self.engine.is_waiting(r)]:
            self._queued_tokens -= self._queued.pop(rid)
        self._stats = self._snapshot()

    def _snapshot(self) -> dict[str, int]:
        stats = self.engine.stats()
        stats["num_queued"] = len(self._queued)
        return stats

    def _resolve_drained(self) -> None:
        """Idle with an empty inbox: wake the ``shutdown`` waiting for in-flight requests."""
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def _die(self, exc: BaseException) -> None:
        self._dead = exc
        error = EngineDeadError(f"the engine loop stopped: {exc!r}")
        error.__cause__ = exc
        _send([(stream, error) for stream in self._streams.values()])
        self._streams.clear()

    def _finish_stop(self) -> None:
        self._accepting = False
        with self._cond:
            self._closed = True
            pending, self._inbox = list(self._inbox), deque()
        for item in pending:
            _answer_closed(item, self._dead)
        self._resolve_drained()
        for fut in [self._stop_waiter, *self._more_stop_waiters]:
            if fut is not None and not fut.done():
                fut.set_result(None)


def _fail_item(item: tuple, exc: Exception) -> bool:
    """Answers an inbox item that raised with its error; False when no caller waits on it
    (then the loop itself is broken)."""
    fut = item[-1]
    if item[0] == "add" and isinstance(fut, concurrent.futures.Future):
        if not fut.done():
            fut.set_exception(exc)
        return True
    return item[0] == "abort"


def _answer_closed(item: tuple, dead: BaseException | None) -> None:
    """Answers what reaches a stopped loop: submissions are refused, waits end."""
    kind, fut = item[0], item[-1]
    if kind == "add" and fut.set_running_or_notify_cancel():
        fut.set_exception(EngineDeadError(f"the engine loop stopped: {dead!r}") if dead is not None
                          else EngineShutdownError("the engine is shut down and takes no new request"))
    elif kind in ("drain", "stop") and not fut.done():
        fut.set_result(None)
