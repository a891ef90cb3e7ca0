"""``Request``: one submitted prompt, its ``n`` sequences and what each has produced."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastinfer.sampling.detokenizer import IncrementalDetokenizer
from fastinfer.sampling.grammar import GrammarMatcher
from fastinfer.sampling.params import SamplingParams
from fastinfer.sampling.stop import StopText
from fastinfer.scheduler.sequence import Sequence


@dataclass(slots=True, eq=False)
class Sample:
    """One of the ``n`` completions: its sequence, detokenizer, RNG and results."""

    index: int
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator
    text: StopText
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0  # token ids (and logprobs) handed out in delta outputs
    grammar: GrammarMatcher | None = None  # structured outputs: where the text is in its grammar

    def completion(self) -> CompletionOutput:
        """Everything so far (text a stop string may still cut held back while running)."""
        logprobs = None if self.logprobs is None else list(self.logprobs)
        text = self.text.text
        visible = self.text.visible(self.finish_reason is not None)
        return CompletionOutput(self.index, text if visible == len(text) else text[:visible],
                                list(self.seq.output_token_ids), self.finish_reason, logprobs, self.stop_reason)

    def delta(self) -> CompletionOutput:
        """Only what is new since the previous delta: O(new), whatever the length so far."""
        start, tokens = self.sent_tokens, self.seq.output_token_ids
        self.sent_tokens = len(tokens)
        logprobs = None if self.logprobs is None else self.logprobs[start:]
        return CompletionOutput(self.index, self.text.take(self.finish_reason is not None), tokens[start:],
                                self.finish_reason, logprobs, self.stop_reason)


@dataclass(slots=True, eq=False)
class Request:
    """A validated request inside the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Sample]
    metrics: RequestMetrics
    reported_final: bool = field(default=False)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def output(self) -> RequestOutput | None:
        """This step's output, as ``params.output_kind`` asks (None: nothing to send yet).
        Outputs are snapshots: one already handed out never changes under its reader (the
        prompt's ids are shared between them: read them, do not change them)."""
        kind, finished = self.params.output_kind, self.finished
        if kind == "final_only" and not finished:
            return None
        samples = [s.delta() if kind == "delta" else s.completion() for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, samples, finished,
                             dataclasses.replace(self.metrics), self.samples[0].seq.num_cached_tokens)
