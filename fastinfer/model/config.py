"""``ModelConfig``: the architecture facts of a decoder-only model, from a Hugging Face
``config.json`` or from GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastinfer.errors import InvalidArgumentError, ModelLoadError
from fastinfer.validation import check_float, check_int

# Hugging Face architectures served by the Llama family code (Qwen2 adds the QKV bias).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                         "num_kv_heads", "head_dim", "max_position_embeddings"):
                check_int(name, getattr(self, name), lo=1)
            check_float("rms_norm_eps", self.rms_norm_eps, lo=0, lo_open=True)
            check_float("rope_theta", self.rope_theta, lo=0, lo_open=True)
        except InvalidArgumentError as exc:
            raise ModelLoadError(f"invalid model config: {exc}") from exc
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From the dict of a Hugging Face ``config.json``."""
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise ModelLoadError(
                f"unsupported architecture {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        max_len = cfg.get("max_position_embeddings", 4096)
        window = _sliding_window(family, cfg)
        if window:  # attention is full within the window: serve up to the window, exactly
            max_len = min(max_len, window)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=max_len,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=_rope_scaling(cfg),
            eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict that :meth:`from_hf` reads back to this config."""
        arch = next(a for a, fam in SUPPORTED_ARCHITECTURES.items() if fam == self.family)
        return {
            "architectures": [arch], "model_type": self.family, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "rope_scaling": self.rope_scaling, "eos_token_id": list(self.eos_token_ids),
        }

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_weight: bool,
                  rope_freq_factors: list[float] | None = None) -> ModelConfig:
        """From GGUF metadata (``general.architecture`` must be ``llama``); a missing or bad
        key raises ModelLoadError. ``rope_freq_factors`` come from a ``rope_freqs`` tensor
        (Llama 3.1+ files store their rope scaling that way)."""
        try:
            return cls._from_gguf(meta, has_output_weight, rope_freq_factors)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"GGUF metadata is incomplete or invalid: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_gguf(cls, meta: dict[str, Any], has_output_weight: bool,
                   rope_freq_factors: list[float] | None) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: 'llama')")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"llama.{key}", default)
            if value is None:
                raise KeyError(f"llama.{key}")
            return value

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            family="llama",
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=False,
            rope_scaling={"rope_type": "freq_factors", "factors": list(rope_freq_factors)}
            if rope_freq_factors is not None else None,
            eos_token_ids=(int(eos),) if eos is not None else (),
        )


def _sliding_window(family: str, cfg: dict[str, Any]) -> int | None:
    """The attention window of Mistral (always) and Qwen2 (when ``use_sliding_window``)."""
    window = cfg.get("sliding_window")
    if family == "mistral" or (family == "qwen2" and cfg.get("use_sliding_window")):
        return int(window) if window else None
    return None


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default") else dict(scaling)
