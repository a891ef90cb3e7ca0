"""Tensor parallelism across processes over gloo (issue 24): two spawned ranks, each holding
its share of a random GQA Llama, run a prefill together through ``TorchComm``; the logits every
rank gets equal the one-process model's (uneven vocabulary shards gathered too)."""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer.distributed.layout import plan_layout
from fastinfer.model.llama import LlamaForCausalLM

from .tp_models import PROMPTS, checkpoint_for, prefill_logits, tiny_config

pytestmark = pytest.mark.slow


def _rank_main(rank: int, size: int, init_file: str, out_dir: str, heads: int, kv: int, kind: str | None) -> None:
    """One rank (a spawned process): joins the gloo group, loads its share, runs the prefill,
    saves its logits."""
    from fastinfer.distributed.group import init_group
    from fastinfer.model.sharding import shard_weights

    torch.set_num_threads(1)
    comm = init_group(rank, size, init_file, timeout_s=60)
    try:
        cfg = tiny_config(heads, kv, tied=False)
        layout = plan_layout(heads, kv, cfg.intermediate_size, 1001, size)[rank]
        cfg = _odd_vocab(cfg)
        model = LlamaForCausalLM(cfg, layout=layout, comm=comm)
        model.load_weights(shard_weights(checkpoint_for(cfg, kind), layout, cfg.head_dim))
        torch.save(prefill_logits(model, layout.num_kv_heads, PROMPTS), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        comm.close()


def _odd_vocab(cfg):
    import dataclasses

    return dataclasses.replace(cfg, vocab_size=1001)  # 501 + 500 ids: the ranks' logits differ in width


@pytest.mark.parametrize("heads, kv, kind", [(8, 2, None), (12, 3, "int4")])
def test_two_gloo_ranks_give_the_one_rank_logits(tmp_path, heads, kv, kind):
    size = 2
    ctx = torch.multiprocessing.get_context("spawn")
    args = (size, str(tmp_path / "rendezvous"), str(tmp_path), heads, kv, kind)
    procs = [ctx.Process(target=_rank_main, args=(r, *args), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} did not finish within 180 s"
    assert [p.exitcode for p in procs] == [0] * size
    cfg = _odd_vocab(tiny_config(heads, kv, tied=False))
    whole = LlamaForCausalLM(cfg)
    whole.load_weights(checkpoint_for(cfg, kind))
    want = prefill_logits(whole, kv, PROMPTS)
    for r in range(size):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.shape == want.shape == (len(PROMPTS), 1001)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
