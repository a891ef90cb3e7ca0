"""``fastinfer serve``: the OpenAI-compatible server (FastAPI + uvicorn).

``fastinfer serve [MODEL]`` serves one model; ``--model chat@v1=SOURCE`` (repeatable, without
MODEL) serves named versions, ``--traffic chat@v2=10`` splits a name's traffic. On SIGTERM or
Ctrl-C it keeps accepting connections but answers 503 (with ``Retry-After``) to new requests,
lets the ones in flight finish for up to ``--shutdown-timeout`` seconds, aborts the rest and
exits; a second signal exits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from fastinfer.cli.args import (add_kv_cache_args, add_parallel_args, add_quantization_args, int_arg, kv_cache_options,
                                parallel_options)
from fastinfer.server.tools import PARSERS

_ENGINE_OPTIONS = ("dtype", "device", "max_model_len", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                   "seed", "block_size", "gpu_memory_utilization", "grammar_compile_timeout")


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Serve models over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics, /admin/...).")
    p.add_argument("source", nargs="?", default=None, metavar="MODEL",
                   help="alias, .gguf file or folder (default smollm2-135m); or use --model NAME@VERSION=SOURCE")
    p.add_argument("--model", action="append", default=None, dest="models", metavar="NAME@VERSION=SOURCE",
                   help="a model version to serve (repeatable; no positional MODEL then)")
    p.add_argument("--traffic", action="append", default=None, metavar="NAME@VERSION=PERCENT",
                   help="traffic weight of a version (repeatable; the stable version gets the rest)")
    p.add_argument("--served-model-name", default=None, help="the name clients use for the positional MODEL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_arg(lo=0, hi=65535), default=8000)
    p.add_argument("--api-key", action="append", default=None, help="an accepted key, without limits (repeatable)")
    p.add_argument("--api-keys-file", default=None, help="JSON keys file with limits (see `fastinfer keys add`)")
    p.add_argument("--admin-key", default=None, help="enables the /admin API for this key")
    p.add_argument("--metrics-key", default=None, help="/metrics then needs this key (or the admin key)")
    p.add_argument("--enable-docs", action="store_true", help="serve /docs (an offline page of the routes)")
    p.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how chat replies are read for tool calls (default: from the model's chat template)")
    p.add_argument("--grammar-compile-timeout", type=_positive_seconds, default=5.0,
                   help="seconds a structured output's schema or grammar may take to compile (else 400)")
    p.add_argument("--audit-log", default="-", help="audit log file, '-' for stderr, 'none' to turn it off")
    p.add_argument("--log-prompts", action="store_true", help="write prompt texts in the audit log")
    p.add_argument("--max-queued-requests", type=int_arg(lo=1), default=None)
    p.add_argument("--max-queued-tokens", type=int_arg(lo=1), default=None)
    p.add_argument("--max-body-bytes", type=int_arg(lo=1), default=1 << 20)
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, help="seconds in-flight requests get at exit")
    p.add_argument("--header-timeout", type=_positive_seconds, default=10.0,
                   help="seconds a connection has to send a request's head (else it is closed)")
    p.add_argument("--body-timeout", type=_positive_seconds, default=30.0,
                   help="seconds a request has to send its body (else 408)")
    p.add_argument("--memory-budget", default=None, help="bytes all versions may hold together, e.g. 8GiB")
    p.add_argument("--canary-window", type=float, default=60.0, help="seconds of results compared")
    p.add_argument("--canary-min-requests", type=int_arg(lo=1), default=20)
    p.add_argument("--canary-max-error-rate-delta", type=float, default=0.1)
    p.add_argument("--canary-max-ttft-ratio", type=float, default=2.0)
    p.add_argument("--canary-max-logprob-drop", type=float, default=0.5,
                   help="nats of mean generated-token log-probability below the stable version")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int_arg(lo=1), default=None)
    p.add_argument("--max-num-seqs", type=int_arg(lo=1), default=256)
    p.add_argument("--max-num-batched-tokens", type=int_arg(lo=1), default=None)
    p.add_argument("--kv-cache-memory", default=None, help="KV-cache size per version, e.g. 1GiB")
    add_kv_cache_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int_arg(lo=1), default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="GPU share for weights and KV cache (one version; several need --kv-cache-memory)")
    add_parallel_args(p)
    add_quantization_args(p)
    _add_replica_args(p)


def _add_replica_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas on Ray Serve (pip install 'fastinfer[ray]')")
    g.add_argument("--replicas", type=int_arg(lo=1), default=None,
                   help="serve each model version from N engine replicas on Ray Serve, behind this server")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one")
    g.add_argument("--routing", choices=["prefix", "random"], default="prefix",
                   help="how requests are sent to replicas: to the longest cached prefix (falling back to "
                        "the less loaded of two) or at random")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves")
    g.add_argument("--replica-threads", type=int_arg(lo=1), default=None,
                   help="compute threads of each replica (default: its --replica-cpus)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (a finite number >= 0), got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected seconds (a finite number > 0), got {text!r}")
    return value


def model_specs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, version, source) of every version to load, from MODEL or --model."""
    from fastinfer.errors import InvalidArgumentError
    from fastinfer.server.registry import parse_model_spec

    if args.models and args.source is not None:
        raise InvalidArgumentError("give either a positional MODEL or --model NAME@VERSION=SOURCE, not both", "model")
    if args.models:
        specs = [parse_model_spec(m) for m in args.models]
        if len(specs) > 1 and args.kv_cache_memory is None and args.device != "cpu":
            import torch

            if args.device.startswith("cuda") or torch.cuda.is_available():
                # Each version's default GPU budget is a share of what is free when it loads:
                # the first would leave the next nothing.
                raise InvalidArgumentError("several --model versions on a GPU need --kv-cache-memory (each "
                                           "version's KV-cache size)", "kv_cache_memory")
        return specs
    source = args.source or "smollm2-135m"
    name = args.served_model_name or source
    return [parse_model_spec(f"{name}@v1={source}") if args.served_model_name else parse_model_spec(source)]


def build_state(args: argparse.Namespace):
    """The server state for ``args``; versions are loaded by ``load_models``."""
    from fastinfer.engine.async_engine import AsyncEngine
    from fastinfer.engine.config import QUANT_FIELDS
    from fastinfer.server.app import ServerState
    from fastinfer.server.audit import AuditLog
    from fastinfer.server.keys import KeyStore
    from fastinfer.server.registry import CanaryMonitor, ModelRegistry
    from fastinfer.validation import parse_bytes

    options = ({f: getattr(args, f) for f in _ENGINE_OPTIONS + tuple(QUANT_FIELDS)} | kv_cache_options(args)
               | parallel_options(args) | {"max_queued_requests": args.max_queued_requests,
                                          "max_queued_tokens": args.max_queued_tokens})
    factory = _replica_factory(args, options) if args.replicas else (
        lambda name, version, source: AsyncEngine(source, **options))

    monitor = CanaryMonitor(window_s=args.canary_window, min_requests=args.canary_min_requests,
                            max_error_rate_delta=args.canary_max_error_rate_delta,
                            max_ttft_p99_ratio=args.canary_max_ttft_ratio,
                            max_logprob_drop=args.canary_max_logprob_drop)
    budget = None if args.memory_budget is None else parse_bytes("memory_budget", args.memory_budget)
    registry = ModelRegistry(factory, memory_budget=budget, monitor=monitor)
    keys = KeyStore.from_sources(args.api_keys_file, args.api_key)
    audit_target = {"-": sys.stderr, "none": None}.get(args.audit_log, args.audit_log)
    return ServerState(registry=registry, keys=keys, audit=AuditLog(audit_target, log_prompts=args.log_prompts),
                       admin_key=args.admin_key, max_body_bytes=args.max_body_bytes,
                       shutdown_timeout=args.shutdown_timeout, header_timeout=args.header_timeout,
                       body_timeout=args.body_timeout, metrics_key=args.metrics_key, enable_docs=args.enable_docs,
                       tool_call_parser=args.tool_call_parser)


def _replica_factory(args: argparse.Namespace, options: dict):
    """Each version as ``--replicas`` engine replicas on Ray Serve (``fastinfer.ray_serve``)."""
    from fastinfer.errors import ConfigError

    try:
        from fastinfer.ray_serve.app import ReplicaOptions, deploy_replicas, start_ray
    except ImportError as exc:
        raise ConfigError(f"--replicas needs Ray Serve: pip install 'fastinfer[ray]' ({exc})", "replicas") from exc
    replica_options = ReplicaOptions(replicas=args.replicas, routing=args.routing, num_cpus=args.replica_cpus,
                                     threads=args.replica_threads)
    args.ray_started = start_ray(args.ray_address)

    def factory(name: str, version: str, source: str):
        return deploy_replicas(name, version, source, options, replica_options)

    return factory


async def load_models(state, specs, traffic: list[str] | None) -> None:
    """Loads every version, then applies the --traffic weights."""
    from fastinfer.errors import InvalidArgumentError
    from fastinfer.server.registry import parse_traffic

    for name, version, source in specs:
        await state.registry.load(name, version, source)
    weights: dict[str, dict[str, float]] = {}
    for text in traffic or ():
        name, version, weight = parse_traffic(text)
        weights.setdefault(name, {})[version] = weight
    for name, given in weights.items():
        stable = next((m["version"] for m in state.registry.list_models() if m["name"] == name and m["stable"]), None)
        if stable is None:
            raise InvalidArgumentError(f"--traffic names {name!r}, which no --model declares", "traffic")
        if stable not in given:
            given[stable] = max(0.0, 100.0 - sum(given.values()))
        state.registry.set_traffic(name, given)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401  (the serve extra)
    except ImportError as exc:
        from fastinfer.errors import ConfigError

        raise ConfigError(f"fastinfer serve needs the serve extra: pip install 'fastinfer[serve]' ({exc})",
                          "serve") from exc

    from fastinfer.server.app import build_app
    from fastinfer.server.serving import build_server

    specs = model_specs(args)
    state = build_state(args)  # with --replicas, connects to Ray (or starts a local instance)
    try:
        _serve_until_signalled(state, build_server(build_app(state), host=args.host, port=args.port), specs, args)
    finally:
        if getattr(args, "ray_started", False):  # the local Ray instance this server started
            from fastinfer.ray_serve.app import stop_ray

            stop_ray()
    return 0


def _serve_until_signalled(state, server, specs, args: argparse.Namespace) -> None:
    async def main() -> None:
        await load_models(state, specs, args.traffic)
        print(f"fastinfer: serving {', '.join(state.registry.served_names())} on http://{args.host}:{args.port}",
              file=sys.stderr, flush=True)
        await server.serve()

    def exit_cleanly(sig, frame) -> None:
        raise SystemExit(0)

    # After a second signal uvicorn puts back the SIGTERM handler it found and raises the signal
    # again once its shutdown is over; the default handler would then kill the process (status
    # -SIGTERM) although every request ended. Before serving starts, SIGTERM exits at once.
    previous = signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)

