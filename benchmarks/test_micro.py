"""pytest-benchmark micro-benchmarks: one engine decode step at several batch sizes, the
sampler, the detokenizer and the block manager.

  .venv/bin/python -m pytest benchmarks/ --benchmark-json=bench_out/micro.json
  .venv/bin/python -m pytest benchmarks/ --benchmark-storage=file://bench_out/store --benchmark-autosave
  .venv/bin/python -m pytest benchmarks/ --benchmark-storage=file://bench_out/store \
      --benchmark-compare=0001 --benchmark-compare-fail=mean:10%
"""
from __future__ import annotations

import pytest
import torch

from fastinfer import EngineConfig, SamplingParams
from fastinfer.engine.engine import Engine
from fastinfer.kv_cache.block_manager import BlockManager
from fastinfer.sampling.detokenizer import IncrementalDetokenizer
from fastinfer.sampling.sampler import Sampler, SamplingRow
from fastinfer.scheduler.sequence import Sequence

VOCAB = 49152


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_engine_decode_step(benchmark, smollm, batch):
    engine = Engine(EngineConfig(model=smollm.path, dtype="float32", device="cpu", kv_cache_memory="512MiB",
                                 max_model_len=2048), smollm)
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([100 + i] * 64, params)
    engine.step()  # prefill, so every measured step is a decode step of `batch` sequences
    benchmark.pedantic(engine.step, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("kind", ["greedy", "top_p"])
@pytest.mark.parametrize("batch", [1, 32])
def test_sampler(benchmark, batch, kind):
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    params = (SamplingParams(temperature=0.0) if kind == "greedy"
              else SamplingParams(temperature=0.8, top_p=0.9, top_k=50))
    rows = [SamplingRow(params, torch.Generator().manual_seed(i), [1, 2, 3], []) for i in range(batch)]
    sampler = Sampler()
    benchmark(sampler, logits, rows)


def test_detokenizer_256_tokens(benchmark, smollm):
    tok = smollm.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog; naïve café, 東京, 🙂. " * 20)[:256]

    def run():
        detok = IncrementalDetokenizer(tok, ids[:5])
        return "".join([detok.add(t) for t in ids])

    benchmark(run)


def test_block_manager_allocate_free(benchmark):
    """64 sequences of 129 tokens admitted (distinct prompts: no cache hits) and freed."""
    manager = BlockManager(4096, 16)
    seqs = [Sequence(i, [i] * (16 * 8 + 1), 16 * 8 + 1, arrival=i) for i in range(64)]

    def cycle():
        for seq in seqs:
            assert manager.allocate(seq, manager.cached_prefix(seq), len(seq.token_ids))
        for seq in seqs:
            manager.free(seq.seq_id)

    benchmark(cycle)
    assert manager.num_free == 4096

