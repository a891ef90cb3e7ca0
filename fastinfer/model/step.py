"""What a launched step hands back to the engine, and what it may be fed: the sampled tokens
as a :class:`StepFuture` (read on the host only when asked, so that with asynchronous
scheduling the next step is launched first), and a :class:`Feed` of tokens that steps still in
flight sampled, which the next step reads on the device."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class StepFuture:
    """The tokens a step sampled, one per sampled row, and their logprobs (a list with None for
    each row that did not ask for them; None for a step sampled on the device, where no row
    may). Either done on the host already (``done``), or still on the device
    (``on_device``): then ``tokens`` can feed the next step with no host sync, and
    :meth:`token_ids` waits for the copy to the host."""

    __slots__ = ("tokens", "logprobs", "_host", "_ready", "_values")

    def __init__(self, tokens: torch.Tensor | None, logprobs: list | None, host: torch.Tensor | None = None,
                 ready: torch.cuda.Event | None = None, values: list[int] | None = None) -> None:
        self.tokens = tokens          # [R] int64 on the device (None when done on the host)
        self.logprobs = logprobs      # per row: {token id: logprob} or None (see above)
        self._host, self._ready, self._values = host, ready, values

    @classmethod
    def done(cls, token_ids: list[int], logprobs: list) -> StepFuture:
        """A step whose tokens the host already has."""
        return cls(None, logprobs, values=token_ids)

    @classmethod
    def on_device(cls, tokens: torch.Tensor) -> StepFuture:
        """Tokens ``[R]`` sampled on the device; on a GPU copied to pinned host memory without
        blocking (an event marks when the copy is done)."""
        if tokens.device.type != "cuda":
            return cls(tokens, None, host=tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))
        return cls(tokens, None, host=host, ready=ready)

    def token_ids(self) -> list[int]:
        """The sampled tokens on the host (waits for the device the first time)."""
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._values = self._host.tolist()
        return self._values


@dataclass(frozen=True, slots=True)
class Feed:
    """Tokens of steps in flight that a new step reads on the device: at packed-batch position
    ``positions[i]`` goes token ``sources[i]`` of the in-flight steps' tokens concatenated in
    the order of ``futures``."""

    positions: list[int]
    sources: list[int]
    futures: list[StepFuture]
