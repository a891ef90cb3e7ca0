"""``fastinfer bench``: throughput, latency and prefix benchmarks of fastinfer beside PyTorch
baselines measured in the same run (prefix: with the prefix cache on and off), ``kv-cache``
(multi-turn, host-tier reload, a long prompt among decodes, the scheduler's step; each with
the cache on and off), ``structured`` (JSON-schema requests against free text), ``serve``
(a request-rate sweep of the server), ``gpu`` (random-weight
models of real shapes on a GPU, with kernel and bandwidth figures), and ``compare`` for CI
regression gates."""
from __future__ import annotations

import argparse
import shlex
import sys

from fastinfer.cli.args import add_quantization_args, int_arg, output_path_arg
from fastinfer.validation import check_float

QUICK = {
    "throughput": dict(num_prompts=8, input_len="16:128", output_len="16:64"),
    "latency": dict(batch_size=4, input_len="64", output_len="16", num_iters=2),
    "prefix": dict(num_prompts=8, prefix_len=256, input_len="8:32", output_len="16:32"),
    "serve": dict(num_prompts=6, input_len="16:48", output_len="8:16", request_rates="4,inf"),
}
SERVE_SYSTEMS = ("fastinfer-server", "fastinfer-engine", "llama-server")  # bench/serve_driver.py's defaults
REPLICA_SYSTEMS = ("replicas-1", "replicas-2-prefix", "replicas-2-random")  # and its systems on Ray Serve
BASELINES = ("transformers", "transformers-batched", "torch-naive", "llama.cpp", "none")
NO_PREFIX_CACHE = "fastinfer-no-prefix-cache"  # bench/driver.py's: bench prefix's cache-off engine
RATIO_SYSTEMS = (*BASELINES[:-1], NO_PREFIX_CACHE)  # what --min-ratio may name
KV_WORKLOADS = ("multiturn", "offload", "mixed", "sched")  # bench/kv_cache.py's WORKLOADS
KV_SIZES = {  # bench kv-cache's sizes: option -> (default, --quick)
    "conversations": (16, 4), "turns": (8, 3), "message_len": (32, 32), "turn_output_len": (32, 16),
    "offload_prefix_len": (2000, 512), "offload_question_len": (32, 32), "offload_reps": (2, 1),
    "mixed_prompt_len": (4000, 1024), "mixed_decoders": (16, 4), "mixed_decoder_prompt_len": (64, 64),
    "mixed_output_len": (64, 24), "sched_seqs": ([256, 1024], [64, 256]), "sched_steps": (200, 50),
    "sched_prompt_len": (128, 128),
}


def length_range(text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"16:512"`` -> (16, 512)."""
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"length range must satisfy 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory", default=None)
    add_quantization_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", nargs="+", choices=BASELINES, default=["transformers"])
    p.add_argument("--batch-size", type=int_arg(lo=1), default=None,
                   help="static batch size of transformers-batched (latency: the batch size)")
    p.add_argument("--input-len", type=length_range, default=None, help="N or LO:HI prompt tokens")
    p.add_argument("--output-len", type=length_range, default=None, help="N or LO:HI new tokens")
    p.add_argument("--json", type=output_path_arg, default=None, help="write the result document here")
    p.add_argument("--markdown", type=output_path_arg, default=None, help="write a Markdown table here")
    p.add_argument("--plot", type=output_path_arg, default=None,
                   help="write a PNG (throughput bars, latency CDF) here")
    p.add_argument("--quick", action="store_true", help="a small CI-sized run")
    p.add_argument("--min-ratio", action="append", type=min_ratio_arg, default=[], metavar="SYSTEM=X",
                   help="exit 1 unless fastinfer's throughput is >= X times SYSTEM's (repeatable)")


def add_bench_parser(sub) -> None:
    """Adds ``bench`` and its subcommands to the top-level CLI."""
    bench = sub.add_parser("bench", help="benchmarks against PyTorch baselines, and compare")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bsub.add_parser("throughput", help="offline: all requests at once")
    _common(tp)
    tp.add_argument("--num-prompts", type=int_arg(lo=1), default=None, help="default 32")
    tp.add_argument("--dataset", default=None, help="JSONL: ShareGPT conversations or {prompt, max_tokens}")
    lat = bsub.add_parser("latency", help="one batch repeated: e2e, TTFT, TPOT percentiles")
    _common(lat)
    lat.add_argument("--num-iters", type=int_arg(lo=1), default=None, help="default 5")
    pre = bsub.add_parser("prefix", help="requests sharing a long common prefix, the prefix cache on and off")
    _common(pre)
    pre.set_defaults(baseline=["none"])  # the cache-off engine is the baseline; transformers on request
    pre.add_argument("--num-prompts", type=int_arg(lo=1), default=None, help="default 64")
    pre.add_argument("--prefix-len", type=int_arg(lo=1), default=None, help="default 512")
    pre.add_argument("--no-prefix-cache-baseline", action="store_true",
                     help=f"skip the run with the prefix cache off (system {NO_PREFIX_CACHE!r})")
    _kv_cache_parser(bsub)
    _structured_parser(bsub)
    _serve_args(bsub.add_parser("serve", help="request-rate sweep: the OpenAI server, the in-process engine "
                                               "and llama-server; TTFT/TPOT percentiles, goodput"))
    _gpu_parser(bsub)
    cmp_ = bsub.add_parser("compare", help="compare two result files; exit 1 on regression, 2 on bad input")
    cmp_.add_argument("base")
    cmp_.add_argument("new")
    cmp_.add_argument("--threshold", default="5%")
    cmp_.add_argument("--metrics", nargs="+", default=None)
    cmp_.add_argument("--on", choices=["absolute", "ratios"], default="absolute")


def _kv_cache_parser(bsub) -> None:
    kv = bsub.add_parser("kv-cache", help="KV-cache management: multi-turn, host-tier reload, a long prompt "
                         "among decodes, the scheduler's step; the cache on and off in one run",
                         description="multiturn: TTFT per turn of conversations resending their history; "
                         "offload: a prefix evicted to the host tier and hit again, reload vs recompute; mixed: "
                         "decoders' time per token while a long prompt is read; sched: one scheduling step "
                         "without a model")
    kv.add_argument("--workload", choices=[*KV_WORKLOADS, "all"], default="all")
    kv.add_argument("--model", default="smollm2-135m")
    kv.add_argument("--dtype", default="auto")
    kv.add_argument("--device", default="auto")
    add_quantization_args(kv)
    kv.add_argument("--seed", type=int, default=0)
    kv.add_argument("--max-num-batched-tokens", type=int_arg(lo=1), default=None,
                    help="the engines' token budget per step (default: the engine's, 2048): a smaller one "
                         "cuts the decoders' stall while a long prompt is read, at some prefill speed")
    for name, (full, quick) in KV_SIZES.items():
        if name == "sched_seqs":
            kv.add_argument("--sched-seqs", type=int_list, default=None, help="running sequences, comma-separated "
                            f"(default {','.join(map(str, full))}; {','.join(map(str, quick))} with --quick)")
        else:
            kv.add_argument("--" + name.replace("_", "-"), type=int_arg(lo=1), default=None,
                            help=f"default {full} ({quick} with --quick)")
    kv.add_argument("--json", type=output_path_arg, default=None, help="write the result document here")
    kv.add_argument("--markdown", type=output_path_arg, default=None, help="write Markdown tables here")
    kv.add_argument("--quick", action="store_true", help="a small CI-sized run")


def _structured_parser(bsub) -> None:
    st = bsub.add_parser("structured", help="structured outputs: JSON-schema requests against free text of the "
                         "same lengths, TPOT at batch 1 and 32, and schema compile times")
    st.add_argument("--model", default="smollm2-135m")
    st.add_argument("--dtype", default="auto")
    st.add_argument("--device", default="auto")
    st.add_argument("--kv-cache-memory", default="1GiB")
    add_quantization_args(st)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--batch", type=int_list, default=[1, 32], help="batch sizes, comma-separated (default 1,32)")
    st.add_argument("--repeats", type=int_arg(lo=1), default=3, help="alternating pairs per batch size (default 3)")
    st.add_argument("--json", type=output_path_arg, default=None, help="write the result document here")
    st.add_argument("--markdown", type=output_path_arg, default=None, help="write the table here")


def int_list(text: str) -> list[int]:
    """``"256,1024"`` -> [256, 1024]: ints >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def _gpu_parser(bsub) -> None:
    from fastinfer.bench.gpu import DESCRIPTION, EPILOG, add_gpu_args

    gpu = bsub.add_parser("gpu", help="random-weight Llama shapes on a GPU against transformers and torch.compile",
                          description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpu_args(gpu)


def rate_list(text: str) -> list[float]:
    """``"1,2,4,inf"`` -> [1.0, 2.0, 4.0, inf]: request rates (requests/s), each > 0."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated rates (numbers or inf), got {text!r}") from None
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0 (or inf), got {part!r} in {text!r}")
        rates.append(rate)
    return rates


def _serve_args(p: argparse.ArgumentParser) -> None:
    SYSTEMS = SERVE_SYSTEMS + REPLICA_SYSTEMS

    def systems(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in names if s not in SYSTEMS]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(SYSTEMS)}, got {text!r}")
        return names

    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--request-rates", type=rate_list, default=None, help="requests/s, Poisson; inf = all at once "
                   "(default 1,2,4,inf)")
    p.add_argument("--num-prompts", type=int_arg(lo=1), default=None, help="requests per rate (default 64)")
    p.add_argument("--input-len", type=length_range, default=None, help="N or LO:HI prompt tokens (default 32:512)")
    p.add_argument("--output-len", type=length_range, default=None, help="N or LO:HI new tokens (default 32:128)")
    p.add_argument("--systems", type=systems, default=list(SERVE_SYSTEMS),
                   help=f"default {','.join(SERVE_SYSTEMS)}; also {','.join(REPLICA_SYSTEMS)}: fastinfer serve "
                        "--replicas N on Ray Serve (N engine replicas sharing this machine's threads; prefix-aware "
                        "or random routing)")
    p.add_argument("--shared-prefixes", type=int_arg(lo=1), default=None, metavar="G",
                   help="workload: G shared prefixes of --prefix-len tokens (documents, system prompts), each "
                        "request one of them plus its own --input-len suffix; new prefixes at every rate")
    p.add_argument("--prefix-len", type=int_arg(lo=1), default=512, help="tokens of each shared prefix")
    p.add_argument("--max-num-seqs", type=int_arg(lo=1), default=256,
                   help="fastinfer's running-sequence limit; llama-server's -np (capped at --num-prompts)")
    p.add_argument("--kv-cache-memory", default="2GiB",
                   help="KV cache of each fastinfer system: the same for both, and both fit one GPU")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput: TTFT objective (default 2000)")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput: TPOT objective (default 200)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival times")
    p.add_argument("--json", type=output_path_arg, default=None, help="write the result document here")
    p.add_argument("--markdown", type=output_path_arg, default=None, help="write Markdown tables here")
    p.add_argument("--quick", action="store_true", help="a small run: 6 requests, rates 4,inf")


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``fastinfer bench ...``; returns the exit code."""
    if args.bench_command == "compare":
        from fastinfer.bench.compare import main_compare, parse_threshold

        try:
            threshold = parse_threshold(args.threshold)
        except ValueError as exc:
            print(f"fastinfer bench compare: {exc}", file=sys.stderr)
            return 2
        return main_compare(args.base, args.new, threshold, args.metrics, args.on)
    if args.bench_command == "gpu":
        from fastinfer.bench.gpu import run_gpu_bench

        return run_gpu_bench(args)
    if args.bench_command == "kv-cache":
        from fastinfer.bench.kv_cache import run_kv_cache_bench

        for name, (full, quick) in KV_SIZES.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if args.quick else full)
        return run_kv_cache_bench(args, command_line=_command_line())
    if args.bench_command == "structured":
        from fastinfer.bench.structured import run_structured_bench

        return run_structured_bench(args, command_line=_command_line())
    _apply_quick(args)
    if args.bench_command == "serve":
        from fastinfer.bench.serve_driver import run_serve_benchmark

        doc = run_serve_benchmark(args, command_line=_command_line())
        failed = sum(r["failed"] for r in doc["results"].values())
        if failed:
            print(f"fastinfer bench serve: {failed} requests failed (see 'errors' in the results)", file=sys.stderr)
        return 1 if failed else 0
    from fastinfer.bench.driver import run_benchmark

    doc = run_benchmark(args, command_line=_command_line())
    return _check_ratios(doc, args.min_ratio)


DEFAULTS = {
    "throughput": dict(num_prompts=32, input_len="16:512", output_len="16:256", batch_size=8),
    "latency": dict(batch_size=8, input_len="128", output_len="128", num_iters=5),
    "prefix": dict(num_prompts=64, prefix_len=512, input_len="32", output_len="32", batch_size=8),
    "serve": dict(num_prompts=64, input_len="32:512", output_len="32:128", request_rates="1,2,4,inf"),
}


def _apply_quick(args: argparse.Namespace) -> None:
    """Fills options left unset: from the --quick preset, else from the normal defaults."""
    preset = {**DEFAULTS[args.bench_command], **(QUICK[args.bench_command] if args.quick else {})}
    parsers = {"input_len": length_range, "output_len": length_range, "request_rates": rate_list}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, parsers[key](value) if key in parsers else value)


def min_ratio_arg(text: str) -> tuple[str, float]:
    """``--min-ratio SYSTEM=X``: a baseline name and a ratio > 0."""
    system, sep, value = text.partition("=")
    if not sep or system not in RATIO_SYSTEMS:
        raise argparse.ArgumentTypeError(f"expected SYSTEM=X with SYSTEM one of {list(RATIO_SYSTEMS)}, got {text!r}")
    try:
        return system, check_float("ratio", float(value), lo=0, lo_open=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected SYSTEM=X with X a number > 0, got {text!r}: {exc}") from None


def _check_ratios(doc: dict, wanted: list[tuple[str, float]]) -> int:
    code = 0
    for system, value in wanted:
        ratio = doc["ratios"].get(system)
        if ratio is None:
            print(f"--min-ratio: no ratio for system {system!r} (ran: {sorted(doc['ratios'])})", file=sys.stderr)
            return 2
        ok = ratio >= value
        print(f"ratio fastinfer/{system} = {ratio:.2f} (required >= {value:g}): {'ok' if ok else 'TOO LOW'}")
        code = code or (0 if ok else 1)
    return code


def _command_line() -> str:
    return "fastinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
