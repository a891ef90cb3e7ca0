"""The verification of speculative drafts (``fastinfer.sampling.rejection`` and
``Sampler.verify``), in the style of vLLM's ``tests/v1/sample/test_rejection_sampler.py``: over
many trials the tokens it emits follow the target's distribution (total variation distance
below a bound that a random distribution exceeds by far), whatever the drafts, for point-mass
(n-gram) and proper draft distributions, and through temperature, top-k, top-p, min-p; greedy
rows keep the argmax run; seeded rows repeat."""
from __future__ import annotations

import torch

from fastinfer import SamplingParams
from fastinfer.sampling.generator import seeded_generator
from fastinfer.sampling.rejection import accept_greedy, accept_sampled
from fastinfer.sampling.sampler import Sampler, SamplingRow

V = 8
TRIALS = 12000
CLOSE, FAR = 0.03, 0.15  # total variation: the empirical distribution's to the target, and a random one's


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())


def empirical(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=V).double() / len(tokens)


def random_distribution(seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5, 0)


def test_greedy_accepts_the_argmax_run():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7, 8], [5, 9, 7]) == [5, 6]
    assert accept_greedy([5, 6, 7, 8], [1, 6, 7]) == [5]
    assert accept_greedy([4], []) == [4]


def test_point_mass_drafts_keep_the_target_distribution():
    """n-gram drafts (certain): the first token follows p0 whichever token is drafted, likely
    or not; the second, given the first draft was accepted, follows p1."""
    p = torch.stack([random_distribution(1), random_distribution(2), random_distribution(3)]).float()
    gen = torch.Generator().manual_seed(0)
    for draft in (int(p[0].argmax()), int(p[0].argmin()), 3):
        out = [accept_sampled(p, [draft, 5], gen) for _ in range(TRIALS)]
        first = empirical([o[0] for o in out])
        assert tv(first, p[0].double()) < CLOSE
        assert tv(first, random_distribution(9)) > FAR
        second = empirical([o[1] for o in out if o[0] == draft])
        accepted = sum(o[0] == draft for o in out)
        assert abs(accepted / TRIALS - float(p[0, draft])) < 0.02  # accepted with probability p(x)
        if accepted > 2000:
            assert tv(second, p[1].double()) < 2 * CLOSE
        assert all(len(o) <= 3 for o in out) and all(len(o) == 3 for o in out if o[:2] == [draft, 5])


def test_drafts_from_a_draft_distribution_keep_the_target_distribution():
    """A draft model's drafts x ~ q, accepted with min(1, p(x)/q(x)), else a draw from
    max(p - q, 0): the emitted first token follows p, not q."""
    p = torch.stack([random_distribution(4), random_distribution(5)]).float()
    q = torch.stack([random_distribution(6), random_distribution(7)]).float()
    assert tv(p[0].double(), q[0].double()) > FAR
    gen, drafter = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    firsts = []
    for _ in range(TRIALS):
        draft = int(torch.multinomial(q[0], 1, generator=drafter))
        firsts.append(accept_sampled(p, [draft], gen, q[:1])[0])
    got = empirical(firsts)
    assert tv(got, p[0].double()) < CLOSE and tv(got, q[0].double()) > FAR


def reference_target(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution by its definition (vLLM's order: temperature, top-k, top-p
    over the top-k survivors, min-p)."""
    probs = torch.softmax(logits.double() / params.temperature, 0)
    order = probs.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[:params.top_k if params.top_k > 0 else V]] = True
    kept = torch.where(keep, probs, 0.0)
    sorted_kept = kept[order]
    mass_before = sorted_kept.cumsum(0) - sorted_kept
    nucleus = torch.zeros(V, dtype=torch.bool)
    nucleus[order[mass_before < params.top_p * kept.sum()]] = True
    kept = torch.where(nucleus & keep, kept, 0.0)
    kept = torch.where(kept >= params.min_p * kept.max(), kept, 0.0)
    return kept / kept.sum()


def test_sampler_verify_follows_the_processed_distribution():
    """Many rows in one ``verify`` call, each drafting the same two tokens, each with its own
    seeded generator: the first tokens follow temperature + top-k + top-p + min-p."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(11)) * 2
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05, max_tokens=8)
    target = reference_target(logits[0], params)
    drafts = [int(logits[0].argmax()), 1]
    n = 4000
    rows = [SamplingRow(params, seeded_generator(1000 + i), [1], []) for i in range(n)]
    out = Sampler().verify(logits.repeat(n, 1), rows, [drafts] * n)
    first = empirical([t[0] for t in out.token_ids])
    assert tv(first, target) < 2 * CLOSE and tv(first, random_distribution(13)) > FAR
    assert float(first[target == 0].sum()) == 0.0  # a token outside the survivors is never emitted
    again = Sampler().verify(logits.repeat(n, 1), [SamplingRow(params, seeded_generator(1000 + i), [1], [])
                                                  for i in range(n)], [drafts] * n)
    assert again.token_ids == out.token_ids  # seeded rows repeat


def test_sampler_verify_mixes_greedy_random_and_draftless_rows_with_logprobs():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    greedy = SamplingParams(temperature=0.0, logprobs=1, max_tokens=8)
    rand = SamplingParams(temperature=1.0, seed=1, max_tokens=8)
    target = logits.argmax(-1).tolist()
    rows = [SamplingRow(greedy, seeded_generator(1), [1], []), SamplingRow(rand, seeded_generator(2), [1], []),
            SamplingRow(greedy, seeded_generator(3), [1], [])]
    # row 0: drafts target[0], target[1] (both right); row 1: one draft; row 2: no drafts
    out = Sampler().verify(logits, rows, [[target[0], target[1]], [4], []])
    assert out.token_ids[0] == target[0:3]
    assert len(out.token_ids[1]) in (1, 2) and out.token_ids[2] == [target[5]]
    logp = torch.log_softmax(logits, -1)
    assert [lp[t] for lp, t in zip(out.logprobs[0], target[0:3])] == [float(logp[j, target[j]]) for j in range(3)]
    assert out.logprobs[1] is None and len(out.logprobs[2]) == 1
