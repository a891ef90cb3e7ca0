"""Tensor parallelism's processes (issue 24): the engine's process is rank 0, ranks 1..N-1 are
worker processes it spawns. Every rank loads its share of the weights (``load_model(...,
comm=)``) and holds its share of the KV cache (its KV heads, the same blocks); rank 0 alone
schedules and samples. Each step, rank 0 sends the step's input down one pipe per worker and
every rank runs the same ``ModelRunner.execute``: the all-reduces inside the model keep them in
step, and the logits come out whole on rank 0. Under asynchronous scheduling, the tokens a step
feeds from the one still in flight (which only rank 0 sampled) follow by broadcast.

A worker that dies (or a collective that waits past ``timeout_s``) ends the engine with
:class:`WorkerDiedError`, which names the rank, within seconds: gloo fails a collective as
soon as its peer's connection closes. ``shutdown`` (also run when the engine is collected, and
at exit) stops every worker; a worker also exits when rank 0's pipe closes.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
import weakref
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from fastinfer.distributed.channel import ControlChannel, WorkerConn, torchrun_rank
from fastinfer.distributed.group import TorchComm, init_group, leave_group
from fastinfer.errors import EngineDeadError
from fastinfer.kv_cache.cache import KVCache
from fastinfer.model.loader import LoadedModel, load_model
from fastinfer.model.runner import ModelRunner, StepInput

_START_TIMEOUT_S = 300.0  # loading a model on every rank at once, on a loaded machine


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel worker process died or stopped answering; the engine cannot go on."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to load its share: the engine's options (an ``EngineConfig``), the
    group's size and rendezvous file, and the collective timeout."""

    config: object  # EngineConfig (the engine layer sits above this one)
    size: int
    init_file: str
    timeout_s: float


def rank_device(config, rank: int) -> torch.device:
    """Where ``rank`` computes: the CPU, or on CUDA the configured GPU's index plus the rank
    (rank 0 on ``cuda:I``, rank 1 on ``cuda:I+1``, ...)."""
    device = config.torch_device()
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def load_rank(spec: WorkerSpec, rank: int) -> tuple[LoadedModel, TorchComm]:
    """Joins the group as ``rank`` (NCCL on GPUs, gloo on CPUs) and loads that rank's share of
    the model onto its device."""
    cfg, device = spec.config, rank_device(spec.config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = init_group(rank, spec.size, spec.init_file, backend="nccl" if device.type == "cuda" else "gloo",
                      timeout_s=spec.timeout_s, all_reduce=cfg.tp_all_reduce)
    loaded = load_model(cfg.model, cfg.torch_dtype(), device, cfg.quantization, cfg.quant_group_size,
                        cfg.quant_method, comm=comm)
    return loaded, comm


def rank_threads(size: int) -> int:
    """Threads each of ``size`` ranks on this machine computes with: its share of the CPUs
    this process may use (more would have the ranks' thread pools fight over cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // size)


def worker_main(rank: int, spec: WorkerSpec, conn) -> None:
    """A worker process: load, build the cache rank 0 sized, then run each step it is sent
    until told to stop (or rank 0's pipe closes)."""
    torch.set_num_threads(rank_threads(spec.size))
    loaded, comm = load_rank(spec, rank)
    try:
        cfg, mcfg, device = spec.config, loaded.config, rank_device(spec.config, rank)
        num_blocks = conn.recv()
        if not isinstance(num_blocks, int):  # ("stop",): rank 0 failed before its cache was sized
            return
        cache = KVCache(mcfg.num_layers, num_blocks, cfg.block_size, loaded.kv_heads, mcfg.head_dim,
                        cfg.kv_torch_dtype(), device)
        runner = ModelRunner(loaded.model, cache.layers, cfg.block_size, device, cfg.ops_backend,
                             copy_blocks=cache.apply)
        conn.send("ready")
        _serve(conn, runner, comm)
    finally:
        comm.close()


def _serve(conn, runner: ModelRunner, comm: TorchComm) -> None:
    while True:
        try:
            kind, *args = conn.recv()
        except EOFError:  # rank 0 is gone
            return
        if kind == "stop":
            return
        if kind == "step":
            inp, all_logits, feed = args
            runner.execute(inp, all_logits, None if feed is None else receive_feed(comm, *feed, runner.device))
        elif kind == "capture":  # with rank 0, in lockstep: the captures' collectives pair up
            conn.send(runner.capture_graphs(*args))
        else:  # "copy": block copies of a step that runs no forward pass
            runner.apply_block_ops(*args)


def send_feed(comm: TorchComm, feed: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Rank 0's side of an asynchronous step's feed (the positions and the tokens its last step
    sampled, which only rank 0 has): one broadcast of both."""
    positions, tokens = feed
    comm.broadcast_(torch.cat([positions, tokens.to(positions.dtype)]))


def receive_feed(comm: TorchComm, n: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's side of ``send_feed``: the ``n`` positions and their tokens (as ``dtype``)."""
    packed = comm.broadcast_(torch.empty(2 * n, dtype=torch.int64, device=device))
    return packed[:n], packed[n:].to(dtype)


class TPWorkers:
    """Rank 0's handle on its workers: started with the model's load, told each step's input."""

    def __init__(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(1, spec.size):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, spec, there), daemon=True,
                               name=f"fastinfer-tp-rank{rank}")
            proc.start()
            there.close()
            self.conns.append(here)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    def own(self, comm: TorchComm) -> None:
        """Makes ``shutdown`` also leave rank 0's process group (so a later engine may form one)."""
        self.comm = comm
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs, comm)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start_cache(self, num_blocks: int) -> None:
        """Has every worker build its cache of ``num_blocks`` blocks; waits until all are ready."""
        self._send(num_blocks)
        self.replies("start")

    def capture(self, max_num_seqs: int, max_model_len: int, emulate: bool) -> None:
        """Has every worker capture its decode graphs (rank 0 captures its own meanwhile)."""
        self._send(("capture", max_num_seqs, max_model_len, emulate))

    def replies(self, what: str) -> list:
        """Each worker's answer to the last request, in rank order."""
        out = []
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(_START_TIMEOUT_S):
                self.raise_if_dead()
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel rank {rank} did not {what} within {_START_TIMEOUT_S:g} s")
            try:
                out.append(conn.recv())
            except EOFError:
                self.raise_if_dead()
                raise
        return out

    def step(self, inp: StepInput, all_logits: bool, feed: tuple[int, torch.dtype] | None = None) -> None:
        """Sends a step; ``feed``: the size and token dtype of the feed broadcast that follows."""
        self._send(("step", inp, all_logits, feed))

    def copy(self, ops) -> None:
        self._send(("copy", ops))

    def _send(self, message) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
                self.raise_if_dead()
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel rank {rank} (pid {self.procs[rank - 1].pid}) is gone (its "
                                      "pipe closed); the engine cannot go on: build a new one") from exc

    def raise_if_dead(self, cause: BaseException | None = None) -> None:
        """Raises ``WorkerDiedError`` naming the first worker that has exited (and how), once
        the others are stopped and the group left (the engine cannot go on)."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                how = (f"killed by {signal.Signals(-proc.exitcode).name}" if proc.exitcode < 0
                       else f"exited with code {proc.exitcode}")
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel rank {rank} (pid {proc.pid}) {how}; the engine cannot "
                                      "go on: build a new one")

    def shutdown(self) -> None:
        """Stops every worker (asked first, then killed) and waits for them."""
        self._finalizer()


def _stop(conns, procs, comm: TorchComm | None = None) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        conn.close()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if comm is not None:
        comm.close()


class TPModelRunner(ModelRunner):
    """Rank 0's runner: each step's input goes to the workers first (with the tokens an
    asynchronous step feeds, broadcast), then every rank runs it.
    A collective that fails because a worker died raises ``WorkerDiedError``."""

    def __init__(self, workers: TPWorkers, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        self._in_step = False

    def execute(self, inp: StepInput, all_logits: bool = False, feed=None) -> torch.Tensor:
        """``feed`` (asynchronous scheduling: tokens the last step sampled, on rank 0 only) is
        broadcast to the workers after the step."""
        self.workers.step(inp, all_logits, None if feed is None else (feed[0].numel(), feed[1].dtype))
        self._in_step = True  # the workers apply the step's block copies themselves
        try:
            if feed is not None:
                send_feed(self.workers.comm, feed)
            return super().execute(inp, all_logits, feed)
        except RuntimeError as exc:
            self.workers.raise_if_dead(exc)
            raise
        finally:
            self._in_step = False

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, emulate: bool = False) -> bool:
        """Every rank captures its own decode graphs at once, so the collectives inside them
        pair up (NCCL's can be captured); later every rank replays the same sizes for the same
        steps (``DecodeGraphs.takes`` decides alike on each). True when all ranks captured."""
        self.workers.capture(max_num_seqs, max_model_len, emulate)
        mine = super().capture_graphs(max_num_seqs, max_model_len, emulate)
        theirs = self.workers.replies("capture its graphs")
        if any(t != mine for t in theirs):
            raise RuntimeError(f"internal error: tensor-parallel ranks disagree on CUDA graphs (rank 0: {mine}, "
                               f"the others: {theirs})")
        return mine

    def apply_block_ops(self, ops) -> None:
        if not self._in_step:
            self.workers.copy(ops)
        super().apply_block_ops(ops)


class TorchrunWorkers(TPWorkers):
    """``TPWorkers`` when torchrun started every rank: the same requests, sent over a
    ``ControlChannel`` instead of pipes. A dead rank shows as a failed collective (no process
    handle here to ask)."""

    def __init__(self) -> None:  # no processes to start: torchrun did
        self.conns, self.procs, self.channel = [], [], None
        self._finalizer = weakref.finalize(self, lambda: None)

    def own(self, comm: TorchComm) -> None:
        self.comm, self.channel = comm, ControlChannel()
        self._finalizer = weakref.finalize(self, _stop_channel, self.channel, comm)

    def replies(self, what: str) -> list:
        try:
            return self.channel.gather()[1:]
        except RuntimeError as exc:
            self.raise_if_dead(exc)

    def _send(self, message) -> None:
        try:
            self.channel.broadcast(message)
        except RuntimeError as exc:
            self.raise_if_dead(exc)

    def raise_if_dead(self, cause: BaseException | None = None) -> None:
        """Called when a collective failed: with no process to ask, the failure is the news."""
        raise WorkerDiedError(f"a tensor-parallel rank started by torchrun is gone or stuck (a collective "
                              f"failed: {cause or 'see above'}); the engine cannot go on: build a new one") from cause


def _stop_channel(channel: ControlChannel, comm: TorchComm) -> None:
    try:
        channel.broadcast(("stop",))
    except RuntimeError:  # a rank is gone already
        pass
    finally:
        comm.close()


def _start_under_torchrun(config, rank: int, timeout_s: float) -> tuple[LoadedModel, TPWorkers, TorchComm]:
    """torchrun started every rank, each running the user's script: rank 0 goes on with the
    engine; the others serve its steps until it stops, then exit (the rest of the script is
    rank 0's)."""
    spec = WorkerSpec(config, config.tensor_parallel_size, "env://", timeout_s)
    if rank != 0:  # never returns into the user's script: it is rank 0's
        code = 0
        try:
            worker_main(rank, spec, WorkerConn())
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    loaded, comm = load_rank(spec, 0)
    workers = TorchrunWorkers()
    workers.own(comm)
    return loaded, workers, comm


def start_tensor_parallel(config, timeout_s: float = 60.0) -> tuple[LoadedModel, TPWorkers, TorchComm]:
    """Spawns ranks 1..N-1 of ``config.tensor_parallel_size`` (or, under torchrun, joins the
    ranks it started) and loads rank 0's share here (every rank loads at once), computing with
    its share of the CPUs (``rank_threads``; on a CPU, this process's torch threads are set to
    it). Returns rank 0's model, the workers and rank 0's group."""
    rank = torchrun_rank(config.tensor_parallel_size)
    if config.torch_device().type == "cpu":
        torch.set_num_threads(rank_threads(config.tensor_parallel_size))
    else:
        torch.cuda.set_device(rank_device(config, rank or 0))
    if rank is not None:
        return _start_under_torchrun(config, rank, timeout_s)
    init_file = os.path.join(tempfile.mkdtemp(prefix="fastinfer-tp-"), "rendezvous")
    spec = WorkerSpec(config, config.tensor_parallel_size, init_file, timeout_s)
    workers = TPWorkers(spec)
    try:
        loaded, comm = load_rank(spec, 0)
    except BaseException:
        workers.shutdown()
        leave_group()
        raise
    workers.own(comm)
    return loaded, workers, comm
