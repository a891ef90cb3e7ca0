"""DeepSpeed's shared-memory all-reduce: the op DeepSpeed's CPU inference tensor parallelism
uses (``deepspeed/ops/csrc/cpu/comm/shm.cpp``), for ranks on one machine.

It sums through a ``/dev/shm`` segment per rank instead of gloo's sockets: on an AMD EPYC with
a core per rank, 4 us against gloo's 490 us for a (1, 576) float32 tensor, and 86 against 830
us at (256, 576) (``benchmarks/allreduce_probe.py``). Its waits spin without a timeout, though:
a rank that dies leaves the others spinning forever, and a rank without a core of its own
makes every other call wait a scheduler time slice. So it is a setting
(``EngineConfig.tp_all_reduce="shm"``), not the default; gloo raises on a dead peer within the
group's timeout.

DeepSpeed is not a dependency of fastinfer (its own pulls in a CUDA stack); install it with
``pip install --no-deps deepspeed==0.19.8 hjson einops``. The op is compiled on first use
(about a minute) and cached in ``$TORCH_EXTENSIONS_DIR``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastinfer.errors import ConfigError

INSTALL = "pip install --no-deps deepspeed==0.19.8 hjson einops"
_LEVELS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}  # the op's vector_kernel_level needed


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ShmAllReduce:
    """In-place sum over the group's ranks, all on this machine. ``tag``: a name unique to the
    group (its segments' names). Tensors the op cannot take (another dtype, not contiguous)
    go through ``fallback``."""

    def __init__(self, rank: int, size: int, tag: str, fallback) -> None:
        try:
            from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        except ImportError as exc:
            raise ConfigError(f"tp_all_reduce='shm' needs DeepSpeed's shared-memory op: {INSTALL} ({exc})",
                              "tp_all_reduce") from exc
        names = {"LOCAL_SIZE": str(size), "MASTER_ADDR": "fastinfer", "MASTER_PORT": tag}
        with _env(names):
            op = ShareMemCommBuilder().load(verbose=False)
            op.initialize(size, rank)
        self._level = op.vector_kernel_level()
        self._op = torch.ops.deepspeed.inference_all_reduce_
        self._fallback = fallback
        self._segment = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_fastinfer_{tag}_{rank}"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous() and t.device.type == "cpu" and self._level >= _LEVELS.get(t.dtype, 99):
            return self._op(t)
        self._fallback(t)
        return t

    def close(self) -> None:
        """Removes this rank's segment (DeepSpeed never unlinks it)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._segment)
