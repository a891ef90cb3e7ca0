"""Sampler tests: exact penalties and greedy picks, statistical draws, logprobs, batch
invariance and seeds."""
from __future__ import annotations

import pytest
import torch

from fastinfer.sampling.params import SamplingParams
from fastinfer.sampling.processors import apply_penalties_
from fastinfer.sampling.sampler import Sampler, SamplerOutput, SamplingRow

SAMPLER = Sampler()
# A small known distribution: probabilities far from every top-p / min-p boundary used below.
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
LOGITS = PROBS.log().float()


def _row(params: SamplingParams, seed: int = 0, prompt=(), output=()) -> SamplingRow:
    return SamplingRow(params, torch.Generator().manual_seed(seed), list(prompt), list(output))


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    return SAMPLER(logits, rows)


def _frequencies(params: SamplingParams, n: int = 20000,
                 logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """Observed token frequencies of ``n`` rows sharing ``logits``, each with its own seed."""
    rows = [_row(params, seed=1000 + i) for i in range(n)]
    out = _sample(logits.expand(n, -1), rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.numel()).double() / n


def _assert_follows(freq: torch.Tensor, weights: torch.Tensor) -> None:
    """Masked (zero-weight) tokens never drawn; the rest within 0.01 of the renormalised weights."""
    expected = weights / weights.sum()
    assert torch.all(freq[expected == 0] == 0), f"masked token drawn: {freq}"
    assert (freq - expected).abs().max() < 0.01, f"observed {freq} vs expected {expected}"


# ---- greedy and penalties -------------------------------------------------------------------

def test_greedy_rows_take_argmax_lowest_index_on_ties():
    logits = torch.randn(17, 97, generator=torch.Generator().manual_seed(0))
    logits[3, [5, 40]] = 100.0                  # a tie: the lower id must win
    out = _sample(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(17)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 5
    assert out.logprobs == [None] * 17


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.05, 0.5]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    penalised = logits.clone()
    apply_penalties_(penalised, [params], [[0]], [[2]])
    rep = torch.tensor(1.1)                      # float32, as the sampler computes
    expected = torch.stack([torch.tensor(2.0) / rep, torch.tensor(1.9), torch.tensor(-1.0) * rep,
                            torch.tensor(-1.05), torch.tensor(0.5)]).unsqueeze(0)
    assert torch.equal(penalised, expected)
    # Token 0 (in the prompt) drops below token 1.
    assert _sample(logits, [_row(params, prompt=[0], output=[2])]).token_ids == [1]
    assert _sample(logits, [_row(SamplingParams(temperature=0.0))]).token_ids == [0]


def test_frequency_and_presence_penalties_subtract_count_terms_of_output_tokens_only():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.3, presence_penalty=0.5)
    penalised = logits.clone()
    # Token 2 in the prompt only: untouched by frequency / presence penalties.
    apply_penalties_(penalised, [params], [[2, 2]], [[0, 0, 1]])
    f, p = torch.tensor(0.3), torch.tensor(0.5)
    expected = torch.stack([torch.tensor(3.0) - f * 2 - p, torch.tensor(2.5) - f - p,
                            torch.tensor(2.0), torch.tensor(1.0)]).unsqueeze(0)
    assert torch.equal(penalised, expected)
    out = _sample(logits, [_row(params, prompt=[2, 2], output=[0, 0, 1])])
    assert out.token_ids == [2]


def test_penalties_do_not_modify_the_callers_logits():
    logits = torch.randn(2, 50)
    before = logits.clone()
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logprobs=2)
    _sample(logits, [_row(params, 1, prompt=[1, 2], output=[3]), _row(params, 2, output=[4])])
    assert torch.equal(logits, before)


def test_penalty_rejects_out_of_range_token_ids():
    params = SamplingParams(repetition_penalty=1.5)
    with pytest.raises(ValueError, match="token ids"):
        _sample(torch.zeros(1, 10), [_row(params, prompt=[10])])


# ---- statistical ----------------------------------------------------------------------------

def test_temperature_one_follows_the_softmax():
    _assert_follows(_frequencies(SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_distribution(temperature):
    freq = _frequencies(SamplingParams(temperature=temperature))
    _assert_follows(freq, torch.softmax(LOGITS.double() / temperature, -1))
    sharper = temperature < 1
    assert (freq[0] > PROBS[0] + 0.05) == sharper


@pytest.mark.parametrize("params, kept", [
    (SamplingParams(top_k=3), 3),
    (SamplingParams(top_p=0.7), 3),             # 0.40 + 0.25 < 0.7 <= 0.40 + 0.25 + 0.15
    (SamplingParams(top_p=0.3), 1),             # the top token alone already reaches 0.3
    (SamplingParams(min_p=0.5), 2),             # keep p >= 0.5 * 0.40
    (SamplingParams(top_k=4, top_p=0.7), 2),    # top-p over the top-k renormalised: .444 + .278
    (SamplingParams(top_k=5, min_p=0.2), 4),    # keep p >= 0.08
])
def test_truncation_never_draws_masked_tokens_and_renormalises(params, kept):
    weights = PROBS.clone()
    weights[kept:] = 0
    _assert_follows(_frequencies(params), weights)


def _nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """Reference nucleus in float64: the smallest most-likely prefix reaching ``top_p``."""
    probs, ids = torch.softmax(logits.double(), -1).sort(descending=True)
    before = probs.cumsum(-1) - probs
    return set(ids[before < top_p].tolist())


@pytest.mark.parametrize("scale, top_p", [(3.0, 0.9), (0.3, 0.5), (0.1, 0.9)])
def test_top_p_support_on_a_large_vocabulary(scale, top_p):
    # Nuclei of a few, hundreds and thousands of tokens: every candidate-count path.
    logits = torch.randn(9001, generator=torch.Generator().manual_seed(7)) * scale
    out = _frequencies(SamplingParams(top_p=top_p), n=300, logits=logits)
    drawn = set(out.nonzero().squeeze(1).tolist())
    nucleus = _nucleus(logits, top_p)
    assert drawn <= nucleus
    assert len(drawn) > min(len(nucleus), 300) // 3     # not stuck on a few tokens


# ---- logprobs -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_topk_plus_sampled_token_of_the_raw_logits(dtype):
    logits = torch.randn(3, 257, generator=torch.Generator().manual_seed(3)).to(dtype)
    params = [SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=3.0),
              SamplingParams(temperature=1.5, logprobs=4, frequency_penalty=2.0),
              SamplingParams(temperature=1.0, logprobs=0, top_k=50)]
    rows = [_row(p, i, prompt=[1, 2], output=[3]) for i, p in enumerate(params)]
    out = _sample(logits, rows)
    raw = torch.log_softmax(logits.float(), -1)
    for i, (p, lp) in enumerate(zip(params, out.logprobs)):
        top = raw[i].topk(p.logprobs).indices.tolist() if p.logprobs else []
        tok = out.token_ids[i]
        assert set(lp) == set(top) | {tok}
        assert next(iter(lp)) == tok                   # the sampled token comes first
        assert all(v == raw[i, t].item() for t, v in lp.items())
    assert len(out.logprobs[2]) == 1


# ---- batch invariance and seeds -------------------------------------------------------------

def _mixed_params(n: int) -> list[SamplingParams]:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3, logprobs=3),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_p=0.95, logprobs=2),
        dict(temperature=0.9, top_k=40),
        dict(temperature=1.0, top_k=300, top_p=0.8, min_p=0.01),
        dict(temperature=1.1, min_p=0.05, presence_penalty=0.7),
        dict(temperature=1.0, top_p=0.99, frequency_penalty=0.4, logprobs=0),
        dict(temperature=5.0, top_p=0.97),          # flat: the nucleus needs a full sort
    ]
    return [SamplingParams(**kinds[i % len(kinds)]) for i in range(n)]


def test_batch_invariance_alone_vs_shuffled_batch_of_32_over_steps():
    vocab, n, steps = 9001, 32, 3
    gen = torch.Generator().manual_seed(11)
    logits = [torch.randn(n, vocab, generator=gen) * 2 for _ in range(steps)]
    params = _mixed_params(n)
    history = [[int(t) for t in torch.randint(vocab, (5,), generator=gen)] for _ in range(n)]
    perm = torch.randperm(n, generator=gen).tolist()
    batch_rows = [_row(params[i], 50 + i, prompt=history[i], output=[]) for i in perm]
    alone_rows = [_row(params[i], 50 + i, prompt=history[i], output=[]) for i in range(n)]
    for step in range(steps):
        batched = _sample(logits[step][perm], batch_rows)
        for j, i in enumerate(perm):
            alone = _sample(logits[step][i:i + 1], [alone_rows[i]])
            assert alone.token_ids[0] == batched.token_ids[j], f"row {i} step {step}"
            assert alone.logprobs[0] == batched.logprobs[j], f"row {i} step {step}"
        for j, i in enumerate(perm):
            batch_rows[j].output_token_ids.append(batched.token_ids[j])
            alone_rows[i].output_token_ids.append(batched.token_ids[j])


def test_batch_invariance_at_full_vocabulary_size():
    vocab, n = 49152, 32
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(5)) * 3
    params = _mixed_params(n)
    batched = _sample(logits, [_row(p, i, prompt=[i, 7]) for i, p in enumerate(params)])
    for i in (0, 3, 9, 14, 31):
        alone = _sample(logits[i:i + 1].clone(), [_row(params[i], i, prompt=[i, 7])])
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.logprobs[0] == batched.logprobs[i]


def _stream(seed: int, steps: int = 20) -> list[int]:
    row = _row(SamplingParams(temperature=1.0, top_p=0.95), seed)
    gen = torch.Generator().manual_seed(0)       # the same logits for every stream
    return [_sample(torch.randn(1, 500, generator=gen), [row]).token_ids[0] for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_stream():
    assert _stream(1) == _stream(1)
    assert _stream(1) != _stream(2)


def test_rejects_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match="num_rows=2"):
        _sample(torch.zeros(3, 10), [_row(SamplingParams()), _row(SamplingParams())])


def test_greedy_rows_consume_no_randomness():
    row = _row(SamplingParams(temperature=0.0), seed=3)
    state = row.generator.get_state()
    _sample(torch.randn(1, 20), [row])
    assert torch.equal(row.generator.get_state(), state)


def test_non_contiguous_and_half_logits_match_contiguous_float32():
    base = torch.randn(64, 8, generator=torch.Generator().manual_seed(9)).half()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.8, logprobs=2),
              SamplingParams(repetition_penalty=1.5, logprobs=1), SamplingParams(min_p=0.2)] * 2
    rows = lambda: [_row(p, i, prompt=[1], output=[2]) for i, p in enumerate(params)]
    assert _sample(base.t(), rows()) == _sample(base.t().float().contiguous(), rows())
