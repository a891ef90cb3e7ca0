"""Activation-aware weight quantization (AWQ, Lin et al. 2023): the search math.

The weights of the input channels that see large activations matter most. AWQ scales input
channel ``k`` of a weight up by ``s[k]`` before rounding (so its weights get finer steps,
relative to their size) and divides the layer's input by ``s[k]`` (folded into the operation
before, here an RMSNorm's weight or the rows of a projection), which leaves the float model's
output unchanged:

    ``y = x @ W.T = (x / s) @ (W * s).T``,  quantized as  ``(x / s) @ Q(W * s).T``.

The scales come from a grid search per group of weights that share one input: for ``alpha``
in ``0, 1/n, ..., (n-1)/n``, ``s = mean|x|^alpha`` (normalised to a geometric mean of one),
and the scale kept is the one whose quantized outputs on the calibration inputs are closest
(mean squared error) to the float outputs. ``alpha = 0`` is plain round-to-nearest, so the
search never does worse than RTN on the calibration inputs.

Then a clipping search (AWQ's ``auto_clip``): per output channel and group, the weight range
that is rounded can shrink to ``ratio`` of its extremes (``ratio`` from 1 down to 0.5); the
ratio kept minimises the group's output error on the calibration inputs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from fastinfer.quant.rtn import fake_int4_groups

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, x_mean_abs: torch.Tensor,
                  fake_quant: FakeQuant, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scales ``s [K]`` for the matrices ``weights`` (each ``[N_i, K]``)
    that read the same inputs; ``x [R, K]`` are calibration inputs, ``x_mean_abs [K]`` the
    mean magnitude of each input channel over all calibration tokens, ``fake_quant`` maps a
    float matrix to its quantized-then-dequantized self. Returns ``(s, error with s, error of
    plain RTN)`` (mean squared output errors)."""
    w = torch.cat([m.float() for m in weights])
    x = x.float()
    y = x @ w.T
    mean = x_mean_abs.float().clamp(min=1e-6)
    best_err, best_s, rtn_err = float("inf"), torch.ones_like(mean), float("nan")
    for i in range(grid):
        alpha = i / grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant(w * s) / s
        err = float((x @ wq.T - y).pow(2).mean())
        if i == 0:
            rtn_err = err
        if err < best_err:
            best_err, best_s = err, s
    return best_s, best_err, rtn_err


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, ratios: int = 20, min_ratio: float = 0.5,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output channel, group) of ``w [N, K]``: the bounds ``(lo, hi)``, each
    ``[N, K // G]``, to clamp the group to before int4 rounding. They are the group's
    ``(min, max)`` times the ratio in ``1, ..., min_ratio`` that brings the group's partial
    outputs ``x_g @ q_g.T`` on the calibration inputs ``x [R, K]`` closest to the float ones.

    The mean squared error of a group's outputs is ``d C_g d`` for the weight error ``d`` and
    the inputs' second moments ``C_g = x_g.T @ x_g / R`` (``[G, G]`` per group), so each ratio
    costs ``N K G`` multiply-adds whatever the number of calibration rows."""
    n, k = w.shape
    ng = k // group_size
    xg = x.float().reshape(-1, ng, group_size).transpose(0, 1)  # [ng, R, G]
    gram = xg.transpose(1, 2) @ xg / xg.shape[1]                 # [ng, G, G]
    lo_out, hi_out = torch.empty(n, ng), torch.empty(n, ng)
    for n0 in range(0, n, chunk):
        wg = w[n0:n0 + chunk].float().reshape(-1, ng, group_size)  # [c, ng, G]
        lo0, hi0 = wg.amin(-1), wg.amax(-1)
        best = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for i in range(ratios):
            r = 1.0 - (1.0 - min_ratio) * i / ratios
            lo, hi = lo0 * r, hi0 * r
            d = fake_int4_groups(torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))) - wg
            dt = d.transpose(0, 1)                                   # [ng, c, G]
            err = ((dt @ gram) * dt).sum(-1).transpose(0, 1)         # [c, ng]
            better = err < best
            best = torch.where(better, err, best)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        lo_out[n0:n0 + chunk], hi_out[n0:n0 + chunk] = best_lo, best_hi
    return lo_out, hi_out


def clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` with each group clamped to its ``(lo, hi) [N, K // G]`` bounds."""
    n, k = w.shape
    g = k // lo.shape[1]
    wg = w.float().reshape(n, -1, g)
    return torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(n, k)


def default_calibration_text() -> str:
    """CPython's ``pydoc_data`` topics in reverse key order: the same language reference that
    ``fastinfer eval ppl`` reads by default, but from its other end, so a perplexity measured
    on the first ~100,000 tokens never scores the text the scales were fitted on."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics, reverse=True))
