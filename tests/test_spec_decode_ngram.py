"""Speculative decoding's first pieces (issue 25): the n-gram proposer (prompt lookup) and
``speculative_config`` under vLLM's names."""
from __future__ import annotations

import pytest

from fastinfer.errors import ConfigError
from fastinfer.spec_decode import NgramProposer, SpeculativeConfig


def test_the_longest_suffix_with_an_earlier_occurrence_drafts_what_followed_it():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    # "7 8 9" occurred before, followed by 10 11 12: the 3-gram wins over the 1-gram "9 -> 5"
    assert p.propose([9, 5, 1, 7, 8, 9, 10, 11, 12, 2, 7, 8, 9]) == [10, 11, 12]
    # the latest earlier occurrence is taken, and the draft stops at the sequence's end
    assert p.propose([4, 1, 2, 4, 3, 4]) == [3, 4]
    assert NgramProposer(k=5, min_n=2, max_n=2).propose([1, 2, 3, 1, 2]) == [3, 1, 2]


def test_no_match_drafts_nothing():
    p = NgramProposer(k=4, min_n=2, max_n=4)
    assert p.propose([1, 2, 3, 4, 5]) == []  # no 2-gram repeats
    assert p.propose([7]) == [] and p.propose([]) == []
    assert NgramProposer(k=4, min_n=1, max_n=1).propose([5, 6, 5]) == [6, 5]  # a 1-gram is enough when allowed


def test_drafts_copy_a_passage_being_repeated():
    passage = list(range(100, 140))
    p = NgramProposer(k=4, min_n=2, max_n=4)
    done = passage + [1, 2] + passage[:10]  # the model is copying the passage again
    assert p.propose(done) == passage[10:14]


def test_speculative_config_takes_vllms_keys_and_refuses_bad_ones():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                                     "prompt_lookup_max": 5})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 2, 5)
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_max == 3
    assert SpeculativeConfig.from_dict({"method": "draft_model", "num_speculative_tokens": 3,
                                        "quantization": "int4"}).model is None
    bad = [({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ngram, draft_model"),
           ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
           ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            r"prompt_lookup_max \(2\) must be >= prompt_lookup_min \(4\)"),
           ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
           ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, r"unknown keys \['lookahead'\]"),
           ({"num_speculative_tokens": 2}, "needs 'method'"),
           ("ngram", "must be a dict")]
    for config, words in bad:
        with pytest.raises(ConfigError, match=words):
            SpeculativeConfig.from_dict(config)
