"""The fused native decoder (``ops.decoder_layers``, one C++ call for every layer) against the
reference layer loop over the per-op kernels: bit-identical logits in every weight kind, model
dtype and KV-cache format, for prefill, chunked prefill and decode steps of a mixed batch."""
from __future__ import annotations

import pytest
import torch

from fastinfer import ops
from fastinfer.ops import dispatch
from fastinfer.ops.backends import cpu_native
from fastinfer.model.loader import load_model
from fastinfer.model.runner import StepInput

from ..conftest import CPU, make_engine, save_tiny_model

pytestmark = pytest.mark.skipif(cpu_native._decoder_op() is None, reason="fastinfer._C_cpu not built")

MODES = [  # dtype, quantization, kv_cache_dtype
    (torch.float32, "none", "auto"),
    (torch.bfloat16, "none", "auto"),
    (torch.float32, "int8", "auto"),
    (torch.bfloat16, "int8", "auto"),  # a packed table's float32 rows cast to the model's bfloat16
    (torch.float32, "int4", "auto"),
    (torch.float32, "fp8", "auto"),
    (torch.float32, "none", "int8"),
    (torch.bfloat16, "none", "fp8"),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_folder(request, tmp_path_factory, hf_smollm_tokenizer):
    """llama: GQA, untied head; qwen2: QKV biases, tied embeddings."""
    return save_tiny_model(tmp_path_factory.mktemp("fused") / request.param, request.param, hf_smollm_tokenizer)


def _steps(engine) -> list[torch.Tensor]:
    """Logits of a prefill of two prompts, a chunked continuation of one of them beside a
    decode of the other, and two decode steps; fresh blocks per sequence."""
    runner, bs = engine.runner, engine.config.block_size
    a, b = list(range(5, 5 + 21)), list(range(40, 47))
    tables = [[1, 2, 3], [4, 5, 6]]
    steps = [
        StepInput([a[:13], b], [0, 0], tables),
        StepInput([a[13:], [9]], [13, len(b)], tables),
        StepInput([[11], [12]], [len(a), len(b) + 1], tables),
        StepInput([[13], [14]], [len(a) + 1, len(b) + 2], tables),
    ]
    assert len(a) + 2 <= 3 * bs
    return [runner.execute(s) for s in steps]


def _counted_native(monkeypatch, op: str, calls: list) -> None:
    """Puts a counting wrapper around ``op``'s native implementation."""
    native = next(i for i in ops.implementations(op) if i.backend == "cpu_native")

    def counting(*args):
        calls.append(op)
        return native.fn(*args)

    monkeypatch.setitem(dispatch._REGISTRY, op, [dispatch.Impl("cpu_native", native.applies, counting, fused=True)]
                        + [i for i in dispatch._REGISTRY[op] if i.backend != "cpu_native"])


def _reference_only(monkeypatch, op: str) -> None:
    monkeypatch.setitem(dispatch._REGISTRY, op, [i for i in dispatch._REGISTRY[op] if i.backend == "reference"])


@pytest.mark.parametrize("dtype,quantization,kv_dtype", MODES,
                         ids=[f"{str(d)[6:]}-{q}-kv_{k}" for d, q, k in MODES])
def test_fused_decoder_matches_layer_loop(tiny_folder, dtype, quantization, kv_dtype, monkeypatch):
    """Three ways to the same bits: the whole model in one native call (embedding, layers, final
    norm: ops.decoder_model), the layers alone in one (ops.decoder_layers), and the layer loop."""
    loaded = load_model(tiny_folder, dtype, CPU, quantization)
    calls: list[str] = []
    _counted_native(monkeypatch, "decoder_model", calls)
    _counted_native(monkeypatch, "decoder_layers", calls)
    whole = _steps(make_engine(loaded, kv_cache_dtype=kv_dtype, kv_cache_memory="8MiB", max_model_len=256))
    assert calls == ["decoder_model"] * 4, "the whole model did not run in one native call"
    _reference_only(monkeypatch, "decoder_model")
    calls.clear()
    fused = _steps(make_engine(loaded, kv_cache_dtype=kv_dtype, kv_cache_memory="8MiB", max_model_len=256))
    assert calls == ["decoder_layers"] * 4, "the fused native decoder did not run"
    _reference_only(monkeypatch, "decoder_layers")
    calls.clear()
    looped = _steps(make_engine(loaded, kv_cache_dtype=kv_dtype, kv_cache_memory="8MiB", max_model_len=256))
    assert calls == []
    for step, (w, f, r) in enumerate(zip(whole, fused, looped)):
        assert torch.equal(f, r), f"step {step}: max diff {(f.float() - r.float()).abs().max().item()}"
        assert torch.equal(w, r), f"step {step}: max diff {(w.float() - r.float()).abs().max().item()}"


def test_plan_follows_replaced_weights(tiny_folder):
    """Replacing a weight (as quantization at load and AWQ do) rebuilds the plan; moving the
    model drops it."""
    model = load_model(tiny_folder, torch.float32, CPU, "none").model
    plan = model.decoder_plan()
    assert plan is not None and plan.kinds == [-1] * 4 * len(model.layers)
    assert model.decoder_plan() is plan  # cached
    lin = model.layers[1].mlp.down_proj
    new = torch.nn.Parameter(lin.weight.detach().clone() * 2, requires_grad=False)
    lin.weight = new
    rebuilt = model.decoder_plan()
    assert rebuilt is not plan and rebuilt.weights[4 * 1 + 3] is new
    model.to(CPU)
    moved = model.decoder_plan()
    assert moved is not rebuilt and moved.weights[4 * 1 + 3] is model.layers[1].mlp.down_proj.weight


def test_plan_follows_the_embedding_and_final_norm(tiny_folder):
    """The whole-model call holds the token table and the final norm's weight: replacing or
    casting them, or putting another norm module in place, rebuilds the plan; a module of another
    class, or another eps, keeps them out of the native call (the layers stay fused)."""
    model = load_model(tiny_folder, torch.float32, CPU, "none").model
    plan = model.decoder_plan()
    assert plan.final_norm is model.norm.weight and plan.embed is model.embed_tokens.weight
    new = torch.nn.Parameter(model.norm.weight.detach() * 2, requires_grad=False)
    model.norm.weight = new
    assert model.decoder_plan().final_norm is new
    model.embed_tokens.to(torch.bfloat16)  # rows still come out float32 (Embedding.dtype)
    assert model.decoder_plan() is not None and model.decoder_plan().embed is None
    model.embed_tokens.to(torch.float32)
    assert model.decoder_plan().embed is model.embed_tokens.weight
    norm = model.norm
    model.norm = type(norm)(norm.weight.shape[0], norm.eps * 10)
    assert model.decoder_plan().final_norm is None and model.decoder_plan().weights
    model.norm = norm
    assert model.decoder_plan().final_norm is norm.weight

    class Scaled(type(norm)):
        def forward(self, x, residual=None):
            return super().forward(x * 2, residual)

    model.norm = Scaled(norm.weight.shape[0], norm.eps)
    assert model.decoder_plan().final_norm is None


def test_plan_refuses_what_the_kernels_do_not_take(tiny_folder):
    model = load_model(tiny_folder, torch.float32, CPU, "none").model
    base = model.decoder_plan()
    args = (base.dtype, base.num_heads, base.num_kv_heads, base.head_dim, base.eps, base.attn_scale, base.cos_sin)
    linears = list(zip(base.weights, base.biases))
    assert ops.decoder_plan(*args, base.norms, linears) is not None
    strided = [(w.t().contiguous().t(), b) if i == 0 else (w, b) for i, (w, b) in enumerate(linears)]
    assert ops.decoder_plan(*args, base.norms, strided) is None  # a non-contiguous dense weight
    assert ops.decoder_plan(torch.float16, *args[1:], base.norms, linears) is None
    odd_head = (base.dtype, base.num_heads, base.num_kv_heads, 24, base.eps, base.attn_scale, base.cos_sin)
    assert ops.decoder_plan(*odd_head, base.norms, linears) is None


def test_fused_layers_off_runs_module_by_module(tiny_folder):
    """Forward hooks on the layers' modules (AWQ's calibration taps) need the module loop."""
    model = load_model(tiny_folder, torch.float32, CPU, "none").model
    assert model.decoder_plan() is not None
    model.fused_layers = False
    assert model.decoder_plan() is None


def test_forward_hooks_still_fire(tiny_folder):
    """A hook on any layer module turns the fused path off for as long as it is registered."""
    loaded = load_model(tiny_folder, torch.float32, CPU, "none")
    engine = make_engine(loaded, kv_cache_memory="8MiB", max_model_len=256)
    plain = _steps(engine)
    seen = []
    handle = loaded.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        assert loaded.model.decoder_plan() is None
        hooked = _steps(make_engine(loaded, kv_cache_memory="8MiB", max_model_len=256))
    finally:
        handle.remove()
    assert seen == [13 + 7, 8 + 1, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    assert loaded.model.decoder_plan() is not None


def test_plan_follows_replaced_packed_buffers(tiny_folder):
    model = load_model(tiny_folder, torch.float32, CPU, "int8").model
    plan = model.decoder_plan()
    packed = model.layers[0].self_attn.o_proj.weight
    packed.scales = packed.scales * 2
    rebuilt = model.decoder_plan()
    assert rebuilt is not plan and rebuilt.scales[1] is packed.scales
    model.layers[0].to(CPU)  # a submodule moved: its tensors may be new ones
    assert model.decoder_plan() is not rebuilt


def test_fused_decoder_on_gguf_blocks(smollm_path, monkeypatch):
    """The default model computing on its Q4_1 / Q8_0 blocks, both input modes."""
    from fastinfer.quant.policy import set_input_quantization
    loaded = load_model(smollm_path, torch.float32, CPU, "gguf")
    for quantize_inputs in (True, False):
        set_input_quantization(loaded.model, quantize_inputs)
        fused = _steps(make_engine(loaded, kv_cache_memory="16MiB", max_model_len=256))
        loaded.model.fused_layers = False
        looped = _steps(make_engine(loaded, kv_cache_memory="16MiB", max_model_len=256))
        loaded.model.fused_layers = True
        for step, (f, r) in enumerate(zip(fused, looped)):
            assert torch.equal(f, r), f"quantize_inputs={quantize_inputs}, step {step}"
