"""What a forward pass costs, learned as the engine runs: ``seconds ~ a + b * tokens``, fitted
by exponentially weighted least squares over the recent passes. The speculator weighs a step
with drafts against one without by it (the backoff that keeps speculation from slowing
decoding down: on these CPUs verifying 5 tokens of a sequence costs 1.5-2.6x decoding 1)."""
from __future__ import annotations


class LinearCost:
    """``predict(n)``: the expected seconds of a pass over ``n`` tokens, or None while the
    recent passes do not span enough sizes to tell the slope to ``n`` (the caller then explores); old
    passes fade by ``decay`` per observation, so a fit that stops being fed with varied sizes
    becomes unsure again."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + n
        self._y = d * self._y + seconds
        self._xx = d * self._xx + n * n
        self._xy = d * self._xy + n * seconds

    def predict(self, n: float, flat: bool = False) -> float | None:
        """``flat``: when the recent passes had about one size, their mean cost whatever ``n``
        (for passes whose size hardly varies, as a draft model's decode passes)."""
        if self._w < 2.0:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var < 0.25:  # every recent pass had about the same size: no slope to go by
            return mean_y if flat or abs(n - mean_x) < 0.5 else None
        slope = max(0.0, (self._xy / self._w - mean_x * mean_y) / var)
        return max(0.0, mean_y + slope * (n - mean_x))
