"""Forcing a backend of ``fastinfer.ops`` (``FASTINFER_OPS_BACKEND`` / ``EngineConfig.ops_backend``)
and the engine on the Triton backend under ``TRITON_INTERPRET=1``: the same greedy tokens as the
reference backend on a small random Llama with GQA, float32 (a mixed batch: prompts of several
lengths, chunked prefill, decode)."""
from __future__ import annotations

import os
import re

import pytest
import torch

from fastinfer import EngineConfig, SamplingParams, ops
from fastinfer.engine.engine import Engine
from fastinfer.engine.memory import profile_step
from fastinfer.errors import ConfigError
from fastinfer.model.runner import ModelRunner
from fastinfer.ops import dispatch, reference
from fastinfer.sampling.sampler import SCRATCH_BYTES_PER_LOGIT

from .conftest import run_to_completion, save_tiny_model

PROMPTS = [[5, 17, 230, 9], list(range(40, 77)), [101], list(range(300, 318))]


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory, hf_smollm_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("backend") / "llama", "llama", hf_smollm_tokenizer, kv_heads=1)


NEW_TOKENS = 10


def new_engine(path, **options) -> Engine:
    return Engine(EngineConfig(model=path, device="cpu", dtype="float32", kv_cache_memory="8MiB",
                               max_num_batched_tokens=24, **options))


def greedy(engine: Engine):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    finals = run_to_completion(engine)
    return [finals[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def reference_tokens(tiny_gqa):
    return greedy(new_engine(tiny_gqa, ops_backend="reference"))


def test_select_takes_the_forced_backend_where_it_applies(monkeypatch):
    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select("rms_norm", x, w, 1e-5) is reference.rms_norm
    with dispatch.forcing("cpu"):  # the engine's field wins over the environment
        assert dispatch.forced_backend() == "cpu_native"
        want = next(i.fn for i in ops.implementations("rms_norm")
                    if i.backend in ("cpu_native", "reference") and i.applies(x, w, 1e-5))
        assert dispatch.select("rms_norm", x, w, 1e-5) is want
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="FASTINFER_OPS_BACKEND must be one of reference, triton, cpu, cuda"):
        dispatch.forced_backend()
    with pytest.raises(ConfigError, match="FASTINFER_OPS_BACKEND"):
        EngineConfig(device="cpu")


def test_config_refuses_a_backend_the_device_cannot_run():
    with pytest.raises(ConfigError, match="ops_backend='cuda' needs device='cuda'"):
        EngineConfig(device="cpu", ops_backend="cuda")
    assert EngineConfig(device="cpu", ops_backend="auto").ops_backend is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")
def test_engine_on_triton_matches_the_reference_backend(tiny_gqa, reference_tokens, monkeypatch):
    calls = []
    from fastinfer.kernels.triton import attention

    real = attention.paged_attention
    monkeypatch.setattr(dispatch, "_REGISTRY", {k: [i if i.fn is not real else
                                                    dispatch.Impl(i.backend, i.applies,
                                                                  lambda *a: calls.append(1) or real(*a))
                                                    for i in v] for k, v in dispatch._REGISTRY.items()})
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    got = greedy(new_engine(tiny_gqa))
    assert calls, "the Triton attention kernel never ran"
    assert got == reference_tokens
    assert all(len(t) == NEW_TOKENS for t in got)


def test_capture_sizes():
    from fastinfer.model.cuda_graphs import capture_sizes

    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 8))
    assert capture_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_decode_graph_buffers_and_padding_match_eager(tiny_gqa, reference_tokens, monkeypatch, async_scheduling):
    """The CUDA-graph path without the capture (``emulate``): decode steps go through the static
    buffers, padded to the next captured size with rows of no context and slot -1, on the Triton
    kernels; the tokens equal the eager engine's (which equal the reference backend's). With
    async scheduling, the previous step's tokens reach the static ids buffer on the device."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    engine = new_engine(tiny_gqa, max_num_seqs=6, async_scheduling=async_scheduling)
    assert engine.runner.capture_graphs(6, engine.max_model_len, emulate=True)
    graphs = engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 6]
    replays, fed = [], []
    real_run = graphs.run

    def run(hb, feed=None):
        replays.append(len(hb.context_lens))
        fed.append(feed is not None)
        return real_run(hb, feed)

    monkeypatch.setattr(graphs, "run", run)
    assert greedy(engine) == reference_tokens
    assert 3 in replays or 4 in replays  # a batch padded to a captured size
    assert sum(fed) >= (NEW_TOKENS - 2 if async_scheduling else 0) and (async_scheduling or not any(fed))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")
def test_structured_outputs_mask_outside_the_decode_graph(tiny_gqa, monkeypatch):
    """Decode steps replayed from (emulated) graphs give logits; the grammar's mask is applied
    to them outside the graph: the constrained tokens equal the eager engine's and match."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    params = SamplingParams(max_tokens=8, temperature=0, structured_outputs={"regex": "[a-c]{2,5}-[0-9]{3}"})

    def constrained(engine):
        ids = [engine.add_request(p, params) for p in PROMPTS[:2]]
        finals = run_to_completion(engine)
        return [finals[i].outputs[0].text for i in ids]

    graphed = new_engine(tiny_gqa, max_num_seqs=2)
    assert graphed.runner.capture_graphs(2, graphed.max_model_len, emulate=True)
    replays = []
    real_run = graphed.runner.graphs.run
    monkeypatch.setattr(graphed.runner.graphs, "run", lambda hb, feed=None: replays.append(1) or real_run(hb, feed))
    texts = constrained(graphed)
    assert replays and texts == constrained(new_engine(tiny_gqa, max_num_seqs=2))
    assert all(re.fullmatch("[a-c]{2,5}-[0-9]{3}", t) for t in texts), texts


def test_profile_step_runs_the_largest_step_over_a_scratch_cache(tiny_gqa, monkeypatch):
    """The GPU memory profile's step, run on the CPU with torch.cuda's memory counters stubbed:
    it builds block tables for the given lengths, runs them with logits, and adds the sampler's
    scratch memory per logit to the measured peak."""
    engine = new_engine(tiny_gqa)
    seen = {}
    real_execute = ModelRunner.execute

    def execute(self, inp, all_logits=False, feed=None):
        seen["tables"], seen["lens"] = inp.block_tables, [len(t) for t in inp.token_ids]
        return real_execute(self, inp, all_logits, feed)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 1500)
    peak = profile_step(engine.config, engine.loaded, engine.device, engine.kv_dtype, [40, 17, 1])
    vocab = engine.loaded.config.vocab_size
    assert peak == 500 + 3 * vocab * SCRATCH_BYTES_PER_LOGIT
    assert seen["lens"] == [40, 17, 1]
    bs = engine.config.block_size
    assert [len(t) for t in seen["tables"]] == [-(-40 // bs), -(-17 // bs), 1]
    assert sorted(b for t in seen["tables"] for b in t) == list(range(sum(len(t) for t in seen["tables"])))


def test_dispatch_skips_fused_ops_under_another_backend_and_waits_to_be_forced(monkeypatch):
    """A fused implementation (the native decoder_layers) is skipped while another backend is
    forced, so the reference runs the layers op by op on it; an implementation registered with
    ``only_if_forced`` (Triton's interpreter on CPU tensors) is taken there only when forced."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    dispatch.register("fused_demo", "reference", lambda: "reference")
    dispatch.register("fused_demo", "cpu_native", lambda: "fused", fused=True)
    assert dispatch.select("fused_demo")() == "fused"
    with dispatch.forcing("cpu"):
        assert dispatch.select("fused_demo")() == "fused"
    for other in ("triton", "reference"):
        with dispatch.forcing(other):
            assert dispatch.select("fused_demo")() == "reference"
    dispatch.register("interp_demo", "reference", lambda where: "reference")
    dispatch.register("interp_demo", "triton", lambda where: "triton", only_if_forced=lambda where: where == "cpu")
    assert dispatch.select("interp_demo", "cpu")("cpu") == "reference"
    assert dispatch.select("interp_demo", "cuda")("cuda") == "triton"
    with dispatch.forcing("triton"):
        assert dispatch.select("interp_demo", "cpu")("cpu") == "triton"
