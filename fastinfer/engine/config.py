"""``EngineConfig``: every knob of an engine in one validated dataclass."""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastinfer.common.kv_format import KV_ALIASES, KV_CACHE_DTYPES, code_dtype
from fastinfer.distributed.group import ALL_REDUCES
from fastinfer.engine.memory import check_within, total_memory
from fastinfer.errors import ArgumentTypeError, ConfigError
from fastinfer.ops.backends import cuda_native
from fastinfer.ops.dispatch import BACKENDS, requested_backend
from fastinfer.quant.rtn import check_group_size
from fastinfer.scheduler.scheduler import PREEMPTION_MODES
from fastinfer.spec_decode.config import SpeculativeConfig
from fastinfer.validation import (check_bool, check_choice, check_float, check_int, check_seed,
                                  check_str, parse_bytes, parse_device)

QUANTIZATIONS = (None, "none", "int8", "int4", "fp8", "gguf")
QUANT_METHODS = ("rtn", "awq")
AWQ_SCHEMES = ("int4", "int8")
QUANT_FIELDS = ("quantization", "quant_group_size", "quant_method", "kv_cache_dtype")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Validated engine settings (vLLM's names). Unknown keys raise ``TypeError``; a bad value
    raises ``InvalidArgumentError`` (a ``ValueError``) naming the field, a wrong type
    ``ArgumentTypeError`` (also a ``TypeError``), a setting this machine cannot meet (an absent
    GPU, more KV-cache memory than there is) ``ConfigError``. Everything is checked before
    anything is loaded. Run-time facts (how many blocks fit) live in the engine, not here.

    ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a GPU that is not there is
    refused. ``dtype="auto"`` is float32 on a CPU (exact and batch-invariant) and bfloat16 on a
    GPU. ``kv_cache_memory`` (bytes, or a size such as ``"2GiB"``, ``"512MB"``, ``"2G"``; stored
    as bytes) sizes the cache and may not exceed the device's memory; when None, a GPU uses
    ``gpu_memory_utilization`` of its memory and a CPU ``min(4 GiB, 25% of available RAM)``.
    ``quantization``: None keeps a quantized GGUF file's blocks (computing on them) and a float
    model in float; ``"none"`` dequantizes a GGUF file (the exact path checked against
    ``transformers``); ``"int8"`` (symmetric per output channel), ``"int4"`` (groups of
    ``quant_group_size`` inputs with a scale and an offset: 32, 64, 128 or ``"auto"``, the
    largest that divides each layer's input dimension) and ``"fp8"`` (e4m3, per channel)
    quantize at load; ``"gguf"`` keeps a GGUF file's blocks and refuses a float model.
    ``quant_method``: ``"rtn"`` rounds to nearest; ``"awq"`` (int4 and int8) first searches
    activation-aware per-channel scales and int4 clipping ranges on a calibration text
    (CPython's ``pydoc_data``; about a minute on two CPU cores, so save the result with
    ``fastinfer quantize``).
    ``kv_cache_dtype``: ``"auto"`` stores keys and values in the model's dtype; ``"int8"`` and
    ``"fp8"`` (alias ``"fp8_e4m3"``) store codes with a float32 scale per token and kv head
    (``fastinfer.common.kv_format``), about half a bfloat16 cache.
    ``ops_backend``: None (or ``"auto"``) lets ``fastinfer.ops`` pick the fastest kernel for each
    call (``FASTINFER_OPS_BACKEND`` may force one); ``"reference"``, ``"triton"``, ``"cpu"`` or
    ``"cuda"`` forces that backend wherever it has a kernel that applies (the reference covers
    the rest), for this engine's steps.
    ``enforce_eager``: on a GPU, decode steps are replayed from CUDA graphs captured at start-up
    for batch sizes 1, 2, 4, 8, then every 8 up to ``max_num_seqs`` (a batch is padded to the
    next captured size); True runs every step eagerly.
    ``async_scheduling``: the host schedules and launches step N+1 before it reads step N's
    tokens (its sampled ids feed N+1 on the device), then detokenizes and checks stop conditions
    for step N while the device runs N+1, so a GPU does not sit idle during the host's work.
    Outputs come one step later; a sequence that stopped at step N (a stop token, string or EOS)
    computes one more token, which is dropped. Steps that sample with penalties or logprobs, or draw random tokens, run
    synchronously. The tokens are the same as without it.
    ``enable_prefix_caching`` (on by default): a request reuses the KV-cache blocks of the
    longest prefix it shares with earlier requests (full blocks, found by a hash chained over
    their token ids) and computes only the rest; unused cached blocks are evicted LRU-first
    when memory runs short. Outputs are the same with it off.
    ``kv_offload_memory`` (bytes or a size string; None: off) is a host-memory tier: cached
    blocks evicted from the device go there and are loaded back on a later hit instead of
    being recomputed, and preempted requests can be swapped there.
    ``preemption_mode``: ``"recompute"`` frees a preempted request's blocks (computed again
    later, from its cached prefix); ``"swap"`` (needs ``kv_offload_memory``) moves them to the
    host tier and back, so the request resumes where it stopped (evicting the tier's cached
    prefixes for room); ``"auto"`` swaps when the tier has blocks holding nothing, and
    recomputes otherwise, keeping the cached prefixes (so, without a tier, always).
    ``max_num_batched_tokens`` (tokens per step) defaults to 2048 with chunked prefill (long
    prompts are computed in pieces); without it, to ``max(max_model_len, 2048)``, since a whole
    prompt is then prefilled in one step and the budget must hold ``max_model_len``.
    ``tensor_parallel_size``: N > 1 splits the model over N processes (this one and N - 1 it
    spawns), Megatron-style, their collectives over gloo: each holds its share of the weights and
    of the KV cache. On GPUs, rank r runs on the configured GPU's index + r over NCCL (every rank
    captures its CUDA graphs in lockstep), with ``kv_cache_memory`` given; no host tier yet. Call
    ``Engine.shutdown()`` (or ``LLM.shutdown()``) to stop the workers (also done at exit).
    ``tp_all_reduce``: ``"gloo"``, or ``"shm"`` for DeepSpeed's shared-memory all-reduce (faster,
    but its waits have no timeout: see ``fastinfer.distributed.shm``).
    ``speculative_config`` (vLLM's keys, a dict or a ``SpeculativeConfig``): speculative
    decoding. ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    "prompt_lookup_max": b}`` drafts up to k tokens from the request's own prompt and output,
    and one forward pass verifies them: greedy outputs are those of plain decoding, and sampled
    ones keep the target's distribution exactly (rejection sampling). Steps with drafts run
    synchronously (under ``async_scheduling`` too), and eagerly (outside CUDA graphs). It backs
    off by itself (see ``fastinfer.spec_decode``).
    ``grammar_compile_timeout`` (seconds): a request whose structured output (JSON schema,
    regex, grammar) takes longer to compile is refused with ``GrammarCompileTimeout`` (an
    ``InvalidRequestError``); compiles run off the engine's thread, so no other request waits.
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    quant_group_size: int | str = 32
    quant_method: str = "rtn"
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    async_scheduling: bool = False
    ops_backend: str | None = None
    kv_offload_memory: int | str | None = None
    preemption_mode: str = "auto"
    grammar_compile_timeout: float = 5.0
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None
    tensor_parallel_size: int = 1
    tp_all_reduce: str = "gloo"
    seed: int = 0

    def __post_init__(self) -> None:
        model = os.fspath(self.model) if isinstance(self.model, os.PathLike) else self.model
        self._set("model", check_str("model", model))
        self._set("dtype", check_choice("dtype", self.dtype, ["auto", *_DTYPES]))
        if self.device != "auto":
            parse_device("device", self.device)
            self._set("device", str(self.device))
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        self._set("quant_group_size", check_group_size(self.quant_group_size))
        check_choice("quant_method", self.quant_method, QUANT_METHODS)
        if self.quant_method == "awq" and self.quantization not in AWQ_SCHEMES:
            raise ConfigError(f"quant_method='awq' calibrates weights quantized at load: it needs quantization in "
                              f"{list(AWQ_SCHEMES)}, got {self.quantization!r}", "quant_method")
        if self.quantization == "fp8":
            _check_fp8(self.torch_device())
        kv_dtype = KV_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype) if isinstance(self.kv_cache_dtype, str) \
            else self.kv_cache_dtype
        self._set("kv_cache_dtype", check_choice("kv_cache_dtype", kv_dtype, list(KV_CACHE_DTYPES)))
        for name in ("block_size", "max_num_seqs"):
            self._set(name, check_int(name, getattr(self, name), lo=1))
        for name in ("max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                self._set(name, check_int(name, getattr(self, name), lo=1))
        if self.kv_cache_memory is not None:
            nbytes = parse_bytes("kv_cache_memory", self.kv_cache_memory)
            device = self.torch_device()
            check_within(nbytes, total_memory(device), device, "all the memory there is")
            self._set("kv_cache_memory", nbytes)
        self._set("gpu_memory_utilization",
                  check_float("gpu_memory_utilization", self.gpu_memory_utilization, lo=0, hi=1, lo_open=True))
        self._set("ops_backend", check_choice("ops_backend", None if self.ops_backend in (None, "auto")
                                              else self.ops_backend, [None, *BACKENDS]))
        _check_backend(self.ops_backend, self.torch_device())
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager",
                     "async_scheduling"):
            self._set(name, check_bool(name, getattr(self, name)))
        self._set("seed", check_seed("seed", self.seed))
        self._set("grammar_compile_timeout", check_float("grammar_compile_timeout", self.grammar_compile_timeout,
                                                         lo=0, lo_open=True))
        if self.speculative_config is not None:
            self._set("speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
            check_choice("speculative_config.quantization", self.speculative_config.quantization, QUANTIZATIONS)
            if self.speculative_config.method == "draft_model" and self.tensor_parallel_size != 1:
                raise ConfigError("speculative_config method 'draft_model' does not run under tensor parallelism "
                                  "yet; use 'ngram', or tensor_parallel_size=1", "speculative_config")
        self._set("tensor_parallel_size", check_int("tensor_parallel_size", self.tensor_parallel_size, lo=1))
        check_choice("tp_all_reduce", self.tp_all_reduce, list(ALL_REDUCES))
        if self.tensor_parallel_size > 1:
            _check_tensor_parallel(self)
        if self.kv_offload_memory is not None:
            nbytes = parse_bytes("kv_offload_memory", self.kv_offload_memory)
            check_within(nbytes, total_memory(torch.device("cpu")), torch.device("cpu"), "all the memory there is",
                         "kv_offload_memory")
            self._set("kv_offload_memory", nbytes)
        check_choice("preemption_mode", self.preemption_mode, list(PREEMPTION_MODES))
        if self.preemption_mode == "swap" and not self.kv_offload_memory:
            raise ConfigError("preemption_mode='swap' moves preempted requests to the host tier: set "
                              "kv_offload_memory (bytes or a size such as '4GiB')", "preemption_mode")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalised at construction (frozen afterwards)

    @classmethod
    def from_options(cls, model: Any = "smollm2-135m", **options: Any) -> EngineConfig:
        """``EngineConfig(model=model, **options)``, where an unknown option raises
        ``ArgumentTypeError`` (a ``TypeError``) naming it, the closest known one and them all."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ArgumentTypeError(f"unknown engine option {key!r}{hint}; the options are: "
                                         f"{', '.join(known)}", key)
        return cls(model=model, **options)

    def torch_device(self) -> torch.device:
        """The device to run on (``auto``: CUDA when available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The weight/activation dtype (``auto``: float32 on CPU, bfloat16 on GPU)."""
        if self.dtype == "auto":
            return torch.float32 if self.torch_device().type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    def kv_torch_dtype(self) -> torch.dtype:
        """The KV cache tensors' element type: the model's dtype, or int8 / fp8 codes."""
        return code_dtype(self.kv_cache_dtype, self.torch_dtype())

    def token_budget(self, max_model_len: int) -> int:
        """Tokens per step: the configured budget (without chunked prefill it must hold one
        whole prompt)."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens or 2048
        budget = self.max_num_batched_tokens or max(max_model_len, 2048)
        if budget < max_model_len:
            raise ConfigError(f"max_num_batched_tokens ({budget}) must be >= max_model_len ({max_model_len}): "
                              "prompts are prefilled in one step", "max_num_batched_tokens")
        return budget


def _check_tensor_parallel(config: EngineConfig) -> None:
    """What tensor parallelism does not do yet, refused by name; on GPUs (NCCL), enough of them."""
    device, n = config.torch_device(), config.tensor_parallel_size
    refused = [(bool(config.kv_offload_memory), "no kv_offload_memory (the host tier)"),
               (device.type not in ("cpu", "cuda"), "device='cpu' or 'cuda'"),
               (device.type == "cuda" and config.kv_cache_memory is None,
                "kv_cache_memory on GPUs (the profile that sizes the cache runs one rank only)"),
               (device.type == "cuda" and config.tp_all_reduce != "gloo", "tp_all_reduce='gloo' on GPUs (NCCL)")]
    for bad, needs in refused:
        if bad:
            raise ConfigError(f"tensor_parallel_size={n} needs {needs}", "tensor_parallel_size")
    if device.type == "cuda" and (device.index or 0) + n > torch.cuda.device_count():
        raise ConfigError(f"tensor_parallel_size={n} from {device} needs GPUs {device.index or 0} to "
                          f"{(device.index or 0) + n - 1}; this machine has {torch.cuda.device_count()}",
                          "tensor_parallel_size")


def _check_backend(ops_backend: str | None, device: torch.device) -> None:
    """A forced backend (the field, else ``FASTINFER_OPS_BACKEND``) that can run on ``device``."""
    try:
        name, where = requested_backend(ops_backend)
    except ValueError as exc:
        raise ConfigError(str(exc), "ops_backend") from exc
    if name == "cuda" and device.type != "cuda":
        raise ConfigError(f"{where}='cuda' needs device='cuda' (the device is {device})", "ops_backend")
    if name == "cuda" and not cuda_native.built():
        raise ConfigError(f"{where}='cuda' needs the CUDA extension fastinfer._C_cuda, which is not built here "
                          "(it builds where nvcc and a CUDA build of torch are found; FASTINFER_BUILD_CUDA=1 forces it)",
                          "ops_backend")
    if name == "cpu" and device.type != "cpu":
        raise ConfigError(f"{where}='cpu' runs the native CPU kernels: it needs device='cpu' (the device is "
                          f"{device})", "ops_backend")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{where}='triton' on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter, for "
                          "testing: far slower than the other backends)", "ops_backend")


def _check_fp8(device: torch.device) -> None:
    """fp8 weights run on the CPU (decoded in registers) and on GPUs with fp8 support
    (compute capability 8.9 and up); elsewhere a ConfigError says so."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return
        raise ConfigError(f"quantization='fp8' needs a GPU with fp8 support (compute capability 8.9 or "
                          f"newer); {torch.cuda.get_device_name(device)} has {major}.{minor}. Use 'int8' "
                          "or 'int4'", "quantization")
    raise ConfigError(f"quantization='fp8' is not supported on {device.type}", "quantization")
