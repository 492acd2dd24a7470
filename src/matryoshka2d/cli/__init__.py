"""The ``m2d`` command line: ``main(argv) -> int``; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from matryoshka2d._version import __version__
from matryoshka2d.logs import setup_logging

logger = logging.getLogger(__name__)

# subcommand name -> module under matryoshka2d.cli that defines add_parser(subparsers)
COMMANDS = ("info", "encode", "eval", "compare", "train", "align", "export", "reproduce", "bench", "index", "search",
            "serve")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``m2d encode: error: ...; see m2d encode --help`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="m2d", description="2D Matryoshka sentence embeddings.")
    parser.add_argument("--version", action="version", version=f"matryoshka2d {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"matryoshka2d.cli.{name}").add_parser(sub)
    for command in sub.choices.values():  # --debug also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``m2d`` with ``argv``; return the exit code.

    2 for user and environment errors (bad input, unwritable output, damaged files, busy outputs), with a
    one-line message; 1 for an unexpected error (a one-line message; ``--debug`` shows the traceback).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        with setup_logging(level, verbose=args.verbose > 0, quiet=args.quiet):
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        print(f"m2d {args.command}: interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except Exception as e:  # the one error boundary: user/environment errors exit 2, bugs exit 1
        from matryoshka2d.cli.errors import report

        return report(args.command, e, debug=args.debug)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
