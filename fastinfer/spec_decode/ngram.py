"""Prompt lookup: draft tokens from the request's own tokens (prompt and output so far).

The last ``n`` tokens, for the longest ``n`` from ``prompt_lookup_max`` down to
``prompt_lookup_min``, are looked for earlier in the sequence; the tokens that followed their
latest earlier occurrence are the draft (up to ``k``). Copying, editing and summarising a
passage repeat its n-grams, so the drafts are often accepted there; elsewhere there is no
match and nothing is drafted (the step decodes one token as usual).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, k: int, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n or k < 1:
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, token_ids) -> list[int]:
        """Up to ``k`` draft tokens for the sequence ``token_ids`` (empty: no match)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = _latest_earlier(ids, n)
            if start is not None:
                return ids[start + n:start + n + self.k].tolist()
        return []


def _latest_earlier(ids: np.ndarray, n: int) -> int | None:
    """The start of the latest occurrence of the last ``n`` tokens that ends before them and
    is followed by at least one token; None when there is none."""
    windows = sliding_window_view(ids[:-1], n)  # windows that leave a token after them
    hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
    return int(hits[-1]) if len(hits) else None
