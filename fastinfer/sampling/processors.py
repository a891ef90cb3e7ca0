"""Logits processors of the sampler: penalties, and the top-p / min-p filters.

Every function here is row-wise: an output row depends only on the same input row and that
row's parameters, and each element is computed by the same correctly rounded float ops
(``+ - * /``, compare, select) whatever the batch. That is what keeps sampling batch-invariant;
transcendental functions are left to row-wise kernels (softmax), never applied elementwise to a
whole batch, whose vector/scalar split depends on the batch shape.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastinfer.sampling.params import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    """True when ``params`` asks for a repetition, frequency or presence penalty."""
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def apply_penalties_(logits: torch.Tensor, params: Sequence[SamplingParams],
                     prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> None:
    """Apply vLLM's penalties in place to contiguous float32 ``logits`` [B, V].

    Row ``i`` uses ``params[i]``, ``prompts[i]`` and ``outputs[i]`` (token ids). First the
    repetition penalty over prompt + output tokens (a positive logit is divided by it, any other
    multiplied), then ``frequency_penalty * count`` and ``presence_penalty * [count > 0]`` over
    output tokens are subtracted. Only the touched entries are read and written, so the cost
    is O(tokens), not O(B * V).
    """
    if not logits.is_contiguous():
        raise ValueError("apply_penalties_ needs contiguous logits")
    flat, vocab = logits.view(-1), logits.shape[1]
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        seqs = [_cat_ids(prompts[i], outputs[i]) for i in rep_rows]
        pos, lengths = _flat_positions(rep_rows, seqs, vocab, logits.device)
        rep = torch.tensor([params[i].repetition_penalty for i in rep_rows], dtype=torch.float32,
                           device=logits.device).repeat_interleave(lengths)
        vals = flat[pos]
        # Duplicate positions read and write the same value, so their order does not matter.
        flat[pos] = torch.where(vals > 0, vals / rep, vals * rep)
    count_rows = [i for i, p in enumerate(params)
                  if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if count_rows:
        seqs = [_as_ids(outputs[i]) for i in count_rows]
        pos, _ = _flat_positions(count_rows, seqs, vocab, logits.device)
        uniq, counts = torch.unique(pos, return_counts=True)
        row = uniq // vocab
        freq = _per_row(params, "frequency_penalty", logits.device)[row]
        pres = _per_row(params, "presence_penalty", logits.device)[row]
        vals = flat[uniq]
        vals = vals - freq * counts.to(torch.float32)
        flat[uniq] = vals - pres


def apply_logit_bias_(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Adds each row's ``logit_bias`` ({token id: bias}) in place to contiguous float32
    ``logits`` [B, V]; O(biased tokens). Ids outside the vocabulary raise ``ValueError``."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    seqs = [_as_ids(list(params[i].logit_bias)) for i in rows]
    pos, _ = _flat_positions(rows, seqs, logits.shape[1], logits.device)
    bias = torch.tensor([b for i in rows for b in params[i].logit_bias.values()], dtype=torch.float32,
                        device=logits.device)
    flat = logits.view(-1)
    flat[pos] = flat[pos] + bias  # a row's ids are distinct (dict keys): no position twice


def top_p_(cand: torch.Tensor, top_p: torch.Tensor, renormalise: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the sorted candidate probabilities outside each row's top-p nucleus.

    ``cand`` [R, K] holds each row's K largest probabilities in descending order. The nucleus
    is measured against a total mass of 1, or, where ``renormalise`` [R] is set (after top-k),
    against the candidates' own sum. A position is kept while the probability before it is
    below ``top_p * mass``: the smallest prefix whose sum reaches it, the first always kept;
    rows with ``top_p >= 1`` are left alone. Returns [R] bool: whether the nucleus ended
    inside the K candidates (else a caller must retry the row with more candidates).
    """
    cum = cand.cumsum(-1)
    mass = torch.where(renormalise, cum[:, -1], 1.0)
    limit = torch.where(top_p < 1.0, top_p * mass, float("inf")).unsqueeze(1)
    cand[:, 1:].masked_fill_(cum[:, :-1] >= limit, 0.0)
    return cum[:, -1] >= limit.squeeze(1)


def min_p_(probs: torch.Tensor, min_p: torch.Tensor, max_prob: torch.Tensor) -> None:
    """Zero, in place, probabilities below ``min_p * max_prob`` (per row; [R, 1] / [R])."""
    probs.masked_fill_(probs < min_p.unsqueeze(1) * max_prob.reshape(-1, 1), 0.0)


def _as_ids(ids: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _cat_ids(a: Sequence[int], b: Sequence[int]) -> torch.Tensor:
    return torch.cat([_as_ids(a), _as_ids(b)])


def _flat_positions(rows: list[int], seqs: list[torch.Tensor], vocab: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``row * vocab + token`` of every token of every row, and per-row lengths."""
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
    offsets = torch.tensor(rows, dtype=torch.long).repeat_interleave(lengths) * vocab
    ids = torch.cat(seqs)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got ids in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    pos = ids + offsets
    return pos.to(device), lengths.to(device)


def _per_row(params: Sequence[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)
