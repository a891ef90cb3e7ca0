"""The output processor: the last stage of a step. It accepts each sampled token into its
sample (metrics, logprobs, incremental detokenization, stop conditions), ends the samples that
stop, and builds the step's ``RequestOutput``s. Speculative decoding will accept several
tokens of a sample in one step by calling :meth:`OutputProcessor.accept` for each in turn."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from fastinfer.engine.outputs import RequestOutput
from fastinfer.engine.request import Request, Sample
from fastinfer.scheduler.sequence import Sequence

_log = logging.getLogger("fastinfer.engine")

GRAMMAR_ERROR = "grammar_error"
"""The ``stop_reason`` of a sample aborted because its grammar failed (a refused token, or a
resource limit of the grammar engine): its text does not match the structured output."""


class OutputProcessor:
    """``finish(seq)`` releases a sequence that stopped (the scheduler's); ``forget(request)``
    is called once a request's final output is built (the engine drops it then)."""

    def __init__(self, eos_token_ids: frozenset[int], finish: Callable[[Sequence], None],
                 forget: Callable[[Request], None]) -> None:
        self.eos_token_ids = eos_token_ids
        self._release, self._forget = finish, forget

    def accept(self, req: Request, smp: Sample, token: int, logprobs, now: float, num_tokens: int) -> None:
        """After ``token`` joined ``smp``'s sequence (``num_tokens`` long with it): metrics,
        logprobs, detokenization and the stop conditions."""
        params = req.params
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if smp.logprobs is not None:
            smp.logprobs.append(logprobs)
        grammar_ended = smp.grammar is not None and smp.grammar.advance(token)
        if grammar_ended and smp.grammar.error is not None:
            # Its text would not match: ended as aborted, never "stop".
            _log.warning("request %s: its grammar failed (%s); the sample is aborted", req.request_id,
                         smp.grammar.error)
            self.finish(smp, "abort", GRAMMAR_ERROR)
        elif token in params.stop_token_ids:
            self.finish(smp, "stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            self.finish(smp, "stop", None)
        else:
            matched = smp.text.add(smp.detok.add(token))
            if matched is not None:
                self.finish(smp, "stop", matched)
        if smp.finish_reason is None and grammar_ended:  # complete (an EOS under ignore_eos)
            self.finish(smp, "stop", None)
        if smp.finish_reason is None and num_tokens >= smp.seq.stop_at:  # max_tokens, or max_model_len
            self.finish(smp, "length", None)

    def finish(self, smp: Sample, reason: str, stop_reason: str | int | None) -> None:
        """Ends ``smp`` (its blocks are freed before the next step)."""
        smp.finish_reason, smp.stop_reason = reason, stop_reason
        self._release(smp.seq)

    def emit(self, touched: Iterable[Request], finals_only: bool = False) -> list[RequestOutput]:
        """The outputs of the requests a step touched (only the finished ones' with
        ``finals_only``); each request's final output is built exactly once."""
        outputs = []
        now = time.monotonic()
        for req in touched:
            if req.reported_final or (finals_only and not req.finished):
                continue
            if req.finished:
                req.metrics.finished_time = req.metrics.finished_time or now
                self._forget(req)
                req.reported_final = True  # last: an interrupt before it leaves the request to re-report
            out = req.output()
            if out is not None:
                outputs.append(out)
        return outputs
