"""The sampler: one token (and optional logprobs) per sequence per engine step.

Pipeline per row (vLLM's semantics): the logit bias and the grammar's token mask (structured
outputs) first, so logprobs see them too; penalties on the float32 logits; greedy rows take the
argmax; random rows divide by the temperature, take the softmax, keep the top-k / top-p /
min-p survivors and draw one token by inverse CDF with ONE uniform from the row's own
``torch.Generator``. Logprobs come from ``log_softmax`` of the raw (unpenalised) logits.

Batch invariance: rows are grouped by the work they need and each group is vectorised, but
every op is row-wise (softmax, topk, cumsum, searchsorted over the last dim) or an exactly
rounded elementwise op, the shape of any per-row op (``topk``'s K) is a function of that row
alone (its params, and for top-p whether its own nucleus fits the candidates), and each
random row consumes exactly one ``torch.rand(1, generator=g)`` per step (greedy rows none).
A row's result is therefore bit-identical alone or in any batch.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastinfer import ops
from fastinfer.sampling.grammar import TokenMasks
from fastinfer.sampling.params import SamplingParams
from fastinfer.sampling.processors import apply_logit_bias_, apply_penalties_, min_p_, needs_penalties
from fastinfer.sampling.rejection import accept_greedy, accept_sampled
from fastinfer.sampling.truncation import TOP_P_CANDIDATES, draw, maybe, sample_truncated, truncated_probs

SCRATCH_BYTES_PER_LOGIT = 4 * 4 + 3
"""The sampler's most memory per logit of a step: four float32 ``[B, V]`` scratch buffers
(constrained, penalised, and two of working space) and a grammar's mask (on a GPU it is
unpacked through two one-byte temporaries into a one-byte mask)."""


@dataclass(slots=True)
class SamplingRow:
    """One sequence to sample a token for this step."""

    params: SamplingParams
    generator: torch.Generator          # this sequence's own CPU generator
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]     # tokens generated so far by this sequence


@dataclass(slots=True)
class SpecOutput:
    """A verification step's tokens: per row its accepted drafts and one token more, and per
    row None or the logprobs of each of them."""

    token_ids: list[list[int]]
    logprobs: list[list[dict[int, float]] | None]


@dataclass(slots=True)
class SamplerOutput:
    """The tokens of one step, one per row, and per row its logprobs dict (or None)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Samples one token per row of a [B, V] logits tensor; see the module docstring.

    Holds reusable [B, V] float32 scratch buffers (up to four: 192 MiB at B=256, V=49152): fresh
    buffers of that size page-fault on every step, which at B=32 costs more than the math.
    So one ``Sampler`` serves one engine loop; it is not safe to call from two threads at once.
    """

    def __init__(self) -> None:
        self._scratch: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 masks: TokenMasks | None = None) -> SamplerOutput:
        """Sample for ``rows`` from ``logits`` [len(rows), V] (float32, bf16 or fp16), within
        the grammar ``masks`` of this step (if any).

        Never modifies ``logits``. Returns token ids and logprobs in row order.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], "
                             f"got {tuple(logits.shape)}")
        params = [r.params for r in rows]
        raw = self._constrained(logits, params, masks)
        work = self._penalised(raw, rows)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == len(rows):  # all greedy: one argmax, one read-back
            token_ids = ops.argmax(work).tolist()
            return SamplerOutput(token_ids, self._logprobs(raw, token_ids, params))
        tokens = torch.empty(len(rows), dtype=torch.long, device=raw.device)
        if greedy:
            # torch.argmax returns the first maximal index: the lowest id wins a tie.
            _put(tokens, greedy, ops.argmax(self._take(work, greedy, "a")))
        for k, idx in _random_groups(params, raw.shape[1]).items():
            _put(tokens, idx, self._sample_random(work, idx, [rows[i] for i in idx], k))
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, token_ids, params))

    def verify(self, logits: torch.Tensor, rows: Sequence[SamplingRow], drafts: Sequence[list[int]],
               masks: TokenMasks | None = None, draft_probs: Sequence[torch.Tensor | None] | None = None) -> SpecOutput:
        """Speculative decoding: verifies each row's ``drafts[i]`` (see ``rejection``). ``logits``
        holds, row after row, the ``len(drafts[i]) + 1`` positions of each (the drafts' and one
        more; a row without drafts has one, and samples as ``__call__`` would); ``masks``, if
        any, are per position; ``draft_probs``, per row, the distributions ``[k, V]`` its drafts
        were drawn from (None: certain drafts, as n-gram lookup's and greedy drafting's).
        Returns per row its accepted drafts and one token more."""
        spans = [len(d) + 1 for d in drafts]
        if len(drafts) != len(rows) or logits.dim() != 2 or logits.shape[0] != sum(spans):
            raise ValueError(f"logits must be [{sum(spans)} positions, vocab] for {len(rows)} rows with "
                             f"{sum(spans) - len(rows)} drafts, got {tuple(logits.shape)}")
        positions = [SamplingRow(r.params, r.generator, r.prompt_token_ids, [*r.output_token_ids, *d[:j]])
                     if needs_penalties(r.params) else r for r, d in zip(rows, drafts) for j in range(len(d) + 1)]
        params = [r.params for r in positions]
        raw = self._constrained(logits, params, masks)
        work = self._penalised(raw, positions)
        argmax = ops.argmax(work).tolist()
        starts = [0, *itertools.accumulate(spans)][:-1]
        plain = self._draftless(work, rows, drafts, starts)
        verified = [p for i, (row, start, span) in enumerate(zip(rows, starts, spans))
                    if i not in plain and not row.params.greedy for p in range(start, start + span)]
        probs = self._target_probs(work, positions, verified)  # where rejection sampling reads them
        tokens = []
        for i, (row, d, start, span) in enumerate(zip(rows, drafts, starts, spans)):
            if i in plain:
                tokens.append([plain[i]])
            elif row.params.greedy:
                tokens.append(accept_greedy(argmax[start:start + span], d))
            else:
                q = None if draft_probs is None else draft_probs[i]
                tokens.append(accept_sampled(probs[start:start + span], d, row.generator, q))
        return SpecOutput(tokens, self._spec_logprobs(raw, tokens, spans, params))

    def _draftless(self, work: torch.Tensor, rows: Sequence[SamplingRow], drafts: Sequence[list[int]],
                   starts: list[int]) -> dict[int, int]:
        """The tokens of random rows without drafts (row ``i``'s position is ``starts[i]``), drawn
        as ``__call__`` draws them (one uniform over the sorted candidates): the same token
        whether or not the batch verifies."""
        at = {i: start for i, (row, d, start) in enumerate(zip(rows, drafts, starts)) if not d and not row.params.greedy}
        keys, out = list(at), {}
        for k, idx in _random_groups([rows[i].params for i in keys], work.shape[1]).items():
            drawn = self._sample_random(work, [at[keys[j]] for j in idx], [rows[keys[j]] for j in idx], k)
            out.update({keys[j]: t for j, t in zip(idx, drawn.tolist())})
        return out

    def target_probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
        """[R, V]: each random row's sampling distribution over ``logits`` (after the logit
        bias, penalties, temperature, top-k, top-p and min-p; no grammar); greedy rows' zero."""
        params = [r.params for r in rows]
        return self._target_probs(self._penalised(self._constrained(logits, params, None), rows), rows)

    def _target_probs(self, work: torch.Tensor, rows: Sequence[SamplingRow],
                      only: list[int] | None = None) -> torch.Tensor | None:
        """[T, V]: each random row's normalised sampling distribution (after temperature, top-k,
        top-p and min-p), for the rows ``only`` (None: all); the others' stay zero. None when no
        such row is random."""
        among = range(len(rows)) if only is None else only
        groups = _random_groups([rows[i].params for i in among], work.shape[1])
        if not groups:
            return None
        out = torch.zeros_like(work)
        for k, local in groups.items():
            idx = [among[j] for j in local]
            sub = [rows[i] for i in idx]
            dev = work.device
            index = _index(idx, dev)
            probs = torch.softmax(work.index_select(0, index) / _column(sub, "temperature", dev).unsqueeze(1), dim=-1)
            min_p = _column(sub, "min_p", dev)
            if k is None:
                if maybe(min_p > 0):
                    min_p_(probs, min_p, probs.amax(-1))
            else:
                has_k = torch.tensor([0 < r.params.top_k < work.shape[1] for r in sub], device=dev)
                probs = truncated_probs(probs, k, has_k, _column(sub, "top_p", dev), min_p)
            out.index_copy_(0, index, probs / probs.sum(-1, keepdim=True))
        return out

    def _spec_logprobs(self, raw: torch.Tensor, tokens: list[list[int]], spans: list[int],
                       params: Sequence[SamplingParams]) -> list[list | None]:
        """Per row: None, or the logprobs of each of its tokens (at the position it took)."""
        out: list[list | None] = [None] * len(tokens)
        where, chosen, starts, offset = [], [], [], 0
        for i, (toks, span) in enumerate(zip(tokens, spans)):
            if params[offset].logprobs is not None:
                starts.append((i, len(where)))
                where.extend(range(offset, offset + len(toks)))
                chosen.extend(toks)
            offset += span
        if not where:
            return out
        sub = raw.index_select(0, _index(where, raw.device))
        found = self._logprobs(sub, chosen, [params[w] for w in where])
        for i, at in starts:
            out[i] = found[at:at + len(tokens[i])]
        return out

    def _penalised(self, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """``raw`` with the rows' penalties applied (a scratch copy; ``raw`` when none has any)."""
        params = [r.params for r in rows]
        if not any(needs_penalties(p) for p in params):
            return raw
        work = self._buffer("penalised", raw.shape[0], raw)
        work.copy_(raw)
        apply_penalties_(work, params, [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows])
        return work

    @staticmethod
    def can_defer(params: SamplingParams) -> bool:
        """Whether a row's token may stay on the device for now (``sample_on_device``): greedy,
        with no penalty (which would read the tokens so far) and no logprobs."""
        return (params.greedy and params.logprobs is None and not needs_penalties(params)
                and params.structured_outputs is None and params.logit_bias is None)

    def sample_on_device(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B]`` int64 on the logits' device, with no host sync, for rows that all
        pass ``can_defer``: the same argmax as ``__call__`` gives them."""
        return ops.argmax(logits.float())

    def _constrained(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     masks: TokenMasks | None) -> torch.Tensor:
        """float32 logits with the rows' logit biases added and the grammar masks applied
        (a scratch copy when there is any; ``logits`` itself when float32 and there is none)."""
        if masks is None and all(p.logit_bias is None for p in params):
            return logits.float()
        raw = self._buffer("constrained", logits.shape[0], logits)
        if masks is not None and logits.dtype == torch.float32:  # the copy and the mask in one pass
            masks.apply(logits, out=raw)
        else:
            raw.copy_(logits)
            if masks is not None:
                masks.apply(raw, out=raw)
        apply_logit_bias_(raw, params)
        return raw

    def _sample_random(self, work: torch.Tensor, idx: list[int], rows: Sequence[SamplingRow],
                       k: int | None) -> torch.Tensor:
        """Token ids [R] drawn for ``rows`` (rows ``idx`` of the penalised logits ``work``)."""
        dev, vocab = work.device, work.shape[1]
        temp = _column(rows, "temperature", dev).unsqueeze(1)
        scaled = self._buffer("a", len(idx), work)
        if len(idx) == work.shape[0]:
            torch.div(work, temp, out=scaled)
        else:
            torch.index_select(work, 0, _index(idx, dev), out=scaled).div_(temp)
        probs = torch.softmax(scaled, dim=-1, out=self._buffer("b", len(idx), work))
        # One float32 uniform per row from its own generator, whatever the row's path.
        u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(dev)
        min_p = _column(rows, "min_p", dev)
        if k is None:
            if maybe(min_p > 0):
                min_p_(probs, min_p, probs.amax(-1))
            return draw(probs, u, cdf_out=scaled)
        has_k = torch.tensor([0 < r.params.top_k < vocab for r in rows], device=dev)
        return sample_truncated(probs, k, has_k, _column(rows, "top_p", dev), min_p, u)

    def _logprobs(self, raw: torch.Tensor, token_ids: list[int],
                  params: Sequence[SamplingParams]) -> list[dict[int, float] | None]:
        """Per row: None, or {sampled token, then the top-k tokens: logprob} of the raw logits."""
        out: list[dict[int, float] | None] = [None] * len(params)
        need = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not need:
            return out
        logp = torch.log_softmax(self._take(raw, need, "b"), dim=-1,
                                 out=self._buffer("a", len(need), raw))
        sampled = _index([token_ids[i] for i in need], raw.device)
        chosen = logp.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
        by_k: dict[int, list[int]] = {}
        for j, i in enumerate(need):
            out[i] = {token_ids[i]: chosen[j]}
            k = min(params[i].logprobs, raw.shape[1])
            if k > 0:
                by_k.setdefault(k, []).append(j)
        for k, local in by_k.items():    # one topk per k: its ties depend on k only
            vals, ids = self._take(logp, local, "b").topk(k, dim=-1)
            for j, row_ids, row_vals in zip(local, ids.tolist(), vals.tolist()):
                # A token the grammar or a bias of -inf rules out is no alternative: left out.
                out[need[j]].update((t, v) for t, v in zip(row_ids, row_vals) if v != float("-inf"))
        return out

    def _buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Scratch [rows, V] float32 tensor ``name``, reused from step to step."""
        n = rows * like.shape[1]
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = torch.empty(n, dtype=torch.float32, device=like.device)
            self._scratch[name] = buf
        return buf[:n].view(rows, like.shape[1])

    def _take(self, t: torch.Tensor, idx: list[int], scratch: str) -> torch.Tensor:
        """Rows ``idx`` (ascending) of ``t``: ``t`` itself when that is every row, else a copy
        in the scratch buffer ``scratch``."""
        if len(idx) == t.shape[0]:
            return t
        out = self._buffer(scratch, len(idx), t)
        return torch.index_select(t, 0, _index(idx, t.device), out=out)


def _random_groups(params: Sequence[SamplingParams], vocab: int) -> dict[int | None, list[int]]:
    """Random rows grouped by their candidate count K (None: the whole vocabulary, unsorted).

    K depends only on a row's own params, which keeps ``topk``'s result per row invariant.
    """
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(params):
        if p.greedy:
            continue
        if 0 < p.top_k < vocab:
            k: int | None = p.top_k
        elif p.top_p < 1.0:
            k = min(TOP_P_CANDIDATES[0], vocab)
        else:
            k = None
        groups.setdefault(k, []).append(i)
    return groups


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def _put(t: torch.Tensor, idx: list[int], values: torch.Tensor) -> None:
    t[_index(idx, t.device)] = values


def _column(rows: Sequence[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=torch.float32,
                        device=device)
