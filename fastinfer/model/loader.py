"""Loads a model and its tokenizer from an alias, a GGUF file or a Hugging Face folder."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from fastinfer.errors import ConfigError, InvalidArgumentError, ModelLoadError
from fastinfer.model import gguf_loader
from fastinfer.model.config import ModelConfig
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.model.quantize import SCHEMES, quantize_weights
from fastinfer.model.registry import resolve_model_path
from fastinfer.model.tokenizer import Tokenizer
from fastinfer.ops.packed import PackedWeight


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with the tokenizer and facts read from the same source."""

    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    path: str


def load_model(model: str, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
               quant_group_size: int | str = 32) -> LoadedModel:
    """Reads weights and tokenizer; unknown paths and corrupt files raise ModelLoadError.

    ``quantization``: None keeps a GGUF file's quantized blocks and a float model in float;
    ``"none"`` dequantizes everything; ``"gguf"`` keeps the blocks and refuses a float model;
    ``"int8"``, ``"int4"`` and ``"fp8"`` quantize the float (or dequantized) weights at load
    (``quant_group_size`` applies to int4).
    """
    path = resolve_model_path(model)
    keep = quantization in (None, "gguf")
    if os.path.isdir(path):
        cfg, weights, tok = _read_hf_folder(path, keep)
    elif path.endswith(".gguf"):
        cfg, weights, tok = _read_gguf(path, keep)
    else:
        raise ModelLoadError(f"{path} is not a .gguf file or a model folder")
    if quantization == "gguf" and not any(isinstance(w, PackedWeight) for w in weights.values()):
        raise ConfigError(f"quantization='gguf' keeps a GGUF file's quantized blocks, but {path} has no "
                          "quantized tensors; use quantization='int8', 'int4' or 'fp8' to quantize it",
                          "quantization")
    if quantization in SCHEMES:
        try:
            weights = quantize_weights(weights, quantization, quant_group_size)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{path}: {exc}", exc.argument) from exc
    net = LlamaForCausalLM(cfg, dtype)
    try:
        net.load_weights(weights)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    try:
        net = net.to(device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot place the weights on {device}: {exc}") from exc
    return LoadedModel(cfg, net.eval(), tok, path)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and quantization data (codes, scales, offsets) as held
    in memory; a tied weight counts once. Rotary tables and other caches are not weights."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters())
    tensors += [b for m in model.modules() if isinstance(m, PackedWeight) for b in m.buffers()]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _read_gguf(path: str, keep_quantized: bool = False):
    reader = gguf_loader.open_gguf(path)
    meta = gguf_loader.read_metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = ModelConfig.from_gguf(meta, has_output)
    weights = gguf_loader.load_gguf_tensors(reader, cfg.num_heads, cfg.num_kv_heads, keep_quantized)
    factors = weights.pop(gguf_loader.ROPE_FREQS, None)
    if factors is not None:
        cfg = ModelConfig.from_gguf(meta, has_output, factors.flatten().tolist())
    return cfg, weights, _tokenizer(Tokenizer.from_gguf, meta, path)


def _tokenizer(build, source, path: str) -> Tokenizer:
    try:
        return build(source)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot build the tokenizer: {exc}") from exc


def _read_hf_folder(path: str, keep_quantized: bool = False):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            return _read_gguf(ggufs[0], keep_quantized)
        raise ModelLoadError(f"{path} has no config.json (not a Hugging Face model folder)")
    try:
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not a valid model config: {type(exc).__name__}: {exc}") from exc
    return cfg, _read_safetensors(path), _tokenizer(Tokenizer.from_folder, path, path)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return weights
