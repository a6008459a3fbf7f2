"""`--speed` and its knobs, shared by `gradmap prune` and `gradmap compare`.

Building the parser imports no torch; `speed_settings` validates the knobs before any model
is loaded (gradmap.evaluate.speed.check_speed_options), so a typo costs no load.
"""
from __future__ import annotations

import argparse

from gradmap.core.errors import GradmapError

__all__ = ["add_speed_arguments", "speed_settings", "speed_lengths"]

FLAGS = {"prefill": "--speed-prefill", "decode_tokens": "--speed-decode", "batches": "--speed-batches",
         "repeats": "--speed-repeats"}


def add_speed_arguments(p: argparse.ArgumentParser, models: str) -> None:
    """Register --speed and its knobs; `models` says what is timed, for --help."""
    p.add_argument("--speed", action="store_true",
                   help=f"also measure what pruning buys at inference: parameters, checkpoint bytes, "
                        f"prefill and decode tokens/s of {models}, timed round-robin in one run, "
                        "medians and x dense (plus llama.cpp on the GGUFs when exported and "
                        "llama-cpp-python is installed). Minutes on a CPU; see docs/guide.md")
    p.add_argument("--speed-prefill", default=None, metavar="L1,L2",
                   help="with --speed: prefill lengths, batch 1 (512,2048)")
    p.add_argument("--speed-decode", default=None, metavar="N",
                   help="with --speed: tokens generated per decode run, with the KV cache (128)")
    p.add_argument("--speed-batches", default=None, metavar="B1,B2",
                   help="with --speed: decode batch sizes (1,8)")
    p.add_argument("--speed-repeats", default=None, metavar="N",
                   help="with --speed: timed runs per figure after one warm-up; the median is "
                        "reported (3)")


def speed_settings(args: argparse.Namespace) -> dict | None:
    """None without --speed; else inference_speed's keyword settings (GradmapError on a bad knob)."""
    given = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()}
    if not args.speed:
        stray = [FLAGS[name] for name, value in given.items() if value is not None]
        if stray:
            raise GradmapError(f"{', '.join(stray)} only apply with --speed; add --speed")
        return None
    from gradmap.evaluate.speed import check_speed_options
    return check_speed_options(**{k: v for k, v in given.items() if v is not None}, flags=FLAGS)


def speed_lengths(speed: dict | None) -> dict:
    """The longest sequence --speed runs: a prefill, or the decode prompt plus its new tokens."""
    if speed is None:
        return {}
    from gradmap.evaluate.speed import PROMPT
    return {"--speed-prefill": max(speed["prefill"]),
            "--speed-decode": PROMPT + speed["decode_tokens"]}
