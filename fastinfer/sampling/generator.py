"""Per-sequence random generators seeded from all 64 bits of a seed.

``torch.Generator.manual_seed`` keeps only the low 32 bits of a seed on the CPU (its Mersenne
Twister is initialised from one 32-bit word), so seeds 1 and 2**32 + 1 would draw the same
samples. Instead, numpy's ``SeedSequence`` hashes the whole seed and the sample's index into
the 624 words of the twister's state, which is then loaded into the torch generator.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

_MT_WORDS = 624        # mt19937 state words
_WORDS_OFFSET = 24     # CPU generator state: initial seed (u64), left (i32), seeded (i32), next (u64), words (u64 each)


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` whose stream depends on every bit of ``seed`` (an int in
    [-2**63, 2**64)) and on ``stream`` (the sample index within a request)."""
    words = np.random.SeedSequence(seed % 2**64, spawn_key=(stream,)).generate_state(_MT_WORDS, np.uint32)
    gen = torch.Generator()
    if not _state_layout_known():  # a torch whose state layout we do not know: fold to 32 bits
        return gen.manual_seed(int(words[0]))
    state = gen.manual_seed(int(words[0])).get_state()
    state[_WORDS_OFFSET:_WORDS_OFFSET + 8 * _MT_WORDS] = torch.from_numpy(words.astype("<u8").view(np.uint8))
    gen.set_state(state)
    return gen


@functools.cache
def _state_layout_known() -> bool:
    """True when torch's CPU generator state holds the twister's words where we write them:
    checked once against ``manual_seed``'s own initialisation of state word 0 and 1."""
    seed = 0x9E3779B9
    state = torch.Generator().manual_seed(seed).get_state().numpy()
    words = state[_WORDS_OFFSET:_WORDS_OFFSET + 16].view("<u8")
    second = (1812433253 * (seed ^ (seed >> 30)) + 1) & 0xFFFFFFFF
    return len(state) >= _WORDS_OFFSET + 8 * _MT_WORDS and words[0] == seed and words[1] == second
