"""The quantized-folder format: a model quantized once (by ``fastinfer quantize``), as a Hugging
Face-style folder that ``LLM(folder)`` loads directly (no second quantization).

The folder holds ``model.safetensors`` (float tensors under their Hugging Face names; each
packed weight as ``<name>.codes``, ``<name>.scales`` and, when it has offsets,
``<name>.offsets``), ``config.json`` with a ``quantization_config`` that lists every packed
weight's code kind, group size and shape, and the tokenizer with its chat template.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from fastinfer.errors import ModelLoadError
from fastinfer.common.packed import PackedWeight

FORMAT = "fastinfer"
FORMAT_VERSION = 1


def save_quantized(out_dir: str, cfg, weights: dict[str, torch.Tensor | PackedWeight], tokenizer,
                   settings: dict[str, Any]) -> None:
    """Writes ``weights`` (some packed), the model config and the tokenizer to ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, w in weights.items():
        if isinstance(w, PackedWeight):
            packed[name] = {"kind": w.kind, "group_size": w.group_size, "shape": list(w.shape)}
            tensors[f"{name}.codes"] = w.codes
            tensors[f"{name}.scales"] = w.scales
            if w.offsets is not None:
                tensors[f"{name}.offsets"] = w.offsets
        else:
            tensors[name] = w.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_hf()
    config["quantization_config"] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION, **settings,
                                     "packed": packed}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save(out_dir)


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a folder written by :func:`save_quantized` (None for a
    float folder); another tool's quantization raises ModelLoadError."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != FORMAT:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ModelLoadError(f"quantization_config with quant_method {method!r} is not supported; fastinfer "
                             f"reads float folders, GGUF files and folders written by `fastinfer quantize`")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"quantized folder format version {qc.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}; re-run `fastinfer quantize`")
    return qc


def packed_weights(tensors: dict[str, torch.Tensor], qc: dict[str, Any]) -> dict[str, torch.Tensor | PackedWeight]:
    """Rebuilds the packed weights listed in ``qc`` from their ``.codes/.scales/.offsets`` tensors."""
    out = dict(tensors)
    for name, spec in qc["packed"].items():
        try:
            codes, scales = out.pop(f"{name}.codes"), out.pop(f"{name}.scales")
            offsets = out.pop(f"{name}.offsets", None)
            n, k = spec["shape"]
            out[name] = PackedWeight(spec["kind"], n, k, spec["group_size"], codes, scales, offsets)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"packed weight {name!r} is incomplete or inconsistent: {exc}") from exc
    return out
