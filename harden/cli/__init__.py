"""The `harden` command line: one thin module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and
sets `func` to a function taking the parsed arguments and returning an exit code.
Subcommands are listed explicitly below so the order of `harden --help` is stable
and a reader can see every entry point at a glance.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from harden import __version__
from harden.allocator import keep_freed_memory
from harden.errors import HardenError

SUBCOMMANDS: list[str] = [
    "data",
    "describe",
    "embed",
    "finetune",
    "export",
    "rewrite",
    "convert",
    "inject",
    "certify",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="harden",
        description="Harden image classifiers against bit flips: text-guided heads, ONNX passes, fault injection.",
    )
    parser.add_argument("--version", action="version", version=f"harden {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"harden.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 ok, 1 bad input, others as documented)."""
    keep_freed_memory()  # before any thread makes its own arena (harden.allocator)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except HardenError as err:
        if args.debug:
            raise
        print(f"harden {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"harden {args.command}: interrupted", file=sys.stderr)
        return 130
