"""``Request``: one submitted prompt, its ``n`` sequences and what each has produced."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fastinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastinfer.sampling.detokenizer import IncrementalDetokenizer
from fastinfer.sampling.params import SamplingParams
from fastinfer.scheduler.sequence import Sequence


@dataclass(slots=True, eq=False)
class Sample:
    """One of the ``n`` completions: its sequence, detokenizer, RNG and results."""

    index: int
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def completion(self) -> CompletionOutput:
        logprobs = None if self.logprobs is None else list(self.logprobs)
        return CompletionOutput(self.index, self.text, list(self.seq.output_token_ids),
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

    def output(self) -> RequestOutput:
        # Snapshots: an output already handed out never changes under its reader.
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids),
                             [s.completion() for s in self.samples], self.finished,
                             dataclasses.replace(self.metrics))
