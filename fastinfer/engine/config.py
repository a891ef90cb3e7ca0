"""``EngineConfig``: every knob of an engine in one validated dataclass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastinfer.kv_cache.cache import parse_bytes

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Validated engine settings (vLLM's names). Unknown keys raise ``TypeError``; bad values
    raise ``ValueError`` naming the field. Run-time facts (how many blocks fit) live in the
    engine, not here.

    ``dtype="auto"`` is float32 on a CPU (exact and batch-invariant) and bfloat16 on a GPU.
    ``kv_cache_memory`` (bytes or ``"2GiB"``) sizes the cache; when None, a GPU uses
    ``gpu_memory_utilization`` of its memory and a CPU ``min(4 GiB, 25% of available RAM)``.
    ``max_num_batched_tokens`` (tokens per step) defaults to 2048 with chunked prefill (long
    prompts are computed in pieces); without it, to ``max(max_model_len, 2048)``, since a whole
    prompt is then prefilled in one step and the budget must hold ``max_model_len``.
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _need(isinstance(self.model, str) and self.model, f"model must be a non-empty string, got {self.model!r}")
        _need(self.dtype == "auto" or self.dtype in _DTYPES,
              f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
              f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _need(self.quantization is None,
              f"quantization {self.quantization!r} is not supported yet (supported: None)")
        _need(self.kv_cache_dtype == "auto",
              f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported yet (supported: 'auto')")
        _need(_pos_int(self.block_size), f"block_size must be an int >= 1, got {self.block_size!r}")
        _need(_pos_int(self.max_num_seqs), f"max_num_seqs must be an int >= 1, got {self.max_num_seqs!r}")
        for name in ("max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            _need(v is None or _pos_int(v), f"{name} must be an int >= 1 or None, got {v!r}")
        if self.kv_cache_memory is not None:
            _need(parse_bytes(self.kv_cache_memory) > 0,
                  f"kv_cache_memory must be > 0, got {self.kv_cache_memory!r}")
        _need(0 < self.gpu_memory_utilization <= 1,
              f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        _need(not self.enable_prefix_caching,
              "enable_prefix_caching=True is not supported yet (the prefix cache comes with the "
              "KV-cache management work)")

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

    def token_budget(self, max_model_len: int) -> int:
        """Tokens per step: the configured budget (without chunked prefill it must hold one
        whole prompt)."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens or 2048
        budget = self.max_num_batched_tokens or max(max_model_len, 2048)
        _need(budget >= max_model_len,
              f"max_num_batched_tokens ({budget}) must be >= max_model_len ({max_model_len}): "
              "prompts are prefilled in one step")
        return budget


def _pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
