"""Loads a model and its tokenizer from an alias, a GGUF file or a Hugging Face folder."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from fastinfer.common.packed import PackedWeight
from fastinfer.distributed.comm import SINGLE, Communicator
from fastinfer.distributed.layout import plan_layout
from fastinfer.errors import ConfigError, InvalidArgumentError, ModelLoadError
from fastinfer.model import gguf_loader
from fastinfer.model.awq import apply_awq
from fastinfer.model.config import ModelConfig
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.model.registry import resolve_model_path
from fastinfer.model.sharding import shard_weights
from fastinfer.model.tokenizer import Tokenizer
from fastinfer.quant.folder import packed_weights, quantization_config
from fastinfer.quant.policy import SCHEMES, quantize_weights


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with the tokenizer and facts read from the same source."""

    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    path: str

    @property
    def kv_heads(self) -> int:
        """KV heads this process caches: the model's, or its tensor-parallel rank's share."""
        return self.model.local.num_kv_heads


def load_model(model: str, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
               quant_group_size: int | str = 32, quant_method: str = "rtn", comm: Communicator = SINGLE) -> LoadedModel:
    """Reads weights and tokenizer; unknown paths and corrupt files raise ModelLoadError.

    ``quantization``: None keeps a GGUF file's quantized blocks and a float model in float;
    ``"none"`` dequantizes everything; ``"gguf"`` keeps the blocks and refuses a float model;
    ``"int8"``, ``"int4"`` and ``"fp8"`` quantize the float (or dequantized) weights at load
    (``quant_group_size`` applies to int4; ``quant_method="awq"`` first calibrates int4 or int8
    scales on a text, :mod:`fastinfer.model.awq`). A folder written by ``fastinfer quantize`` loads as
    saved (None, or its own scheme), or dequantized (``"none"``). ``comm``: a tensor-parallel
    group (``comm.size > 1``): this process loads its rank's share of the weights.
    """
    path, cfg, weights, tok = read_weights(model, quantization, quant_group_size, quant_method)
    layout = None
    if comm.size > 1:
        layout = plan_layout(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size, comm.size,
                             _input_group(weights))[comm.rank]
        weights = shard_weights(weights, layout, cfg.head_dim)
    net = LlamaForCausalLM(cfg, dtype, layout, comm)
    try:
        net.load_weights(weights)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    try:
        net = net.to(device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot place the weights on {device}: {exc}") from exc
    return LoadedModel(cfg, net.eval(), tok, path)


def _input_group(weights: dict) -> int:
    """The largest input group of the quantized MLP down projections (32 when none is), which a
    tensor-parallel split of their inputs must respect."""
    groups = [w.group_size for name, w in weights.items()
              if name.endswith("mlp.down_proj.weight") and isinstance(w, PackedWeight) and w.group_size < w.in_features]
    return max(groups, default=32)


def read_weights(model: str, quantization: str | None = None, quant_group_size: int | str = 32,
                 quant_method: str = "rtn"):
    """``(path, config, weights, tokenizer)`` of ``model``, its weights as ``quantization``
    asks (see :func:`load_model`): HF-named float tensors and packed weights."""
    path = resolve_model_path(model)
    keep = quantization in (None, "gguf")
    if os.path.isdir(path):
        cfg, weights, tok, saved = _read_hf_folder(path, keep)
    elif path.endswith(".gguf"):
        (cfg, weights, tok), saved = _read_gguf(path, keep), None
    else:
        raise ModelLoadError(f"{path} is not a .gguf file or a model folder")
    has_packed = any(isinstance(w, PackedWeight) for w in weights.values())
    if quantization == "gguf" and (saved is not None or not has_packed):
        raise ConfigError(f"quantization='gguf' keeps a GGUF file's quantized blocks, but {path} has no "
                          "quantized GGUF tensors; use quantization='int8', 'int4' or 'fp8' to quantize it",
                          "quantization")
    if saved is not None and quantization in SCHEMES and quantization != saved.get("quantization"):
        raise ConfigError(f"{path} holds weights already quantized with {saved.get('quantization')!r}; load it "
                          f"with quantization=None (or 'none' to dequantize), not {quantization!r}", "quantization")
    if (saved is not None and quantization == "int4" == saved.get("quantization")
            and str(quant_group_size) != str(saved.get("quant_group_size"))):
        raise ConfigError(f"{path} holds int4 weights in groups of {saved.get('quant_group_size')!r}, not "
                          f"{quant_group_size!r}; load it with quantization=None to use them as saved, or "
                          "quantize the float model again", "quant_group_size")
    if saved is not None and quant_method == "awq" and saved.get("method") != "awq":
        raise ConfigError(f"{path} holds weights quantized with {saved.get('method')!r}, not AWQ; quantize the "
                          "float model with quant_method='awq' instead", "quant_method")
    if quantization == "none" and has_packed:
        weights = {n: w.dequantize() if isinstance(w, PackedWeight) else w for n, w in weights.items()}
    elif quantization in SCHEMES and saved is None:
        try:
            if quant_method == "awq":
                weights = apply_awq(cfg, weights, tok, quantization, quant_group_size)
            weights = quantize_weights(weights, quantization, quant_group_size)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{path}: {exc}", exc.argument) from exc
    return path, cfg, weights, tok


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
    """``(config, weights, tokenizer, quantization_config)``; the last is None for a float folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            return (*_read_gguf(ggufs[0], keep_quantized), None)
        raise ModelLoadError(f"{path} has no config.json (not a Hugging Face model folder)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
        cfg = ModelConfig.from_hf(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not a valid model config: {type(exc).__name__}: {exc}") from exc
    saved = quantization_config(raw)
    weights = _read_safetensors(path)
    if saved is not None:
        weights = packed_weights(weights, saved)
    return cfg, weights, _tokenizer(Tokenizer.from_folder, path, path), saved


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
