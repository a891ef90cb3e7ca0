"""``fastinfer keys add``: makes an API key for the server and stores its digest and limits in
a keys file (``fastinfer serve --api-keys-file``)."""
from __future__ import annotations

import argparse
import os
import sys

from fastinfer.cli.args import int_arg


def add_keys_parser(sub) -> None:
    """Adds ``keys`` and its subcommands to the top-level CLI."""
    keys = sub.add_parser("keys", help="manage the server's API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    add = ksub.add_parser("add", help="make a new key and add its policy to a keys file (printed once)")
    add.add_argument("--file", required=True, type=os.path.expanduser, help="keys file (created when missing)")
    add.add_argument("--id", required=True, help="the key's name in logs and metrics, e.g. team-a")
    add.add_argument("--requests-per-minute", type=int_arg(lo=1), default=None, metavar="N", help="default: unlimited")
    add.add_argument("--tokens-per-minute", type=int_arg(lo=1), default=None, metavar="N",
                     help="prompt + max_tokens per minute; default: unlimited")
    add.add_argument("--max-concurrent", type=int_arg(lo=1), default=None, metavar="N",
                     help="requests open at once; default: unlimited")
    add.add_argument("--model", action="append", default=None, dest="models", metavar="NAME",
                     help="a model the key may use (repeatable; default: every model)")


def run_keys(args: argparse.Namespace) -> int:
    """Runs ``fastinfer keys <subcommand>``."""
    from fastinfer.server.keys import add_key

    key = add_key(args.file, args.id, requests_per_minute=args.requests_per_minute,
                  tokens_per_minute=args.tokens_per_minute, max_concurrent=args.max_concurrent, models=args.models)
    print(key)
    print(f"added key {args.id!r} to {args.file}. This key is shown only once: only its SHA-256 hash is "
          "stored, so save it now.", file=sys.stderr)
    return 0
