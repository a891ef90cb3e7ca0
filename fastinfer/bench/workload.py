"""Deterministic benchmark workloads: prompts cut from real English text (CPython's language
reference, shipped with most Pythons; else the standard library's docstrings) with lengths
drawn under a seed."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompt token ids and the number of tokens each request must generate."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    seed: int

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


PYDOC_DATA = "pydoc_data"
DOCSTRINGS = "standard library docstrings (no pydoc_data here)"


def corpus_source() -> str:
    """Which text :func:`corpus_text` gives on this Python: ``PYDOC_DATA`` or ``DOCSTRINGS``."""
    try:
        import pydoc_data.topics  # noqa: F401
    except ImportError:
        return DOCSTRINGS
    return PYDOC_DATA


def corpus_text() -> str:
    """English prose: CPython's language reference (``pydoc_data``), or the standard library's
    docstrings where a distribution leaves ``pydoc_data`` out."""
    try:
        import pydoc_data.topics as topics
    except ImportError:
        return _docstrings()
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _docstrings() -> str:
    import argparse
    import collections
    import inspect
    import json
    import os
    import re
    import string

    docs = []
    for mod in (os, re, json, collections, inspect, string, argparse):
        for _, obj in sorted(vars(mod).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                docs.append(doc)
    return "\n\n".join(docs)


def corpus_token_ids(tokenizer, min_tokens: int) -> list[int]:
    """At least ``min_tokens`` token ids of English prose (:func:`corpus_text`, repeated when
    the text is short)."""
    ids = tokenizer.encode(corpus_text())
    while len(ids) < min_tokens:
        ids = ids + ids
    return ids


def mixed_workload(tokenizer, num_prompts: int, input_range: tuple[int, int],
                   output_range: tuple[int, int], seed: int = 0, name: str = "mixed") -> Workload:
    """``num_prompts`` requests with input and output lengths uniform in the (inclusive)
    ranges, prompts taken from consecutive, non-overlapping slices of the corpus."""
    for label, (lo, hi) in (("input", input_range), ("output", output_range)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{label} length range must satisfy 1 <= lo <= hi, got {(lo, hi)}")
    rng = random.Random(seed)
    in_lens = [rng.randint(*input_range) for _ in range(num_prompts)]
    out_lens = [rng.randint(*output_range) for _ in range(num_prompts)]
    ids = corpus_token_ids(tokenizer, sum(in_lens))
    prompts, pos = [], rng.randrange(0, max(1, len(ids) - sum(in_lens)))
    for n in in_lens:
        if pos + n > len(ids):
            pos = 0
        prompts.append(ids[pos:pos + n])
        pos += n
    return Workload(name, prompts, out_lens, seed)


def prefix_workload(tokenizer, num_prompts: int, prefix_len: int, suffix_range: tuple[int, int],
                    output_range: tuple[int, int], seed: int = 0) -> Workload:
    """Requests that share one ``prefix_len``-token prefix (a system prompt) followed by
    distinct suffixes: the workload a prefix cache speeds up."""
    base = mixed_workload(tokenizer, num_prompts, suffix_range, output_range, seed, name="prefix")
    prefix = corpus_token_ids(tokenizer, prefix_len + sum(base.input_lens))[-prefix_len:]
    return Workload("prefix", [prefix + p for p in base.prompts], base.output_lens, seed)


def shared_prefix_workload(tokenizer, num_prompts: int, groups: int, prefix_len: int, suffix_range: tuple[int, int],
                           output_range: tuple[int, int], seed: int = 0) -> Workload:
    """Requests over ``groups`` distinct shared prefixes of ``prefix_len`` tokens (documents or
    system prompts that several users ask about), each request one of them (drawn under the
    seed) plus its own suffix: the workload that routing by cached prefix speeds up. Another
    seed takes its prefixes from elsewhere in the corpus."""
    base = mixed_workload(tokenizer, num_prompts, suffix_range, output_range, seed, name="shared-prefix")
    ids = corpus_token_ids(tokenizer, 4 * groups * prefix_len + sum(base.input_lens))
    rng = random.Random(seed)
    start = rng.randrange(0, len(ids) - groups * prefix_len + 1)
    prefixes = [ids[start + g * prefix_len:start + (g + 1) * prefix_len] for g in range(groups)]
    prompts = [prefixes[rng.randrange(groups)] + p for p in base.prompts]
    return Workload("shared-prefix", prompts, base.output_lens, seed)


def dataset_workload(tokenizer, entries, output_range: tuple[int, int], seed: int = 0,
                     num_prompts: int | None = None, name: str = "dataset",
                     max_model_len: int | None = None) -> Workload:
    """Requests from dataset entries (``prompt``, optional ``max_tokens``); entries without
    ``max_tokens`` draw their output length from ``output_range``. Entries whose prompt plus
    output would not fit in ``max_model_len`` are skipped (as vLLM's benchmarks do)."""
    rng = random.Random(seed)
    prompts, outs = [], []
    for e in entries:
        if num_prompts is not None and len(prompts) == num_prompts:
            break
        ids = tokenizer.encode(e.prompt)
        n = e.max_tokens or rng.randint(*output_range)
        if ids and (max_model_len is None or len(ids) + n <= max_model_len):
            prompts.append(ids)
            outs.append(n)
    if not prompts:
        raise ValueError("no dataset entry fits: every prompt is empty or longer than max_model_len")
    return Workload(name, prompts, outs, seed)
