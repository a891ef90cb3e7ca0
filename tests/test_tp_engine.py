"""The engine under tensor parallelism (issue 24): ``tensor_parallel_size=2`` spawns a worker and
gives the same greedy tokens as one process on the default model (whose 9 query and 3 KV heads
split unevenly; again from the prefix cache), on random-weight GQA Llamas (KV heads split or
replicated), with int8 and int4 weights, under asynchronous scheduling, and with DeepSpeed's
shared-memory all-reduce; a killed worker ends the engine with an error naming its rank within
seconds, having stopped the others; shutdown leaves no process behind. On 2 GPUs (gpu-check.sh),
the same over NCCL."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from fastinfer import LLM, SamplingParams
from fastinfer.errors import ConfigError, EngineDeadError
from fastinfer.ops.backends import cpu_native

from .conftest import save_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _workers_left() -> list[psutil.Process]:
    """This process's children, but multiprocessing's resource tracker (it outlives them)."""
    return [c for c in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(c.cmdline())]


def _tokens(llm: LLM, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_two_ranks_give_one_ranks_tokens(quantization, monkeypatch):
    """float32, and int4 weights (groups of 32, split on group boundaries) with float inputs:
    the same tokens. (With the default
    int8 inputs, a quantized model's activations are rounded to int8 per block of 32, so the
    partial sums' float reordering can move a rounding: close logits, not the same bits; the
    tokens are compared on the path whose arithmetic TP does not change.)"""
    if quantization != "none":
        monkeypatch.setenv("FASTINFER_CPU_ISA", "scalar")  # the workers' kernels: float inputs
        cpu_native.set_isa_cap("scalar")  # and this process's
    try:
        options = dict(quantization=quantization, kv_cache_memory="32MiB", max_model_len=256)
        # (a prompt of several full blocks, for the prefix cache's turn below; the scalar kernels are slow)
        prompts = PROMPTS + ["The quick brown fox jumps over the lazy dog. " * 6] if quantization == "none" \
            else PROMPTS[:2]
        want = _tokens(LLM("smollm2-135m", **options), prompts)
        tp = LLM("smollm2-135m", tensor_parallel_size=2, **options)
        try:
            assert len(tp.engine.workers.pids) == 1
            assert _tokens(tp, prompts) == want
            assert _tokens(tp, prompts) == want  # again, now from the prefix cache every rank shares
            stats = tp.stats()
            if quantization == "none":  # its long prompt's blocks were read from the cache
                assert stats["prefix_cache_hits"] > 0
            assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        finally:
            tp.shutdown()
    finally:
        cpu_native.set_isa_cap(3)  # the CPU's best path again
    assert not _workers_left()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_two_ranks_give_one_ranks_tokens_on_a_random_gqa_llama(kv_heads, tmp_path, hf_smollm_tokenizer):
    """A random-weight Llama with 4 query heads over 2 KV heads (one a rank) or 1 (replicated
    on both ranks): TP=2 greedy tokens through the engine equal TP=1's."""
    path = save_tiny_model(tmp_path / "tiny", "llama", hf_smollm_tokenizer, kv_heads=kv_heads)
    options = dict(dtype="float32", device="cpu", kv_cache_memory="8MiB")
    prompts = [[5, 17, 301, 44, 9], list(range(100, 140))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, **options).generate(prompts, params, use_tqdm=False)]
    tp = LLM(path, tensor_parallel_size=2, **options)
    try:
        assert [o.outputs[0].token_ids for o in tp.generate(prompts, params, use_tqdm=False)] == want
    finally:
        tp.shutdown()
    assert not _workers_left()


def test_decode_graphs_under_two_ranks_capture_and_replay_in_lockstep(tmp_path, hf_smollm_tokenizer):
    """CUDA graphs without the capture (``emulate``, on the Triton kernels under the
    interpreter): every rank captures its decode graphs at once, each decode step replays its
    graph on every rank (their collectives pair up), and the tokens equal one eager process's."""
    path = save_tiny_model(tmp_path / "tiny", "llama", hf_smollm_tokenizer, kv_heads=2)
    options = dict(dtype="float32", device="cpu", kv_cache_memory="8MiB", ops_backend="triton", max_num_seqs=4)
    prompts = [[5, 17, 301, 44, 9], list(range(100, 130)), [7, 7, 7]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, **options).generate(prompts, params, use_tqdm=False)]
    tp = LLM(path, tensor_parallel_size=2, **options)
    try:
        runner = tp.engine.runner
        assert runner.capture_graphs(4, tp.engine.max_model_len, emulate=True)  # both ranks did
        replays, run = [], runner.graphs.run
        runner.graphs.run = lambda hb, feed=None: replays.append(1) or run(hb, feed)
        assert [o.outputs[0].token_ids for o in tp.generate(prompts, params, use_tqdm=False)] == want
        assert len(replays) >= params.max_tokens - 2  # the decode steps (3 sequences, padded to 4)
    finally:
        tp.shutdown()
    assert not _workers_left()


def test_deepspeeds_shared_memory_all_reduce_gives_the_same_tokens():
    """tp_all_reduce="shm" (DeepSpeed's op, built on first use): TP=1's tokens, and no shared
    memory segment left behind."""
    pytest.importorskip("deepspeed.ops.op_builder.cpu")
    options = dict(kv_cache_memory="32MiB", max_model_len=256)
    want = _tokens(LLM("smollm2-135m", **options))
    before = set(os.listdir("/dev/shm"))
    tp = LLM("smollm2-135m", tensor_parallel_size=2, tp_all_reduce="shm", **options)
    try:
        assert any("deepspeed_allreduce_buffer" in n for n in set(os.listdir("/dev/shm")) - before)
        assert _tokens(tp) == want
    finally:
        tp.shutdown()
    assert not {n for n in set(os.listdir("/dev/shm")) - before if "deepspeed" in n}
    assert not _workers_left()


def test_asynchronous_scheduling_under_two_ranks(monkeypatch):
    """async_scheduling=True: each step is launched before the last one's tokens reach the
    host; rank 0 broadcasts them to the worker (the feed). TP=1's greedy tokens, synchronous."""
    from fastinfer.model import tensor_parallel

    fed = []
    send = tensor_parallel.send_feed
    monkeypatch.setattr(tensor_parallel, "send_feed", lambda comm, feed: (fed.append(feed[0].numel()), send(comm, feed)))
    options = dict(kv_cache_memory="32MiB", max_model_len=256)
    want = _tokens(LLM("smollm2-135m", **options))
    tp = LLM("smollm2-135m", tensor_parallel_size=2, async_scheduling=True, **options)
    try:
        assert _tokens(tp) == want
    finally:
        tp.shutdown()
    assert len(fed) >= 5 and max(fed) == len(PROMPTS)  # decode steps fed every sequence's last token
    assert not _workers_left()


TORCHRUN_SCRIPT = """
import json
from fastinfer import LLM, SamplingParams
llm = LLM("smollm2-135m", tensor_parallel_size=2, kv_cache_memory="32MiB", max_model_len=256)
params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
print("RANK0", json.dumps([o.outputs[0].token_ids for o in llm.generate({prompts!r}, params, use_tqdm=False)]))
llm.shutdown()
"""


def test_under_torchrun_every_rank_runs_the_script_and_rank_0_the_engine(tmp_path):
    """``torchrun --nproc-per-node 2 script.py``: both processes build the LLM; rank 1 serves
    rank 0's steps (no spawned worker) and exits when rank 0 shuts down; rank 0's tokens are
    one process's."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(prompts=PROMPTS))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RANK0 ")]
    assert len(lines) == 1  # rank 1 never got past building the LLM
    want = _tokens(LLM("smollm2-135m", kv_cache_memory="32MiB", max_model_len=256))
    assert json.loads(lines[0][len("RANK0 "):]) == want


def test_torchrun_with_another_number_of_processes_is_refused(monkeypatch):
    from fastinfer.distributed.channel import torchrun_rank

    assert torchrun_rank(2) is None  # not under torchrun: the engine spawns its workers
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_rank(2) == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="needs as many processes .--nproc-per-node 2.; WORLD_SIZE is 3"):
        torchrun_rank(2)


def test_int8_inputs_under_two_ranks_stay_close():
    """The default quantized path (int8 inputs): TP=2's first-step logits are close to TP=1's
    and its greedy first tokens the same."""
    options = dict(quantization="int8", kv_cache_memory="32MiB", max_model_len=256)
    one = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    want = LLM("smollm2-135m", **options).generate(PROMPTS, one, use_tqdm=False)
    tp = LLM("smollm2-135m", tensor_parallel_size=2, **options)
    try:
        got = tp.generate(PROMPTS, one, use_tqdm=False)
    finally:
        tp.shutdown()
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        (t,) = w.outputs[0].token_ids
        assert abs(g.outputs[0].logprobs[0][t] - w.outputs[0].logprobs[0][t]) < 0.1


def test_a_killed_worker_ends_the_engine_naming_its_rank():
    """Three ranks (the default model's 3 KV heads, one each); rank 1 killed: the next step
    raises naming it within seconds, and the error has already stopped rank 2."""
    tp = LLM("smollm2-135m", tensor_parallel_size=3, kv_cache_memory="32MiB", max_model_len=256)
    try:
        pid, other = tp.engine.workers.pids
        os.kill(pid, signal.SIGKILL)
        tp.engine.workers.procs[0].join(10)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"tensor-parallel rank 1 \(pid {pid}\) killed by SIGKILL"):
            tp.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 10
        assert not psutil.pid_exists(other) or psutil.Process(other).status() == psutil.STATUS_ZOMBIE
        assert not _workers_left()
    finally:
        tp.shutdown()
    assert not _workers_left()


@pytest.mark.parametrize("options, words", [
    (dict(kv_offload_memory="64MiB"), "no kv_offload_memory"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int >= 1"),
    (dict(tp_all_reduce="mpi"), "tp_all_reduce"),
])
def test_what_tensor_parallelism_does_not_do_yet_is_refused(options, words):
    options = {"tensor_parallel_size": 2, **options}
    with pytest.raises((ConfigError, ValueError), match=words):
        LLM("smollm2-135m", **options)
    assert not _workers_left()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism over NCCL needs 2 GPUs")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_two_gpus_over_nccl_give_one_gpus_tokens(async_scheduling):
    """Run by scripts/gpu-check.sh where the machine has 2 GPUs: rank 1 on cuda:1, NCCL
    collectives, CUDA graphs on both ranks; float32 greedy tokens equal one GPU's."""
    options = dict(device="cuda", dtype="float32", kv_cache_memory="256MiB", max_model_len=256,
                   async_scheduling=async_scheduling)
    want = _tokens(LLM("smollm2-135m", enforce_eager=True, **options))
    tp = LLM("smollm2-135m", tensor_parallel_size=2, **options)
    try:
        assert tp.engine.runner.graphs is not None  # every rank captured its decode graphs
        assert _tokens(tp) == want
    finally:
        tp.shutdown()
    assert not _workers_left()
