"""`gradmap` command line: one module per subcommand in gradmap/cli.

A subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. Building the
parser imports neither torch nor transformers (they load only once a command runs), so
`gradmap --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gradmap.core.errors import GradmapError
from gradmap.version import __version__

DESCRIPTION = ("Remove whole decoder layers from Hugging Face causal LMs and repair the damage "
               "(prune, heal), zero individual weights (sparsify), measure perplexity and zero-shot "
               "accuracy (eval), and compare pruning methods side by side (compare). Every "
               "command checks its inputs before loading the model.")
VERBOSE_HELP = "log progress details"

SUBCOMMANDS = ["eval", "prune", "heal", "sparsify", "compare"]


def _modules():
    for name in SUBCOMMANDS:
        try:
            yield name, importlib.import_module(f"gradmap.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gradmap.cli.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmap", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"gradmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _modules():
        p = module.add_parser(sub)
        # SUPPRESS: an absent -v after the command must not reset one given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command is a usage error (as argparse's own): help, exit 2
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except GradmapError as exc:
        print(f"gradmap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
