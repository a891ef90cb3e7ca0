"""Rank 0's channel to the other ranks when ``torchrun`` started them all (``torchrun
--nproc-per-node N script.py``): there are no pipes between the processes, so the step messages
go by object collectives over a gloo group of their own. That group waits without a practical
limit (a worker waits for its next step as long as rank 0 is idle); a rank that exits closes its
connections, which fails the others' waits at once.
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from fastinfer.errors import ConfigError

_IDLE = datetime.timedelta(days=365)


def torchrun_rank(size: int) -> int | None:
    """This process's rank when torchrun launched the ranks of a ``size``-way group (its
    ``RANK``); None when it did not (the engine spawns its workers then)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != size:
        raise ConfigError(f"tensor_parallel_size={size} under torchrun needs as many processes (--nproc-per-node "
                          f"{size}); WORLD_SIZE is {world}", "tensor_parallel_size")
    return int(os.environ["RANK"])


class ControlChannel:
    """Messages from rank 0 to all (``broadcast``) and replies back (``gather``). Every rank
    makes it at the same point, after joining the process group."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_IDLE)

    def broadcast(self, message=None):
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, reply=None) -> list | None:
        """Rank 0: every rank's reply, in rank order (its own first); the others: None."""
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(reply, out, dst=0, group=self.group)
        return out


class WorkerConn:
    """A worker's end of the channel, shaped like a pipe's (``recv``, ``send``); the channel is
    made on first use, once ``load_rank`` joined the group."""

    def __init__(self) -> None:
        self._channel: ControlChannel | None = None

    def _open(self) -> ControlChannel:
        if self._channel is None:
            self._channel = ControlChannel()
        return self._channel

    def recv(self):
        return self._open().broadcast()

    def send(self, reply) -> None:
        self._open().gather(reply)
