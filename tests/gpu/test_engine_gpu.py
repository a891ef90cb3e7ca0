"""The engine on a GPU against ``transformers`` on the same random-weight Llama folders.

Every test is ``@pytest.mark.gpu`` and skipped without CUDA (``scripts/gpu-check.sh`` runs
them on the GPU machines). The folders are built here, with no download
(:mod:`fastinfer.bench.random_model`): ``tiny`` (head_dim 64, GQA 4, untied) and
``tiny-hd128`` (head_dim 128, tied, llama3 rope scaling), saved in float32.

How greedy tokens are compared. On random weights the logits have near-ties (the top two
tokens of a bfloat16 model differ by less than its rounding noise at a few percent of the
positions), so two correct implementations may part ways there and then generate different
continuations. The arbiter is ``transformers`` in float64 on the same weights, teacher-forced
on the engine's own tokens:

- every token the engine generates must be within ``tol`` of the float64 argmax at its
  position (a wrong kernel picks tokens far below it);
- the engine's tokens must equal ``transformers``' greedy ``generate`` (batch 1, same dtype)
  up to the first difference, and there the two choices must be a near-tie in float64.

``tol`` is measured, not guessed: three times the largest logit error of ``transformers`` in
that dtype against float64 on the reference continuations, plus 1e-4 (float32: about 1e-4,
or more where TF32 matmuls are switched on; bfloat16 about 0.2 for these models).

Prompts have different lengths (one longer than ``max_num_batched_tokens``, so chunked
prefill runs beside decodes) and run as one batch: prefill, decode and batching all count.

``FASTINFER_TEST_GPU_DEVICE=cpu`` runs the tests that do not need CUDA on the CPU (a check of
the tests themselves; the Triton backend is then left out).
"""
from __future__ import annotations

import contextlib
import gc
import os
import random

import pytest
import torch

DEVICE = os.environ.get("FASTINFER_TEST_GPU_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# The random folders are built and checked with transformers: without it, nothing to compare.
pytest.importorskip("transformers")

NEW_TOKENS = 32
PROMPT_LENS = (5, 16, 17, 63, 200, 300)  # 300 > max_num_batched_tokens: chunked prefill beside decodes
ENGINE_OPTIONS = dict(max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=256, kv_cache_memory="256MiB")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def engine(folder: str, dtype: str, **options):
    """An ``LLM`` on the test device (freed, with its KV cache, on exit)."""
    from fastinfer import LLM

    llm = LLM(folder, device=DEVICE, dtype=dtype, **{**ENGINE_OPTIONS, **options})
    try:
        yield llm
    finally:
        del llm
        free_device_memory()


def greedy(llm, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    from fastinfer import SamplingParams

    outs = llm.generate([list(p) for p in prompts],
                        SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    for i, t in enumerate(tokens):
        assert len(t) == new_tokens, f"prompt {i}: the engine generated {len(t)} tokens, expected {new_tokens}"
    return tokens


class Reference:
    """``transformers`` on one folder: greedy ``generate`` per dtype (batch 1, no padding) and
    float64 logits teacher-forced on any continuation."""

    def __init__(self, folder: str, prompts: list[list[int]]) -> None:
        self.folder, self.prompts = folder, prompts
        self._models: dict[torch.dtype, object] = {}
        self._tokens: dict[torch.dtype, list[list[int]]] = {}
        self._tol: dict[torch.dtype, float] = {}

    def model(self, dtype: torch.dtype):
        if dtype not in self._models:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).to(DEVICE).eval()
            m.generation_config.eos_token_id = None  # exactly max_new_tokens, as ignore_eos
            m.generation_config.pad_token_id = 0
            self._models[dtype] = m
        return self._models[dtype]

    @torch.inference_mode()
    def tokens(self, dtype: torch.dtype) -> list[list[int]]:
        """``generate``'s greedy tokens in ``dtype`` for every prompt."""
        if dtype not in self._tokens:
            m, out = self.model(dtype), []
            for p in self.prompts:
                ids = torch.tensor([p], device=DEVICE)
                gen = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0)
                new = gen[0, len(p):].tolist()
                assert len(new) == NEW_TOKENS, f"transformers generated {len(new)} tokens, expected {NEW_TOKENS}"
                out.append(new)
            self._tokens[dtype] = out
        return self._tokens[dtype]

    @torch.inference_mode()
    def logits(self, prompt: list[int], continuation: list[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[len(continuation), vocab]`` float64 logits that predict each continuation token."""
        ids = torch.tensor([list(prompt) + list(continuation)], device=DEVICE)
        out = self.model(dtype)(ids).logits[0].double()
        return out[len(prompt) - 1:len(prompt) - 1 + len(continuation)]

    def tol(self, dtype: torch.dtype) -> float:
        """Three times ``transformers``' largest logit error in ``dtype`` against float64 on the
        float64 greedy continuations, plus 1e-4."""
        if dtype not in self._tol:
            worst = 0.0
            for p, cont in zip(self.prompts, self.tokens(torch.float64)):
                err = (self.logits(p, cont, dtype) - self.logits(p, cont)).abs().max().item()
                worst = max(worst, err)
            self._tol[dtype] = 3 * worst + 1e-4
        return self._tol[dtype]

    def check(self, name: str, got: list[list[int]], dtype: torch.dtype, against: list[list[int]] | None = None,
              against_name: str = "transformers") -> dict:
        """Asserts the comparison rule of the module docstring for ``got`` (the engine's tokens in
        ``dtype``) against ``against`` (default: ``generate`` in ``dtype``). Returns counts."""
        tol = self.tol(dtype)
        against = self.tokens(dtype) if against is None else against
        matched, problems = 0, []
        for i, (p, g, h) in enumerate(zip(self.prompts, got, against)):
            assert len(g) == len(h) == NEW_TOKENS
            lg = self.logits(p, g)
            gaps = lg.max(-1).values - lg.gather(-1, torch.tensor(g, device=lg.device)[:, None])[:, 0]
            far = (gaps > tol).nonzero()
            if far.numel():
                t = int(far[0, 0])
                problems.append(f"prompt {i} (len {len(p)}): token {t} ({g[t]}) is {gaps[t].item():.4g} below the "
                                f"float64 argmax ({int(lg[t].argmax())}), tolerance {tol:.3g}; {name} {g[:t + 1]} vs "
                                f"{against_name} {h[:t + 1]}")
                continue
            j = next((k for k in range(NEW_TOKENS) if g[k] != h[k]), None)
            if j is None:
                matched += NEW_TOKENS
                continue
            matched += j
            tie = abs(lg[j, g[j]].item() - lg[j, h[j]].item())
            if tie > tol:
                problems.append(f"prompt {i} (len {len(p)}): {name} and {against_name} differ at token {j} "
                                f"({g[j]} vs {h[j]}) where float64 logits differ by {tie:.4g} (no near-tie; tolerance "
                                f"{tol:.3g}); {name} {g[:j + 1]} vs {against_name} {h[:j + 1]}")
        assert not problems, f"{name} in {dtype}:\n" + "\n".join(problems)
        return {"matched_tokens": matched, "total_tokens": NEW_TOKENS * len(got), "tol": tol}


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # BOS first, as a tokenizer would; the rest random ordinary ids
    return [[0] + [rng.randrange(2, vocab) for _ in range(n - 1)] for n in PROMPT_LENS]


_REFS: dict[str, Reference] = {}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("random_llama")


def reference(shape: str, root) -> Reference:
    if shape not in _REFS:
        from fastinfer.bench.random_model import TOKENIZER_VOCAB, save_random_llama

        folder = save_random_llama(root / shape, shape, torch.float32, seed=0, device=DEVICE)
        _REFS[shape] = Reference(folder, make_prompts(TOKENIZER_VOCAB))
    return _REFS[shape]


@pytest.fixture(scope="module", autouse=True)
def _free_references():
    yield
    _REFS.clear()
    free_device_memory()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_cuda_graphs_give_the_eager_tokens(dtype, model_root):
    """5 prompts (a decode batch padded to a captured size of 8), 32 new tokens, with and
    without CUDA graphs: the same tokens, or a parting at a float64 near-tie."""
    ref = reference("tiny", model_root)
    prompts = ref.prompts[:5]
    sub = Reference(ref.folder, prompts)
    sub._models = ref._models  # share the loaded transformers models
    with engine(ref.folder, dtype, enforce_eager=True) as llm:
        eager = greedy(llm, prompts)
    with engine(ref.folder, dtype, enforce_eager=False) as llm:
        captured = getattr(getattr(llm.engine, "runner", None), "graphs", "not exposed")
        assert captured is not None, "enforce_eager=False captured no CUDA graphs: this would compare eager to eager"
        graphs = greedy(llm, prompts)
        graphs_again = greedy(llm, prompts)  # the captured graphs replayed for a second batch
    sub.check("fastinfer with CUDA graphs", graphs, DTYPES[dtype], against=eager, against_name="eager")
    sub.check("fastinfer with CUDA graphs (second run)", graphs_again, DTYPES[dtype], against=graphs,
              against_name="first run")


@pytest.mark.skipif(not ON_GPU, reason="overlapping the host with a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_async_scheduling_gives_the_synchronous_tokens(dtype, model_root):
    """The 6 prompts (chunked prefill beside decodes), 32 new tokens, CUDA graphs on: with
    async scheduling each step reads the previous step's tokens on the device, before the host
    has seen them; the tokens equal the synchronous run's, or part at a float64 near-tie."""
    ref = reference("tiny", model_root)
    with engine(ref.folder, dtype) as llm:
        sync = greedy(llm, ref.prompts)
    with engine(ref.folder, dtype, async_scheduling=True) as llm:
        assert llm.engine.runner.graphs is not None
        overlapped = greedy(llm, ref.prompts)
        overlapped_again = greedy(llm, ref.prompts)
    ref.check("fastinfer with async scheduling", overlapped, DTYPES[dtype], against=sync, against_name="sync")
    ref.check("fastinfer with async scheduling (second run)", overlapped_again, DTYPES[dtype],
              against=overlapped, against_name="first run")


@pytest.mark.skipif(not ON_GPU, reason="GPU memory budgeting")
def test_memory_budget_holds_a_full_batch(tmp_path):
    """KV blocks after start-up, and the peak of a full batch (chunked prefill at the token
    budget, then a decode batch of max_num_seqs) stays under gpu_memory_utilization. A
    two-layer model of the 1B shape: the real vocabulary and widths (logits, MLP activations)
    at a fraction of the weights."""
    from fastinfer import LLM, SamplingParams
    from fastinfer.bench.random_model import TOKENIZER_VOCAB, save_random_llama

    free_device_memory()
    folder = save_random_llama(tmp_path / "llama-1b-2l", "llama-3.2-1b", torch.bfloat16, seed=0,
                               num_hidden_layers=2)
    free_device_memory()
    util, seqs = 0.5, 64
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=util, max_num_seqs=seqs,
              max_model_len=2048, max_num_batched_tokens=4096)
    try:
        stats = llm.stats()
        assert stats["kv_blocks_total"] > 0, stats
        # the cache gets most of what the budget leaves after the weights
        assert stats["kv_cache_bytes"] >= 0.25 * util * total, (stats, total)
        rng = random.Random(0)
        prompts = [[0] + [rng.randrange(2, TOKENIZER_VOCAB) for _ in range(999)] for _ in range(seqs)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        assert peak <= util * total, (f"peak allocated {peak / 2**30:.2f} GiB > gpu_memory_utilization {util} x "
                                      f"{total / 2**30:.1f} GiB", stats)
    finally:
        del llm
        free_device_memory()


def _cases():
    cases = [("tiny", d) for d in DTYPES] + [("tiny-hd128", "bfloat16"), ("tiny-hd128", "float32")]
    if not ON_GPU:
        cases = [c for c in cases if c[1] != "float16"]  # no float16 path on the CPU
    return cases


@pytest.mark.parametrize(("shape", "dtype"), _cases())
def test_greedy_matches_transformers(shape, dtype, model_root):
    ref = reference(shape, model_root)
    with engine(ref.folder, dtype) as llm:
        got = greedy(llm, ref.prompts)
    counts = ref.check(f"fastinfer ({shape})", got, DTYPES[dtype])
    if dtype == "float32" and counts["tol"] < 1e-3:  # true float32 matmuls (no TF32): near-ties are rare, so
        # at most one prompt's continuation may part from transformers'
        assert counts["matched_tokens"] >= counts["total_tokens"] - NEW_TOKENS, counts


def _backends():
    return ["triton", "reference"] if ON_GPU else ["reference"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_forced_backend_matches_transformers(backend, dtype, model_root):
    ref = reference("tiny", model_root)
    with engine(ref.folder, dtype, ops_backend=backend) as llm:
        got = greedy(llm, ref.prompts)
    ref.check(f"fastinfer ops_backend={backend}", got, DTYPES[dtype])
