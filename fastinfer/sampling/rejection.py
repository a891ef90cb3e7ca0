"""Verification of speculative drafts: which of a sequence's draft tokens the target model
accepts, and the token that follows them, so that the tokens come from the target's own
distribution exactly (Leviathan et al., 2023; Chen et al., 2023).

A greedy row accepts the longest run of drafts equal to the target's argmax, then takes the
argmax after it: the tokens plain greedy decoding gives. A random row accepts draft ``x`` at a
position with probability ``min(1, p(x) / q(x))`` (``p`` the target's distribution there after
temperature, top-k, top-p, min-p and penalties; ``q`` the proposer's, a point mass for an n-gram
draft); at the first rejection it draws from ``max(p - q, 0)`` renormalised and stops; when every
draft is accepted it draws one more token from the next position's ``p``. Each draw and each
test takes one uniform from the row's own generator, so a seeded request repeats.
"""
from __future__ import annotations

import torch

from fastinfer.sampling.truncation import draw


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """``targets``: the argmax at each of the ``len(drafts) + 1`` positions."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return [*drafts[:n], targets[n]]


def accept_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator,
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """``probs`` [k + 1, V]: the target's normalised distribution at each draft position and
    the one after; ``draft_probs`` [k, V]: the proposer's at each draft position (None: each
    draft was certain, as n-gram lookup is)."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        p = float(probs[j, x])
        q = 1.0 if draft_probs is None else float(draft_probs[j, x])
        if _uniform(generator) * q < p:  # accepted with probability min(1, p / q)
            out.append(x)
            continue
        if draft_probs is None:
            residual = probs[j].clone()
            residual[x] = 0.0
        else:
            residual = (probs[j] - draft_probs[j]).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:  # p <= q everywhere but rounding: p itself
            residual = probs[j]
        out.append(draw_one(residual, generator))
        return out
    out.append(draw_one(probs[len(drafts)], generator))
    return out


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator))


def draw_one(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn from ``weights`` [V] (not necessarily normalised) with one uniform."""
    u = torch.rand(1, generator=generator).to(weights.device)
    return int(draw(weights.unsqueeze(0).float(), u))
