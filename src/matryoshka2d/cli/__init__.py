"""The ``m2d`` command line: ``main(argv) -> int``; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from matryoshka2d._version import __version__

logger = logging.getLogger(__name__)

# subcommand name -> module under matryoshka2d.cli that defines add_parser(subparsers)
COMMANDS = ("info", "encode", "eval", "compare", "train", "export", "reproduce", "bench", "index", "search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2d", description="2D Matryoshka sentence embeddings.")
    parser.add_argument("--version", action="version", version=f"matryoshka2d {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"matryoshka2d.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``m2d`` with ``argv``; return the exit code (2 for user errors, with a one-line message)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as e:
        print(f"m2d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"m2d {args.command}: interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
