"""`gradmap` command line: each subcommand lives in its own `cli_<name>` module.

A subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import GradmapError

SUBCOMMANDS = ["eval", "prune", "sparsify", "compare"]


def _modules():
    for name in SUBCOMMANDS:
        try:
            yield name, importlib.import_module(f"gradmap.cli_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gradmap.cli_{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmap", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _modules():
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except GradmapError as exc:
        print(f"gradmap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
