"""One completion or chat request from validation to its audit line: ``Job`` routes it to a
model version, builds the prompt and the sampling parameters, takes the quota, submits it to the
engine, counts its outputs into the metrics and, however it ends (the last token, a stop, the
client leaving, an error), releases what it held and writes one audit line. The responses it
sends are shaped in ``responses`` and ``streaming``."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid

from fastapi import Request

from fastinfer import __version__
from fastinfer.engine.outputs import RequestOutput
from fastinfer.errors import EngineDeadError, EngineOverloadedError, EngineShutdownError, InvalidArgumentError
from fastinfer.sampling.params import SamplingParams
from fastinfer.server.audit import record_quietly
from fastinfer.server.errors import APIError
from fastinfer.server.keys import KeyPolicy, QuotaExceeded, scope_of
from fastinfer.server.state import ServerState
from fastinfer.server.tools import ToolPlan, detect_parser, named_schema, prompt_messages, required_schema

_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_INLINE_PROMPT_CHARS = 8192  # longer prompts are tokenized in a worker thread
_ABANDON_WAIT_S = 5.0  # how long a left request's aborted outputs are awaited, to count its tokens


class Job:
    """One completion (``chat=False``) or chat request from validation to its audit line."""

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
        self.cached_tokens = 0  # prompt tokens the prefix cache served, over finished prompts
        self.ttft: float | None = None
        self.finish_reasons: list[str] = []
        self.logprob_sum, self.logprob_count = 0.0, 0
        self.status = 200
        self.user_logprobs: int | None = None
        self.tools: ToolPlan | None = None  # chat requests with tools: how their replies are read
        # The request field that constrains the output, and how its refusals name it.
        self._structured_param = self._structured_label = "structured_outputs"
        self._generated: dict[int, int] = {}  # tokens per engine request
        self._observed: set[int] = set()  # engine requests whose final output reached the metrics
        self._engine_dead = False
        self._charge_estimate = False  # a left request whose tokens are unknown: bill the estimate
        self._prompt_lens: list[int] = []
        self.prompt_ids: list[list[int]] = []
        self._ended = False
        self._holds_slot = False  # counted in the version's in_flight

    @property
    def model_name(self) -> str:
        """``name@version`` of the version serving the request (once routed)."""
        return f"{self.mv.name}@{self.mv.version}"

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: the server's and the serving version's."""
        return f"fastinfer-{__version__}-{self.mv.version}"

    # -- setup ------------------------------------------------------------------
    async def submit(self) -> None:
        """Routes the request, takes its quota and hands its prompts to the engine; a failure
        ends the request (releasing what it took, writing its audit line) and propagates."""
        try:
            await self._submit()
        except BaseException as exc:
            self.abort_unfinished()  # prompts of a batch accepted before one was refused
            self.end(exc)
            raise

    async def _submit(self) -> None:
        self.mv = mv = self.state.registry.route(self.body.model, scope_of(self.policy))
        if self.policy is not None and not self.policy.allows(mv.name):
            raise APIError(403, f"this API key may not use model {mv.name!r}", param="model", code="model_not_allowed")
        engine = mv.engine
        mv.acquire()  # before any await: an unload waits for this request from here on
        self._holds_slot = True
        # A long prompt's tokenization (or chat template) would stall every stream of this loop.
        prompts = (await asyncio.to_thread(self._prompt_ids, engine) if self._prompt_chars() > _INLINE_PROMPT_CHARS
                   else self._prompt_ids(engine))
        self.prompt_ids = prompts
        self.prompt_tokens = sum(len(p) for p in prompts)
        self._prompt_lens = [len(p) for p in prompts]
        params = self._params(engine, prompts)
        self._acquire_quota(self.prompt_tokens + params.max_tokens * params.n * len(prompts))
        await self._add_requests(engine, prompts, params)

    def _acquire_quota(self, estimate: int) -> None:
        try:
            self.lease = self.state.quotas.acquire(self.policy, estimate) if self.policy is not None else None
        except QuotaExceeded as exc:
            if exc.never_fits:  # waiting never helps: a request error, not a rate limit
                raise APIError(400, f"{exc.reason}; lower max_tokens", param="max_tokens",
                               code="exceeds_token_quota") from exc
            raise APIError(429, str(exc.reason), code="rate_limit_exceeded", retry_after=exc.retry_after) from exc

    async def _add_requests(self, engine, prompts: list[list[int]], params: SamplingParams) -> None:
        # A batch's prompts are submitted together (one engine step, not one each); whatever
        # ends this early (a refusal, a cancellation), every accepted prompt is kept to abort.
        tasks = [asyncio.ensure_future(engine.add_request(ids, params, priority=self.body.priority))
                 for ids in prompts]
        try:
            await asyncio.wait(tasks)
        finally:
            for t in tasks:
                t.cancel()  # a no-op for the finished ones; a pending add aborts itself
            self.streams = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:
            self._raise_refusal(errors)
        self._prompt_lens = self._prompt_lens[:len(self.streams)]

    def _raise_refusal(self, errors: list[BaseException]) -> None:
        """Raises the engine's refusal of a prompt as the error the client gets."""
        # A request error first: a 429 must not hide a 400 that no retry fixes.
        error = next((e for e in errors if isinstance(e, InvalidArgumentError)), errors[0])
        if isinstance(error, EngineOverloadedError):
            raise APIError(429, str(error), code="engine_overloaded", retry_after=1) from error
        if isinstance(error, EngineDeadError):
            self._engine_dead = True  # a canary whose loop died must count as failing
        if isinstance(error, (EngineShutdownError, EngineDeadError)):
            raise APIError(503, str(error), code="engine_unavailable", retry_after=5) from error
        if isinstance(error, InvalidArgumentError):
            raise self._refusal(error) from error
        raise error

    def _prompt_chars(self) -> int:
        if self.chat:
            return sum(len(m.text()) for m in self.body.messages)
        return sum(len(p) for p in self.body.prompts() if isinstance(p, str))

    def _prompt_ids(self, engine) -> list[list[int]]:
        tok = engine.get_tokenizer()
        try:
            if self.chat:
                messages, extra = prompt_messages(self.body, tok.chat_template)
                return [list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra))]
            return [tok.encode(p) if isinstance(p, str) else list(p) for p in self.body.prompts()]
        except (InvalidArgumentError, ValueError, TypeError) as exc:
            raise APIError(400, f"cannot build the prompt: {exc}", param="messages" if self.chat else "prompt") from exc

    def _params(self, engine, prompts: list[list[int]]) -> SamplingParams:
        body = self.body
        top = ((body.top_logprobs or 0) if body.logprobs else None) if self.chat else body.logprobs
        max_tokens = self._max_tokens(engine.max_model_len, prompts)
        self.user_logprobs = top
        # A version under canary watch reports its sampled tokens' log-probabilities.
        watched = top is None and self.state.registry.monitored(self.mv)
        try:
            return SamplingParams(n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  stop=body.stop, seed=body.seed, ignore_eos=body.ignore_eos,
                                  logprobs=0 if watched else top,
                                  output_kind="delta" if body.stream else "final_only",
                                  logit_bias=body.logit_bias, structured_outputs=self._structured(engine))
        except InvalidArgumentError as exc:
            raise self._refusal(exc) from exc

    def _structured(self, engine) -> dict | None:
        """What constrains the output, as ``StructuredOutputsParams`` fields: a tool choice that
        must call, vLLM's ``structured_outputs``, or ``response_format``. Sets ``self.tools``."""
        body = self.body
        mode = body.tool_mode() if self.chat else None
        if mode is not None:
            parser = self.state.tool_call_parser or detect_parser(engine.get_tokenizer().chat_template)
            name = body.tool_choice.function.name if mode == "named" else None
            self.tools = ToolPlan(mode, parser, name, body.parallel_tool_calls)
            tools = [t.model_dump() for t in body.tools]
            if mode == "named":
                i = next(i for i, t in enumerate(body.tools) if t.function.name == name)
                self._structured_param, self._structured_label = "tools", f"tools[{i}].function.parameters"
                return {"json": named_schema(tools[i])}
            if mode == "required":
                self._structured_param = self._structured_label = "tools"
                return {"json": required_schema(tools, body.parallel_tool_calls)}
        if body.structured_outputs is not None:
            return body.structured_outputs.fields()
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        self._structured_param = "response_format"
        if fmt.type == "json_object":
            self._structured_label = "response_format"
            return {"json_object": True}
        self._structured_label = "response_format.json_schema.schema"
        return {"json": fmt.json_schema.json_schema}

    def _refusal(self, exc: InvalidArgumentError) -> APIError:
        """The 400 of an engine refusal, naming the request field it is about (a structured
        output's spec is named as the client sent it: response_format, tools...)."""
        arg, message = exc.argument, str(exc)
        if arg and arg.startswith("structured_outputs") and self._structured_label != "structured_outputs":
            message = re.sub(r"^structured_outputs(\.\w+)?", self._structured_label, message)
            arg = self._structured_param
        return APIError(400, message, param=arg)

    def _max_tokens(self, max_model_len: int, prompts: list[list[int]]) -> int:
        """The tokens each sample may generate: as asked (400 when a prompt and they exceed
        the context), else what fits both the context and the key's per-minute token allowance
        (capped at 16 for completions, OpenAI's default)."""
        param = "max_completion_tokens" if self.chat and self.body.max_completion_tokens else "max_tokens"
        asked = getattr(self.body, param)
        if asked is not None:
            self._check_context(max_model_len, prompts, asked, param)
            return asked
        room = max_model_len - max(len(p) for p in prompts)  # <= 0: the engine refuses the prompt
        default = room if self.chat else min(room, _COMPLETION_DEFAULT_MAX_TOKENS)
        return max(1, min(default, self._quota_room(len(prompts))))

    def _check_context(self, max_model_len: int, prompts: list[list[int]], asked: int, param: str) -> None:
        """400 (vLLM's message) when a prompt plus ``asked`` tokens exceeds the context; a
        prompt that alone fills it is left to the engine's refusal."""
        over = next((len(p) for p in prompts if len(p) < max_model_len < len(p) + asked), None)
        if over is None:
            return
        where = "messages" if self.chat else "prompt"
        raise APIError(400, f"This model's maximum context length (max_model_len) is {max_model_len} tokens. "
                       f"However, you requested {over + asked} tokens ({over} in the {where}, {asked} in the "
                       f"completion). Please reduce the length of the {where} or the completion ({param}).",
                       param=param, code="context_length_exceeded")

    def _quota_room(self, prompt_count: int) -> int:
        """The most tokens each sample may generate within the key's tokens_per_minute: what
        is left of it now, or (nothing left: the request then waits with a 429) its size."""
        tpm = self.policy.tokens_per_minute if self.policy is not None else None
        if tpm is None:
            return sys.maxsize
        samples = self.body.n * prompt_count
        left = tpm - self.state.quotas.usage(self.policy.id).tokens_in_window
        now = (left - self.prompt_tokens) // samples
        return now if now >= 1 else (tpm - self.prompt_tokens) // samples

    # -- outputs ------------------------------------------------------------------
    def observe(self, index: int, out: RequestOutput, gap: float | None, streaming: bool = False) -> None:
        """Counts one output of engine request ``index``: its tokens (and, streaming, the gap
        since the stream's previous output: None for its first) and, once finished, its end."""
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
            self._observe_finish(index, out, streaming)

    def _observe_finish(self, index: int, out: RequestOutput, streaming: bool) -> None:
        m, (name, version), mt = self.state.metrics, (self.mv.name, self.mv.version), out.metrics
        if mt.ttft is not None:
            m.first_token(name, version, mt.ttft)
        if not streaming and mt.first_token_time is not None and mt.finished_time:
            span = mt.finished_time - mt.first_token_time  # each sample: its tokens after the first
            for c in out.outputs:
                if len(c.token_ids) > 1:
                    m.tokens(name, version, len(c.token_ids) - 1, span)
        self.cached_tokens += out.num_cached_tokens or 0  # None: never scheduled
        reason = _overall_reason(out)
        self.finish_reasons.append(reason)
        self._observed.add(index)
        m.finished(name, version, queue_time_s=mt.time_in_queue,
                   e2e_s=(mt.finished_time - mt.arrival_time) if mt.finished_time else None,
                   prompt_tokens=len(out.prompt_token_ids), generation_tokens=self._generated[index],
                   finish_reason=reason)

    # -- the end ------------------------------------------------------------------
    def abort_unfinished(self) -> None:
        """Aborts the engine requests that have not finished."""
        for s in self.streams:
            if not s.finished:
                s.finished = True
                self.mv.engine.abort_nowait(s.request_id)

    async def abandon(self, finals: asyncio.Future) -> None:
        """Ends a whole-response request whose client left: its engine requests are aborted and
        their final outputs (``finals``: the list of them) awaited a few seconds, so that the
        audit line, the metrics and the quota count the tokens generated; status 499. Without
        them in time, it is billed at its estimate."""
        self.status = 499
        for s in self.streams:
            if not s.finished:  # the stream stays readable: its final output is the one awaited
                self.mv.engine.abort_nowait(s.request_id)
        done, _ = await asyncio.wait({finals}, timeout=_ABANDON_WAIT_S)
        if finals in done and finals.exception() is None:
            for i, out in enumerate(finals.result()):
                self.observe(i, out, None, streaming=False)
        else:
            finals.cancel()
            self._charge_estimate = True
        self.end(None)

    def dropped(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event generator was dropped (maybe by the garbage collector, on any thread):
        clean up on the request's own loop."""
        def cleanup() -> None:
            if not self._ended:
                self.abort_unfinished()
                self.status = 499
                self.end(None)
        try:
            loop.call_soon_threadsafe(cleanup)
        except RuntimeError:  # the loop is closed: the server is gone, and its engines with it
            pass

    def end(self, error: BaseException | None) -> None:
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
        self._write_audit(latency)

    def _write_audit(self, latency: float) -> None:
        mv = self.mv
        reason = ",".join(sorted(set(self.finish_reasons))) or ("abort" if self.status == 499 else None)
        record_quietly(
            self.state.audit,
            request_id=self.id, endpoint="/v1/chat/completions" if self.chat else "/v1/completions",
            key_id=self.policy.id if self.policy is not None else None,
            model=mv.name if mv is not None else self.body.model, version=mv.version if mv is not None else None,
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, ttft=self.ttft, latency=latency,
            finish_reason=reason, status=self.status, prompt=self._prompt_text())

    def prompt_text_of(self, index: int) -> str:
        """The text of prompt ``index`` (token ids decoded), as ``echo`` repeats it."""
        prompt = self.body.prompts()[index]
        return prompt if isinstance(prompt, str) else self.mv.engine.get_tokenizer().decode(prompt)

    def _prompt_text(self) -> str | None:
        if self.chat:
            return json.dumps([{"role": m.role, "content": m.text()} for m in self.body.messages])
        p = self.body.prompt
        return p if isinstance(p, str) else json.dumps(p)


def _overall_reason(out: RequestOutput) -> str:
    """One finish reason for an engine request's samples: any abort, else any length, else stop."""
    reasons = [c.finish_reason or "abort" for c in out.outputs]
    return "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
