"""``fastinfer`` command line: ``generate``, ``chat``, ``bench``, ``eval`` and ``quantize`` (more
subcommands come with their issues)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fastinfer.cli.args import (add_kv_cache_args, add_parallel_args, add_quantization_args, kv_cache_options,
                                message_arg, parallel_options, prompt_arg)
from fastinfer.errors import FastInferError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or Hugging Face folder")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="KV-cache size, e.g. 2GiB")
    add_kv_cache_args(p)
    add_parallel_args(p)
    add_quantization_args(p)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastinfer`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(prog="fastinfer", description="fastinfer LLM inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("prompts", nargs="+", type=prompt_arg, help="prompt text(s)")
    gen.add_argument("-n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--template", choices=["auto", "none"], default="auto",
                     help="auto: wrap the prompt in the model's chat template when it has one")
    _engine_args(gen)
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--message", action="append", type=message_arg, default=None,
                      help="send these user messages instead of reading stdin (repeatable)")
    _engine_args(chat)
    _sampling_args(chat)
    from fastinfer.cli.bench import add_bench_parser
    from fastinfer.cli.eval import add_eval_parser
    from fastinfer.cli.keys import add_keys_parser

    quant = sub.add_parser("quantize", help="quantize a model once and write a folder that loads directly")
    quant.add_argument("model", help="alias, .gguf file or Hugging Face folder")
    add_quantization_args(quant)
    quant.add_argument("--out", required=True, type=os.path.expanduser, help="output folder (created)")
    add_bench_parser(sub)
    from fastinfer.cli.serve import add_serve_parser

    add_serve_parser(sub)
    add_keys_parser(sub)
    add_eval_parser(sub)
    return parser


def _make_llm(args: argparse.Namespace):
    from fastinfer import LLM
    from fastinfer.engine.config import QUANT_FIELDS

    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, **{f: getattr(args, f) for f in QUANT_FIELDS},
               **kv_cache_options(args), **parallel_options(args))


def _params(args: argparse.Namespace, n: int = 1):
    from fastinfer import SamplingParams

    return SamplingParams(n=n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    """``fastinfer generate``: completes each prompt and prints the text."""
    params = _params(args, args.n)
    llm = _make_llm(args)
    tok = llm.get_tokenizer()
    use_template = args.template == "auto" and tok.chat_template is not None
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) if use_template else p
               for p in args.prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outs):
        for c in out.outputs:
            header = f"--- {prompt!r}" + (f" [{c.index}]" if len(out.outputs) > 1 else "")
            print(header)
            print(c.text)
            print(f"--- ({len(c.token_ids)} tokens, finish_reason={c.finish_reason})")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``fastinfer chat``: a conversation with the model's chat template (stdin or --message).

    Interactive (a terminal), an error is printed and the conversation goes on; scripted
    (``--message`` or piped stdin), the first error ends the command like any other error
    (exit code 2)."""
    params = _params(args)
    llm = _make_llm(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.message is None and sys.stdin.isatty()
    lines = iter(args.message) if args.message is not None else sys.stdin
    if interactive:
        print("fastinfer chat — type a message, Ctrl-D or /exit to quit", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = next(lines, None)
        if line is None or line.strip() == "/exit":
            return 0
        if not line.strip():  # a blank line at the prompt: ask again
            continue
        history.append({"role": "user", "content": line.strip()})
        try:
            reply = _reply(llm, history, params)
        except (FastInferError, ValueError) as exc:
            history.pop()  # the message that failed (older turns may have been dropped)
            if not interactive:
                raise
            print(f"fastinfer: error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)


def _reply(llm, history: list[dict], params) -> str:
    """The assistant's answer to the last message of ``history``; the oldest turns are
    dropped (from ``history`` itself) while the conversation is too long."""
    from fastinfer.errors import RequestTooLargeError

    first = 1 if history[0]["role"] == "system" else 0
    while True:
        try:
            return llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        except RequestTooLargeError as exc:
            if len(history) - first <= 1:
                raise RequestTooLargeError(f"the message alone is longer than the model's context: {exc}",
                                           "message") from exc
            del history[first:first + 2]  # the oldest user turn and its answer


def cmd_quantize(args: argparse.Namespace) -> int:
    """``fastinfer quantize``: quantizes once and writes a folder that ``LLM(folder)`` loads."""
    from fastinfer.engine.config import QUANT_FIELDS, EngineConfig
    from fastinfer.errors import InvalidArgumentError
    from fastinfer.model.loader import read_weights
    from fastinfer.quant.folder import save_quantized

    if args.quantization not in ("int8", "int4", "fp8"):
        raise InvalidArgumentError(f"--quantization must be int8, int4 or fp8 to write a quantized folder, got "
                                   f"{args.quantization!r}", "quantization")
    if args.kv_cache_dtype != "auto":
        raise InvalidArgumentError("--kv-cache-dtype is chosen when a model is loaded, not saved in a folder; "
                                   "drop it here and pass it to LLM(folder) or the command that loads it",
                                   "kv_cache_dtype")
    config = EngineConfig(model=args.model, device="cpu",  # checks the settings; writing needs no GPU
                          **{f: getattr(args, f) for f in QUANT_FIELDS})
    source, cfg, weights, tokenizer = read_weights(config.model, config.quantization, config.quant_group_size,
                                                   config.quant_method)
    settings = {"quantization": config.quantization, "quant_group_size": config.quant_group_size,
                "method": config.quant_method, "source": os.path.basename(source)}
    save_quantized(args.out, cfg, weights, tokenizer, settings)
    print(f"wrote {args.out} ({config.quantization}, group {config.quant_group_size}, {config.quant_method}) "
          f"from {source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastinfer`` command."""
    args = build_parser().parse_args(argv)
    from fastinfer.cli.bench import run_bench
    from fastinfer.cli.eval import run_eval
    from fastinfer.cli.serve import run_serve
    from fastinfer.cli.keys import run_keys

    handlers = {"generate": cmd_generate, "chat": cmd_chat, "bench": run_bench, "eval": run_eval,
                "quantize": cmd_quantize, "serve": run_serve, "keys": run_keys}
    try:
        return handlers[args.command](args)
    except (FastInferError, ValueError) as exc:
        print(f"fastinfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
