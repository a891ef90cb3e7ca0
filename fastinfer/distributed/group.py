"""A ``torch.distributed`` process group as the model's :class:`Communicator`: gloo on CPUs,
NCCL on GPUs (issue 24)."""
from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from fastinfer.distributed.comm import Communicator


class TorchComm(Communicator):
    """This process's rank of the default process group (``init_group`` sets it up). Its
    all-reduce is the group's (gloo) or, with ``all_reduce="shm"``, DeepSpeed's shared-memory
    one (``fastinfer.distributed.shm``; ``tag`` names its segments)."""

    def __init__(self, all_reduce: str = "gloo", tag: str = "") -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._shm = None
        if all_reduce == "shm":
            from fastinfer.distributed.shm import ShmAllReduce

            self._shm = ShmAllReduce(self.rank, self.size, tag, dist.all_reduce)
        self._widths: dict[int, list[int]] = {}  # this rank's last dimension -> every rank's

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self._shm is not None:
            return self._shm(t)
        dist.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``src``'s ``t`` into every rank's ``t`` (in place)."""
        dist.broadcast(t, src)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Ranks' last dimensions may differ (an uneven vocabulary split): each is padded to the
        longest for ``all_gather``, then trimmed. The widths are exchanged once per width (every
        rank gathers the same kind of tensor at once), not at every step."""
        widths = self._widths.get(t.shape[-1])
        if widths is None:
            mine = torch.tensor([t.shape[-1]], device=t.device)
            gathered = [torch.zeros_like(mine) for _ in range(self.size)]
            dist.all_gather(gathered, mine)
            widths = self._widths[t.shape[-1]] = [int(w.item()) for w in gathered]
        padded = torch.nn.functional.pad(t, (0, max(widths) - t.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)

    def close(self) -> None:
        """Leaves the process group (every rank calls it at shutdown)."""
        if self._shm is not None:
            self._shm.close()
        leave_group()


def leave_group() -> None:
    """Leaves this process's group, if it is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


ALL_REDUCES = ("gloo", "shm")


def init_group(rank: int, size: int, init_file: str, backend: str = "gloo", timeout_s: float = 30.0,
               all_reduce: str = "gloo") -> TorchComm:
    """Joins the group of ``size`` ranks that rendezvous through ``init_file`` (a path no earlier
    group used; a file store has no port to race for; or ``"env://"``: torchrun's variables). A collective that waits longer than
    ``timeout_s`` for a rank raises instead of hanging (gloo's; ``all_reduce="shm"`` waits
    without a limit)."""
    init_method = init_file if init_file == "env://" else f"file://{init_file}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    unique = init_file + os.environ.get("MASTER_ADDR", "") + os.environ.get("MASTER_PORT", "")
    try:
        return TorchComm(all_reduce, tag=hashlib.sha1(unique.encode()).hexdigest()[:12])
    except BaseException:
        leave_group()
        raise
