"""Gloo's all_reduce against DeepSpeed's CPU shared-memory all_reduce, two processes.

What it measures: the time of one all_reduce(SUM) call, in microseconds, on tensors of
shapes (1, 576), (32, 576) and (256, 576) (``--dtype float32`` by default), by

- ``gloo``: ``torch.distributed.all_reduce`` on the gloo group that the probe creates
  (``init_process_group("gloo", init_method="file://...")``, as fastinfer does);
- ``ds_api``: ``deepspeed.comm.inference_all_reduce``, after ``deepspeed.comm.init_distributed``
  has wrapped that same, already initialised group;
- ``ds_raw``: the op underneath, ``torch.ops.deepspeed.inference_all_reduce_`` (DeepSpeed's
  ``ShareMemCommBuilder``, JIT-compiled with g++ on first use, about a minute on two cores).

Each of the 2 ranks (``torch.multiprocessing`` spawn, ``torch.set_num_threads(1)``) refills its
tensor before every call (outside the timed region), times the call alone with
``time.perf_counter_ns``, and checks that the result equals the exact sum (the inputs are small
integers, so the float sum is exact). ``--warmup`` calls (200) are dropped, ``--iters`` (2000)
are kept; rank 0 prints median and p90 per method and shape for each rank, and the share
of rank 0's calls over 1 ms (on a loaded machine the shm op's spin-wait shows up there).

Usage: ``.venv/bin/python benchmarks/allreduce_probe.py [--out probe.json] [--dtype bfloat16]``.
Needs ``deepspeed`` in the venv; set ``TORCH_EXTENSIONS_DIR`` to choose where the op is built.
The op's shared-memory segments (``/dev/shm/deepspeed_allreduce_buffer_*``, ~66 MiB a rank) are
never unlinked by DeepSpeed; the probe unlinks its own at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
SHAPES = ((1, 576), (32, 576), (256, 576))
METHODS = ("gloo", "ds_api", "ds_raw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


def make_inputs(shape, rank: int, dtype: torch.dtype):
    """This rank's input and the exact sum over all ranks (small integers: exact in bf16 too)."""
    idx = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(shape)

    def rank_input(r):
        return ((idx * 7 + r * 13) % 64).to(dtype)

    expected = sum(rank_input(r).double() for r in range(WORLD_SIZE)).to(dtype)
    return rank_input(rank), expected


def time_calls(fn, src: torch.Tensor, expected: torch.Tensor, warmup: int, iters: int):
    """Nanoseconds of each kept call of fn(buf), and how many results were wrong."""
    buf = torch.empty_like(src)
    times, wrong = [], 0
    for i in range(warmup + iters):
        buf.copy_(src)
        t0 = time.perf_counter_ns()
        fn(buf)
        t1 = time.perf_counter_ns()
        if not torch.equal(buf, expected):
            wrong += 1
        if i >= warmup:
            times.append(t1 - t0)
    return times, wrong


def summarize(times_ns) -> dict:
    us = sorted(t / 1000.0 for t in times_ns)
    return {
        "median_us": round(statistics.median(us), 2),
        "p90_us": round(us[int(0.9 * (len(us) - 1))], 2),
        "mean_us": round(statistics.fmean(us), 2),
        "min_us": round(us[0], 2),
        "over_1ms": round(sum(u > 1000.0 for u in us) / len(us), 3),
    }


def init_shm(rank: int) -> dict:
    """Wrap the existing torch.distributed group in DeepSpeed's comm; this builds the shm op."""
    os.environ["LOCAL_RANK"] = str(rank)
    t0 = time.perf_counter()
    import deepspeed
    import deepspeed.comm as ds_comm

    t1 = time.perf_counter()
    ds_comm.init_distributed(dist_backend="gloo", verbose=False)
    t2 = time.perf_counter()
    cdb = ds_comm.comm.cdb
    if cdb.shm_comm_op is None or not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        raise RuntimeError("DeepSpeed's shm op did not build or load")
    return {
        "deepspeed": deepspeed.__version__,
        "import_s": round(t1 - t0, 2),
        "init_distributed_s": round(t2 - t1, 2),
        "vector_kernel_level": cdb.shm_vector_kernel_level,
        "fns": {
            "gloo": dist.all_reduce,
            "ds_api": ds_comm.inference_all_reduce,
            "ds_raw": torch.ops.deepspeed.inference_all_reduce_,
        },
    }


def unlink_shm(rank: int) -> None:
    """Remove this rank's segment: DeepSpeed's op never shm_unlink()s it."""
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def worker(rank: int, cfg: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + cfg["init_file"],
                            rank=rank, world_size=WORLD_SIZE)
    info = init_shm(rank)
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for shape in SHAPES:
        src, expected = make_inputs(shape, rank, dtype)
        for method in METHODS:
            dist.barrier()
            times, wrong = time_calls(info["fns"][method], src, expected,
                                      cfg["warmup"], cfg["iters"])
            rows.append({"rank": rank, "shape": list(shape), "method": method,
                         "wrong": wrong, **summarize(times)})
    meta = {k: v for k, v in info.items() if k != "fns"}
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, {"rows": rows, "meta": meta})
    dist.barrier()
    unlink_shm(rank)
    if rank == 0:
        report(gathered, cfg)
    dist.barrier()  # leave together (a rank still aborted at exit in ~3 of 23 runs; see notes)
    dist.destroy_process_group()


def print_table(rows) -> None:
    print(f"{'shape':>10} {'method':>7} | {'r0 med':>8} {'r0 p90':>8} | "
          f"{'r1 med':>8} {'r1 p90':>8} | >1ms | wrong")
    by_key = {(tuple(r["shape"]), r["method"], r["rank"]): r for r in rows}
    for shape in SHAPES:
        for method in METHODS:
            r0, r1 = by_key[(shape, method, 0)], by_key[(shape, method, 1)]
            label = "x".join(map(str, shape))
            print(f"{label:>10} {method:>7} | {r0['median_us']:8.1f} {r0['p90_us']:8.1f} | "
                  f"{r1['median_us']:8.1f} {r1['p90_us']:8.1f} | {r0['over_1ms']:4.0%} | "
                  f"{r0['wrong'] + r1['wrong']}")


def report(gathered, cfg: dict) -> None:
    rows = [row for g in gathered for row in g["rows"]]
    result = {
        "what": "all_reduce(SUM) us per call, 2 ranks, 1 thread each",
        "dtype": cfg["dtype"], "iters": cfg["iters"], "warmup": cfg["warmup"],
        "torch": torch.__version__, "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "loadavg_start": cfg["loadavg_start"],
        "loadavg_end": list(os.getloadavg()),
        "ranks_meta": [g["meta"] for g in gathered], "rows": rows,
    }
    print(f"dtype {cfg['dtype']}, {cfg['iters']} calls after {cfg['warmup']} warm-up, "
          f"microseconds; load average {cfg['loadavg_start']} -> {result['loadavg_end']}")
    print_table(rows)
    print("rank meta:", json.dumps(result["ranks_meta"]))
    if cfg["out"]:
        with open(cfg["out"], "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", cfg["out"])


def main(argv=None) -> None:
    args = parse_args(argv)
    # LOCAL_SIZE == world size is what switches the shm path on (otherwise the op is unusable);
    # MASTER_ADDR/MASTER_PORT only name the /dev/shm segments, so make them unique per run.
    os.environ["LOCAL_SIZE"] = str(WORLD_SIZE)
    os.environ["WORLD_SIZE"] = str(WORLD_SIZE)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(os.getpid())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"init_file": os.path.join(tmp, "pg_init"), "dtype": args.dtype,
               "iters": args.iters, "warmup": args.warmup, "out": args.out,
               "loadavg_start": list(os.getloadavg())}
        mp.spawn(worker, args=(cfg,), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
