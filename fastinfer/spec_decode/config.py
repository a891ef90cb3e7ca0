"""``speculative_config`` under vLLM's names: ``{"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": a, "prompt_lookup_max": b}`` or ``{"method": "draft_model", "model": ...,
"num_speculative_tokens": k}`` (``"quantization": "int4"`` without a model: the target's own
int4 copy drafts for it).

Backoff (see ``fastinfer.spec_decode.speculator``): a step drafts only when the learned costs
say it pays; ``disable_by_batch_size`` (vLLM's name), if set, also turns drafting off in a step
where more sequences run than this (None, the default: by the costs alone);
``min_acceptance_rate``: a sequence whose drafts are accepted less often than this (a moving
average) stops drafting for a while, longer each time, and tries again."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fastinfer.errors import ConfigError

METHODS = ("ngram", "draft_model")
DRAFT_MODEL_TOKENS = 3  # a draft model's num_speculative_tokens when none is given


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int | None = None
    model: str | None = None
    quantization: str | None = None
    disable_by_batch_size: int | None = None
    min_acceptance_rate: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative_config method must be one of {', '.join(METHODS)}, got "
                              f"{self.method!r}", "speculative_config.method")
        _positive("num_speculative_tokens", self.num_speculative_tokens)
        _positive("prompt_lookup_min", self.prompt_lookup_min)
        if self.disable_by_batch_size is not None:
            _positive("disable_by_batch_size", self.disable_by_batch_size)
        rate = self.min_acceptance_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ConfigError(f"speculative_config min_acceptance_rate must be a number in [0, 1), got {rate!r}",
                              "speculative_config.min_acceptance_rate")
        if self.prompt_lookup_max is None:
            object.__setattr__(self, "prompt_lookup_max", max(self.prompt_lookup_min, 3))
        _positive("prompt_lookup_max", self.prompt_lookup_max)
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ConfigError(f"speculative_config prompt_lookup_max ({self.prompt_lookup_max}) must be >= "
                              f"prompt_lookup_min ({self.prompt_lookup_min})", "speculative_config.prompt_lookup_max")
        if self.method == "draft_model" and self.model is None and self.quantization is None:
            raise ConfigError("speculative_config method 'draft_model' needs a 'model', or a 'quantization' for the "
                              "target's own quantized copy", "speculative_config.model")

    @classmethod
    def from_dict(cls, config: SpeculativeConfig | dict[str, Any]) -> SpeculativeConfig:
        """A config from vLLM-style keys; an unknown key is refused by name."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"speculative_config must be a dict, got {type(config).__name__}", "speculative_config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}",
                              "speculative_config")
        if "method" not in config or ("num_speculative_tokens" not in config and config["method"] != "draft_model"):
            raise ConfigError("speculative_config needs 'method' and 'num_speculative_tokens'", "speculative_config")
        return cls(**{"num_speculative_tokens": DRAFT_MODEL_TOKENS, **config})


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"speculative_config {name} must be an integer >= 1, got {value!r}",
                          f"speculative_config.{name}")
