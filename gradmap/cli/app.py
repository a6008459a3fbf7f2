"""`gradmap` command line: one module per subcommand in gradmap/cli.

A subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import logging
import os
import sys

from gradmap.core.errors import GradmapError

SUBCOMMANDS = ["eval", "prune", "sparsify", "compare"]


def _modules():
    for name in SUBCOMMANDS:
        try:
            yield name, importlib.import_module(f"gradmap.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gradmap.cli.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmap", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _modules():
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def limit_heap_fragmentation(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so activation-sized buffers are returned to the OS when freed.

    glibc raises the threshold dynamically (up to 32 MiB) after large frees, so the
    few-MiB activations of a long CPU pruning run land on the heap and fragment it: a
    `gradmap compare` on SmolLM2 grew to 22 GiB RSS and was OOM-killed, and two
    `fast_prune` calls left 7.8 GiB resident; with a fixed 128 KiB threshold
    (MALLOC_MMAP_THRESHOLD_=131072) the same two calls left 1.8 GiB. No-op off glibc or when
    the user set the variable. Returns whether the threshold was set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_heap_fragmentation()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except GradmapError as exc:
        print(f"gradmap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
