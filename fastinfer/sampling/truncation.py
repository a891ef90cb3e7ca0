"""Truncation of a row's distribution to its top-k / top-p / min-p survivors, and the
inverse-CDF draw: shared by the sampler and the verification of speculative drafts. Every op is
row-wise (see ``fastinfer.sampling.sampler`` on batch invariance)."""
from __future__ import annotations

import torch

from fastinfer.sampling.processors import min_p_, top_p_

# Top-p rows first look for their nucleus among this many most likely tokens, then among
# more, then sort the whole row: most nuclei are small; at V = 49152 topk(64) costs ~60 us a
# row, topk(4096) ~0.6 ms and a full sort ~3 ms.
TOP_P_CANDIDATES = (64, 512, 4096)


def sample_truncated(probs: torch.Tensor, k: int, has_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw among each row's ``k`` most likely tokens after top-p and min-p (see ``_nucleus``)."""
    cand, ids, fits = _nucleus(probs, k, has_k, top_p, min_p)
    out = ids.gather(1, draw(cand, u).unsqueeze(1)).squeeze(1)
    if not bool(fits.all()):
        redo = (~fits).nonzero().squeeze(1)
        out[redo] = sample_truncated(probs[redo], _more_candidates(k, probs.shape[1]), has_k[redo], top_p[redo],
                                     min_p[redo], u[redo])
    return out


def truncated_probs(probs: torch.Tensor, k: int, has_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """The distribution ``sample_truncated`` draws from, as [R, V] weights (not normalised):
    each row's probabilities inside its top-k / top-p / min-p survivors, zero elsewhere."""
    cand, ids, fits = _nucleus(probs, k, has_k, top_p, min_p)
    out = torch.zeros_like(probs).scatter_(1, ids, cand)
    if not bool(fits.all()):
        redo = (~fits).nonzero().squeeze(1)
        out[redo] = truncated_probs(probs[redo], _more_candidates(k, probs.shape[1]), has_k[redo], top_p[redo],
                                    min_p[redo])
    return out


def _nucleus(probs: torch.Tensor, k: int, has_k: torch.Tensor, top_p: torch.Tensor,
             min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most likely tokens (descending: weights [R, k], ids [R, k]) after top-p
    and min-p, and [R] bool: whether the row's nucleus ended inside them.

    Rows with top-k hold exactly their k tokens and measure top-p against those tokens' mass
    (top-k is applied first, as in vLLM); top-p-only rows whose nucleus does not end inside
    the k candidates must be retried with the next candidate count, finally a full sort.
    """
    if k >= probs.shape[1]:
        cand, ids = probs.sort(dim=-1, descending=True, stable=True)
    else:
        cand, ids = probs.topk(k, dim=-1)
    fits = top_p_(cand, top_p, has_k) | has_k
    if k >= probs.shape[1]:
        fits.fill_(True)
    if maybe(min_p > 0):
        min_p_(cand, min_p, cand[:, 0])
    return cand, ids, fits


def _more_candidates(k: int, vocab: int) -> int:
    return next((c for c in TOP_P_CANDIDATES if c > k), vocab)


def draw(weights: torch.Tensor, u: torch.Tensor,
          cdf_out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draw: per row the position whose cumulative weight interval holds u.

    ``weights`` [R, N] need not be normalised; a zero-weight position is never returned.
    ``cdf_out`` optionally receives the cumulative sums (a scratch buffer).
    """
    cdf = torch.cumsum(weights, -1, out=cdf_out) if cdf_out is not None else weights.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).squeeze(1)
    over = pos >= weights.shape[1]      # u * total rounded up to total: take the last positive
    if maybe(over):
        last = weights.shape[1] - 1 - (weights > 0).flip(-1).to(torch.int8).argmax(-1)
        pos = torch.where(over, last, pos)
    return pos


def maybe(flags: torch.Tensor) -> bool:
    """Whether a conditional step is needed for ``flags``: on the CPU, whether any is set; on a
    GPU always True (the step is a no-op for unset rows), so no host sync waits for the answer."""
    return flags.device.type != "cpu" or bool(flags.any())
