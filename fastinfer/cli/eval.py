"""``fastinfer eval ppl``: perplexity over a text through the engine's own path."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from fastinfer.cli.args import add_quantization_args, int_arg, output_path_arg


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model (perplexity)")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    ppl = evs.add_parser("ppl", help="perplexity over a text with strided windows")
    ppl.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or Hugging Face folder")
    ppl.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ppl.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    add_quantization_args(ppl)
    ppl.add_argument("--text", default=None, help="UTF-8 text file (default: CPython's pydoc_data topics)")
    ppl.add_argument("--max-tokens", type=int_arg(lo=2), default=4096,
                     help="score at most the first N tokens of the text (default 4096)")
    ppl.add_argument("--context", type=int_arg(lo=2), default=512, help="window length in tokens (default 512)")
    ppl.add_argument("--stride", type=int_arg(lo=1), default=256, help="window step in tokens (default 256)")
    ppl.add_argument("--json", type=output_path_arg, default=None, help="write the result document here")


def run_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fastinfer.bench.perplexity import DEFAULT_TEXT, default_text, perplexity
    from fastinfer.bench.schema import collect_env
    from fastinfer.engine.config import QUANT_FIELDS, EngineConfig
    from fastinfer.engine.engine import Engine
    from fastinfer.errors import InvalidArgumentError

    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--text {args.text}: cannot read it as UTF-8 text: {exc}", "text") from exc
    else:
        text = default_text()
    quant = {f: getattr(args, f) for f in QUANT_FIELDS}
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                 max_model_len=max(args.context, 16), **quant))
    ids = engine.tokenizer.encode(text)[: args.max_tokens]
    with tqdm(desc="perplexity", unit="window", leave=False) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        result = perplexity(engine, ids, args.context, args.stride, progress)
    doc = {
        "perplexity": result.perplexity, "num_tokens": result.num_tokens, "nll_sum": result.nll_sum,
        "num_windows": result.num_windows, "seconds": round(result.seconds, 3),
        "settings": {"model": args.model, "model_path": engine.loaded.path,
                     "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
                     **quant, "text": args.text or DEFAULT_TEXT, "max_tokens": args.max_tokens,
                     "context": args.context, "stride": args.stride},
        "weight_bytes": engine.weight_bytes, "kv_bytes_per_token": engine.kv_bytes_per_token,
        "env": collect_env(), "command": "fastinfer " + shlex.join(sys.argv[1:]) if sys.argv else None,
    }
    print(f"perplexity {result.perplexity:.4f} over {result.num_tokens} tokens ({result.num_windows} windows of "
          f"{args.context}, stride {args.stride}) in {result.seconds:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0
