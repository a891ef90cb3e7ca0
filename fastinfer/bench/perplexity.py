"""Perplexity of a model over a text, through the engine's own path (paged KV cache, quantized
kernels, the attention backend in use): ``fastinfer eval ppl``.

Strided windows, as in Hugging Face's perplexity guide: windows of ``context`` tokens start
every ``stride`` tokens; each window scores only the tokens that the previous window did not,
so every token after the first is scored once, with up to ``context - stride`` tokens of
context before the scored ones.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fastinfer.engine.engine import Engine
from fastinfer.errors import InvalidArgumentError
from fastinfer.model.runner import StepInput

DEFAULT_TEXT = "pydoc_data"


def default_text() -> str:
    """CPython's ``pydoc_data`` topics (the language reference as plain text), in key order."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens scored
    nll_sum: float
    num_windows: int
    seconds: float


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window over ``n`` tokens: the window feeds tokens
    ``[begin, end)`` and scores the predictions of tokens ``[first_scored, end)``."""
    out, prev_end = [], 1  # token 0 has nothing before it
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        if end > prev_end:
            out.append((begin, end, max(prev_end, begin + 1)))
            prev_end = end
        if end == n:
            break
    return out


def perplexity(engine: Engine, token_ids: list[int], context: int = 512, stride: int = 256,
               progress=None) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``engine``'s model. ``progress(done, total)`` is called
    after each window."""
    if not 1 <= stride <= context:
        raise InvalidArgumentError(f"stride must be in [1, context={context}], got {stride}", "stride")
    if context > engine.max_model_len:
        raise InvalidArgumentError(f"context {context} exceeds the model's max_model_len {engine.max_model_len}",
                                   "context")
    if len(token_ids) < 2:
        raise InvalidArgumentError(f"the text must hold at least 2 tokens, got {len(token_ids)}", "text")
    spans = windows(len(token_ids), context, stride)
    nll, scored, start = 0.0, 0, time.perf_counter()
    blocks = engine.block_manager
    seq_id = -1  # never used by requests
    for i, (begin, end, first) in enumerate(spans):
        ids = token_ids[begin:end]
        blocks.reserve(seq_id, len(ids))
        try:
            # reserve may evict cached blocks to the host tier: those copies go first
            inp = StepInput([ids], [0], [blocks.block_table(seq_id)], block_ops=blocks.take_ops() or None)
            logits = engine.runner.execute(inp, all_logits=True)
        finally:
            blocks.free(seq_id)
        # logits[j] predicts token begin + j + 1
        pred = logits[first - 1 - begin:end - 1 - begin].float()
        target = torch.tensor(token_ids[first:end])
        nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
        scored += end - first
        if progress is not None:
            progress(i + 1, len(spans))
    return PerplexityResult(math.exp(nll / scored), scored, nll, len(spans), time.perf_counter() - start)
