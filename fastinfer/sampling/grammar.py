"""Structured outputs on llguidance: compiled grammars (cached, compiled off the caller's
thread under a time limit), one matcher per sample, and each step's token masks.

The engine asks :class:`StructuredOutputs` for a compiled :class:`Grammar` when a request
arrives (``compile``), gives each sample a :class:`GrammarMatcher` of it, starts the step's
masks (:meth:`StructuredOutputs.start_masks`) before the forward pass, so llguidance fills the
bitmask on its own thread while the model runs, and the sampler applies them
(:meth:`TokenMasks.apply`) to the logits. Each sampled token then advances its matcher
(:meth:`GrammarMatcher.advance`). Why llguidance: ``benchmarks/grammar_engines.py`` measured
it against xgrammar on this machine's CPUs (see its module docstring).

A bitmask row holds one bit per token id (bit ``i % 32`` of int32 word ``i // 32``; 1 means
allowed), as both llguidance and xgrammar lay it out.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fastinfer.errors import InvalidRequestError
from fastinfer.sampling.params import StructuredOutputsParams

# Compiled grammars kept for reuse (least recently used dropped first).
_CACHE_SIZE = 256
# Threads that compile grammars: a compile past its time limit keeps its thread until it ends
# (a native call cannot be interrupted), so the others keep serving the other requests.
_COMPILE_THREADS = 4


class GrammarCompileTimeout(InvalidRequestError):
    """A grammar took longer than the compile time limit to compile; the request is refused
    (a server answers 400). Later requests with the same grammar wait for the same compile."""


@dataclass(frozen=True, slots=True)
class Grammar:
    """A compiled grammar: a fresh matcher that each sample copies."""

    key: tuple[str, str, bool]
    template: object  # llguidance.LLMatcher, never advanced
    owner: object  # the StructuredOutputs (one tokenizer) that compiled it


class GrammarMatcher:
    """One sample's position in its grammar. ``eos_ids``: every token that ends the model's
    text (all are allowed once the grammar is complete)."""

    __slots__ = ("matcher", "eos_ids", "ended")

    def __init__(self, grammar: Grammar, eos_ids: frozenset[int]) -> None:
        self.matcher = grammar.template.deep_copy()
        self.eos_ids = eos_ids
        self.ended = False

    def advance(self, token: int) -> bool:
        """Feeds a sampled token; returns True when the grammar has ended with it: an EOS after
        complete text, a grammar that allows nothing more, or an error (``error`` then says
        why: a refused token, or a resource limit of llguidance's that left no token allowed)."""
        if token in self.eos_ids and self.matcher.is_accepting():
            self.ended = True
        elif not self.matcher.consume_token(token):
            self.ended = True
        else:
            self.ended = self.matcher.is_stopped()
        return self.ended

    def valid_prefix(self, tokens: list[int]) -> list[int]:
        """The longest prefix of ``tokens`` (speculative drafts) that the grammar allows from
        here; the matcher does not move."""
        if self.ended:
            return []
        return tokens[:self.matcher.validate_tokens(tokens)]

    def along(self, tokens: list[int]) -> list[GrammarMatcher]:
        """This matcher and, for each of ``tokens`` (drafts it allows), a copy advanced through
        the tokens up to it: the grammar's state at each position a verification step samples."""
        out = [self]
        for t in tokens:
            nxt = GrammarMatcher.__new__(GrammarMatcher)
            nxt.matcher, nxt.eos_ids, nxt.ended = out[-1].matcher.deep_copy(), self.eos_ids, False
            nxt.advance(t)
            out.append(nxt)
        return out

    @property
    def error(self) -> str | None:
        """Why the matcher stopped on an error, or None."""
        return self.matcher.get_error() or "error" if self.matcher.is_error() else None


class TokenMasks:
    """One step's bitmask for the batch rows ``rows`` (those with a grammar), being filled on
    a worker thread; :meth:`apply` waits for it and masks the logits. ``complete``: the
    positions in ``rows`` whose grammar is complete (every EOS id may end it, not only the one
    llguidance knows)."""

    __slots__ = ("rows", "bitmask", "_done", "_complete", "_eos")

    def __init__(self, rows: list[int], bitmask: torch.Tensor, done: concurrent.futures.Future,
                 complete: list[int], eos_ids: list[int]) -> None:
        self.rows, self.bitmask, self._done = rows, bitmask, done
        self._complete, self._eos = complete, eos_ids

    def apply(self, logits: torch.Tensor, out: torch.Tensor) -> None:
        """Writes ``logits`` [B, V] to ``out`` (float32, same shape; may be ``logits``) with -inf
        for every token row ``rows[i]`` may not take, in one pass over the whole batch's rows.
        A row whose grammar allows nothing (it ended on an error) may take only EOS."""
        self._done.result()
        words = self.bitmask.numpy().view(np.uint32)
        eos_words = np.array([t >> 5 for t in self._eos], dtype=np.int64)
        eos_bits = np.array([1 << (t & 31) for t in self._eos], dtype=np.uint32)
        ending = [j for j in range(len(words)) if j in self._complete or not words[j].any()]
        for j in ending:
            np.bitwise_or.at(words[j], eos_words, eos_bits)
        forbidden = forbidden_tokens(words, logits.shape[1], logits.device)
        minus_inf = torch.tensor(float("-inf"), device=logits.device)
        if len(self.rows) == logits.shape[0]:
            torch.where(forbidden, minus_inf, logits, out=out)
            return
        if out is not logits:
            out.copy_(logits)
        index = torch.tensor(self.rows, dtype=torch.long, device=logits.device)
        out.index_copy_(0, index, torch.where(forbidden, minus_inf, out.index_select(0, index)))


def forbidden_tokens(words: np.ndarray, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """Bitmask words [R, W] (uint32, a 1 bit allows its token) -> a bool tensor [R, vocab] on
    ``device`` (default the CPU), True where the token is not allowed; ids past ``32 * W`` are
    never allowed. On the CPU one unpacking pass (the 0/1 bytes read as bools in place); on a
    GPU the packed words go over (32 times fewer bytes) and are unpacked there."""
    if device is not None and device.type != "cpu":
        packed = torch.from_numpy(words.view(np.uint8)).to(device, non_blocking=True)  # little-endian bytes
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(len(words), -1)  # one byte a token
        forbidden = bits == 0
        if forbidden.shape[1] < vocab:
            forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[1]), value=True)
        return forbidden[:, :vocab]
    bits = np.unpackbits(np.invert(words).view(np.uint8), axis=1, bitorder="little")
    if bits.shape[1] < vocab:
        bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])), constant_values=1)
    return torch.from_numpy(np.ascontiguousarray(bits[:, :vocab])).view(torch.bool)


class StructuredOutputs:
    """Grammars for one engine's tokenizer: compiles (cached; ``compile_timeout`` seconds at
    most), hands out matchers, fills the masks of each step.

    ``tokenizer``: the engine's (its ``backend`` is a ``tokenizers.Tokenizer``); ``vocab_size``:
    the width of the model's logits; ``eos_ids``: the tokens that end the model's text.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], compile_timeout: float) -> None:
        self._tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self.compile_timeout = compile_timeout
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, concurrent.futures.Future] = OrderedDict()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._filler: concurrent.futures.ThreadPoolExecutor | None = None
        self._lltok = self._executor = None
        self._bitmask: torch.Tensor | None = None

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compile of ``spec`` (a future of its :class:`Grammar`): cached, or started now on
        a compile thread. Thread-safe; a failed compile is not cached."""
        self.setup()
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.cancelled() or (fut.done() and fut.exception() is not None)):
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec, key)
            self._cache[key] = fut
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def compile(self, spec: StructuredOutputsParams, timeout: float | None = None) -> Grammar:
        """The compiled grammar of ``spec``, waiting ``timeout`` seconds at most (default: the
        engine's ``compile_timeout``). Raises ``GrammarCompileTimeout`` past it and
        ``InvalidRequestError`` for an invalid schema, regex or grammar."""
        fut = self.submit(spec)
        limit = self.compile_timeout if timeout is None else timeout
        try:
            return fut.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(spec, limit) from None

    async def compile_async(self, spec: StructuredOutputsParams) -> Grammar:
        """``compile`` for a coroutine: waits on the event loop, holding no thread. A compile
        past the limit is left running (others may wait for the same one; it is cached when it
        ends), never cancelled."""
        fut = self.submit(spec)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.compile_timeout)
        except asyncio.TimeoutError:
            raise self._timed_out(spec, self.compile_timeout) from None

    @staticmethod
    def _timed_out(spec: StructuredOutputsParams, limit: float) -> GrammarCompileTimeout:
        return GrammarCompileTimeout(f"structured_outputs.{spec.kind} did not compile within {limit:g} s "
                                     "(grammar_compile_timeout); simplify it", "structured_outputs")

    def compile_now(self, spec: StructuredOutputsParams) -> Grammar:
        """Compiles ``spec`` on the calling thread, past the cache and with no time limit (what
        a benchmark times)."""
        self.setup()
        return self._compile(spec, spec.key())

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A new sample's matcher, at the start of ``grammar``."""
        return GrammarMatcher(grammar, self.eos_ids)

    def start_masks(self, matchers: list[GrammarMatcher | None]) -> TokenMasks | None:
        """Starts filling the masks of one step's sampled rows (None where a row has no
        grammar) on the fill thread; None when no row has one. The matchers must not advance
        until the masks are applied."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        bitmask = self._rows_bitmask(len(rows))
        work = [(matchers[r].matcher, j) for j, r in enumerate(rows)]
        complete = [j for j, r in enumerate(rows) if matchers[r].matcher.is_accepting()]
        done = self._filler.submit(self._fill, work, bitmask)
        return TokenMasks(rows, bitmask, done, complete, sorted(self.eos_ids))

    # ------------------------------------------------------------------ internals
    def setup(self) -> None:
        """Builds the llguidance tokenizer (about 0.2 s, once) and the threads; done on first use."""
        with self._lock:
            if self._lltok is not None:
                return
            import llguidance  # noqa: PLC0415 -- only engines that constrain outputs load it
            self._lltok = llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                                 n_vocab=self.vocab_size, eos_token=sorted(self.eos_ids))
            self._executor = llguidance.LLExecutor()
            self._pool = concurrent.futures.ThreadPoolExecutor(_COMPILE_THREADS, "fastinfer-grammar")
            self._filler = concurrent.futures.ThreadPoolExecutor(1, "fastinfer-masks")

    def _compile(self, spec: StructuredOutputsParams, key: tuple) -> Grammar:
        """Runs on a compile thread (llguidance drops the GIL while it builds a matcher)."""
        import llguidance  # noqa: PLC0415
        try:
            text = _grammar_text(llguidance, spec)
        except Exception as exc:  # noqa: BLE001 -- the GBNF converter raises bare Exceptions
            raise InvalidRequestError(f"structured_outputs.{spec.kind} is invalid: {exc}",
                                      "structured_outputs") from None
        template = llguidance.LLMatcher(self._lltok, text, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"structured_outputs.{spec.kind} is invalid: "
                                      f"{_first_line(template.get_error())}", "structured_outputs")
        return Grammar(key, template, self)

    def _rows_bitmask(self, rows: int) -> torch.Tensor:
        """A [rows, W] int32 bitmask from a buffer reused between steps (the previous step's
        masks are applied by then: steps run one after another)."""
        width = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = torch.empty((max(rows, 8), width), dtype=torch.int32)
        return self._bitmask[:rows]

    def _fill(self, work: list[tuple[object, int]], bitmask: torch.Tensor) -> None:
        """Fills the bitmask rows (llguidance's threads; the GIL is dropped)."""
        self._executor.unsafe_compute_mask_ptr(work, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def _grammar_text(llguidance, spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for ``spec`` (raises ValueError for an unparsable one)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": spec.whitespace_flexible})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choice))
    from llguidance.gbnf_to_lark import any_to_lark  # noqa: PLC0415
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
