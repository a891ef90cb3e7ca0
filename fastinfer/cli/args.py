"""argparse types built on ``fastinfer.validation``: command-line values are refused when the
arguments are parsed, with the same rules and messages as the Python API."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from fastinfer.errors import InvalidArgumentError
from fastinfer.validation import as_prompt, check_int, check_str


def _adapt(convert: Callable[[str], Any], check: Callable[[Any], Any], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then ``check`` it; failures become argparse
    errors (usage message, exit code 2)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except InvalidArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def int_arg(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An int option within ``[lo, hi]`` (``--num-prompts 0`` is refused at parse time)."""
    return _adapt(int, lambda v: check_int("value", v, lo=lo, hi=hi), "an int")


def message_arg(text: str) -> str:
    """A chat message: non-empty once stripped, valid Unicode."""
    return _adapt(str.strip, lambda v: check_str("message", v), "a message")(text)


def prompt_arg(text: str) -> str:
    """A prompt: non-empty, valid Unicode (the same rule as the Python API's prompts)."""
    return _adapt(str, lambda v: as_prompt(v), "a prompt")(text)


def output_path_arg(text: str) -> str:
    """A file to write results to: its folder is created now, so a long run never ends by
    failing to write; a path that is a folder, or a folder we cannot write to, is refused."""
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: expected a file path")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the folder of {text!r}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write to the folder of {text!r}")
    return path


def _group_size(text: str) -> int | str:
    from fastinfer.quant.rtn import check_group_size

    return check_group_size(int(text) if text.isdigit() else text)


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """``--quantization``, ``--quant-group-size``, ``--quant-method`` and ``--kv-cache-dtype``:
    the quantization fields of ``EngineConfig`` (``QUANT_FIELDS``), on every command that loads
    a model."""
    from fastinfer.engine.config import QUANT_METHODS, QUANTIZATIONS
    from fastinfer.common.kv_format import KV_ALIASES, KV_CACHE_DTYPES

    p.add_argument("--quantization", default=None, choices=[q for q in QUANTIZATIONS if q is not None],
                   help="default: keep a GGUF file's quantized blocks, a float model in float; "
                        "none = dequantize; int8 | int4 | fp8 = quantize at load")
    p.add_argument("--quant-group-size", type=_adapt(str, _group_size, "32, 64, 128 or auto"), default=32,
                   help="int4 group size: 32 | 64 | 128 | auto (default 32)")
    p.add_argument("--quant-method", default="rtn", choices=list(QUANT_METHODS),
                   help="rtn (default): round to nearest; awq: calibrate activation-aware scales first (int4, int8)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=[*KV_CACHE_DTYPES, *KV_ALIASES],
                   help="KV-cache element type: auto (the model dtype), or int8 / fp8 codes with a scale per "
                        "token and head")



KV_CACHE_FIELDS = ("enable_prefix_caching", "kv_offload_memory", "preemption_mode")
"""EngineConfig fields that ``add_kv_cache_args`` sets (None: the config's default)."""


def add_kv_cache_args(p: argparse.ArgumentParser) -> None:
    """The KV-cache management options of an engine: prefix caching, the host tier, preemption."""
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of shared prompt prefixes (on by default)")
    p.add_argument("--kv-offload-memory", default=None,
                   help="host-memory tier for evicted prefixes and swapped requests, e.g. 8GiB (off by default)")
    p.add_argument("--preemption-mode", choices=["recompute", "swap", "auto"], default=None,
                   help="what a preempted request does: recompute later, or swap to the host tier "
                        "(auto: swap when the tier has room; the default)")


def kv_cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The KV-cache options given on the command line (those left out keep their defaults)."""
    return {f: getattr(args, f) for f in KV_CACHE_FIELDS if getattr(args, f, None) is not None}


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """How one engine is spread over processes."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int_arg(lo=1), default=None,
                   help="split the model over N processes (one rank each; gloo on a CPU)")
    p.add_argument("--tp-all-reduce", choices=["gloo", "shm"], default=None,
                   help="the ranks' all-reduce: gloo (default) or DeepSpeed's shared-memory one (faster; its "
                        "waits have no timeout; needs: pip install --no-deps deepspeed==0.19.8 hjson einops)")
    p.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 3}\'')


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def parallel_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parallelism and speculation options given on the command line."""
    names = ("tensor_parallel_size", "tp_all_reduce", "speculative_config")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
