"""Benchmark workloads: deterministic under a seed, lengths in range."""
from __future__ import annotations

import pytest

from fastinfer.bench.dataset import DatasetEntry
from fastinfer.bench.workload import dataset_workload, mixed_workload, prefix_workload, shared_prefix_workload


def test_mixed_workload_is_deterministic_and_in_range(smollm):
    tok = smollm.tokenizer
    a = mixed_workload(tok, 32, (16, 512), (16, 256), seed=7)
    b = mixed_workload(tok, 32, (16, 512), (16, 256), seed=7)
    c = mixed_workload(tok, 32, (16, 512), (16, 256), seed=8)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert a.prompts != c.prompts
    assert all(16 <= n <= 512 for n in a.input_lens) and all(16 <= n <= 256 for n in a.output_lens)
    assert len(set(a.input_lens)) > 20  # really mixed
    assert len({tuple(p) for p in a.prompts}) == 32


def test_prefix_workload_shares_the_prefix(smollm):
    w = prefix_workload(smollm.tokenizer, 8, 100, (5, 9), (3, 4), seed=1)
    prefix = w.prompts[0][:100]
    assert all(p[:100] == prefix and 105 <= len(p) <= 109 for p in w.prompts)
    assert len({tuple(p[100:]) for p in w.prompts}) == 8


def test_shared_prefix_workload_deals_groups_and_another_seed_takes_other_prefixes(smollm):
    w = shared_prefix_workload(smollm.tokenizer, 40, 4, 64, (5, 9), (3, 4), seed=1)
    prefixes = {tuple(p[:64]) for p in w.prompts}
    assert len(prefixes) == 4 and all(69 <= len(p) <= 73 for p in w.prompts)
    assert all(sum(tuple(p[:64]) == q for p in w.prompts) >= 3 for q in prefixes)  # each group is used
    again = shared_prefix_workload(smollm.tokenizer, 40, 4, 64, (5, 9), (3, 4), seed=1)
    assert again.prompts == w.prompts
    other = shared_prefix_workload(smollm.tokenizer, 40, 4, 64, (5, 9), (3, 4), seed=2)
    assert not prefixes & {tuple(p[:64]) for p in other.prompts}


def test_dataset_workload_uses_max_tokens_or_the_range(smollm):
    entries = [DatasetEntry("Hello there", 12), DatasetEntry("What is a GPU?", None)]
    w = dataset_workload(smollm.tokenizer, entries, (20, 30), seed=0)
    assert w.output_lens[0] == 12 and 20 <= w.output_lens[1] <= 30
    assert w.prompts[0] == smollm.tokenizer.encode("Hello there")


@pytest.mark.parametrize("rng", [(0, 5), (9, 3)])
def test_bad_length_range_is_rejected(smollm, rng):
    with pytest.raises(ValueError, match="input length range"):
        mixed_workload(smollm.tokenizer, 2, rng, (1, 2))
