"""Compensation figures: {metric} × {compensation} WikiText-2 perplexity of a pruned SmolLM2-135M.

For each metric, fast_prune runs once with compensation="none" (one-shot); every other
compensation then runs through fast_prune with a metric that replays those scores, so all
rows of a metric remove the same layers in the same order and scoring is paid once. (With
the default options of the three metrics the one-shot plan is lowest-score-first and does
not look at the model, so the replay is exactly what a fresh fast_prune call would remove.)

    nice .venv/bin/python bench/compensation_figures.py --n-calib 16 --seq-len 256 --windows 4 \
        --compensations none,projection-top1,projection-gap,projection-both --out phase1.jsonl
    nice .venv/bin/python bench/compensation_figures.py --n-calib 16 --seq-len 256 --windows 4 \
        --compensations magnitude,magnitude+projection,replaceme --reuse-scores phase1.jsonl \
        --skip-dense --out phase2.jsonl

Writes one JSON line per run to --out and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from gradmap import load_model
from gradmap.core.calibration import calibration_data
from gradmap.prune.compensation import get_compensator
from gradmap.evaluate import perplexity
from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.prune.driver import fast_prune

# row name -> fast_prune(compensation=...) value (built fresh for every run)
COMPENSATIONS = {
    "none": lambda: "none",
    "magnitude": lambda: "magnitude",
    "projection": lambda: "projection",
    "magnitude+projection": lambda: ["magnitude", "projection"],
    "replaceme": lambda: "replaceme",
    # Stage 2 placements (the default is chosen from these rows)
    "projection-top1": lambda: get_compensator("projection", top_m=1, per_gap=False),
    "projection-gap": lambda: get_compensator("projection", top_m=0, per_gap=True),
    "projection-both": lambda: get_compensator("projection", top_m=1, per_gap=True),
}


@dataclass
class Replay(Metric):
    """Scores recorded from an earlier fast_prune call, replayed so the removal order is identical."""

    scores: dict = field(default_factory=dict)
    label: str = ""
    name: ClassVar[str] = "replay"
    schedules: ClassVar[tuple[str, ...]] = ("one-shot",)

    def score(self, run: ScoringRun) -> dict[int, float]:
        return dict(self.scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", default="gradmap,block-influence,taylor")
    ap.add_argument("--compensations", default=",".join(COMPENSATIONS))
    ap.add_argument("--n-prune", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="/tmp/gradmap_compensation_figures.jsonl")
    ap.add_argument("--reuse-scores", default=None,
                    help="a previous --out file: replay its scores instead of scoring again")
    ap.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)

    base, tok = load_model("smollm2-135m")
    calib = calibration_data(tok, "c4", n_samples=args.n_calib, seq_len=args.seq_len, seed=0)

    def ppl(model) -> float:
        return perplexity(model, tok, "wikitext2", seq_len=2048, max_windows=args.windows, progress=False)

    def emit(row: dict) -> None:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    known = {}
    if args.reuse_scores:
        with open(args.reuse_scores) as f:
            for line in f:
                row = json.loads(line)
                if "scores" in row:
                    known[row["metric"]] = {int(k): v for k, v in row["scores"].items()}
    if not args.skip_dense:
        t = time.perf_counter()
        emit({"metric": "dense", "compensation": "-", "ppl": ppl(base), "eval_s": time.perf_counter() - t,
              "n_calib": args.n_calib, "seq_len": args.seq_len, "windows": args.windows})
    for metric in args.metrics.split(","):
        scores = known.get(metric)
        for comp in args.compensations.split(","):
            model = copy.deepcopy(base)
            m = metric if scores is None else Replay(scores=scores, label=metric)
            res = fast_prune(model, calib, args.n_prune, metric=m, compensation=COMPENSATIONS[comp](),
                             schedule="one-shot")
            if scores is None:
                scores = res.scores[0]
            t = time.perf_counter()
            value = ppl(model)
            emit({"metric": metric, "compensation": comp, "ppl": value, "eval_s": time.perf_counter() - t,
                  "removed": res.removed_layers, "timings": res.timings,
                  "scores": {str(k): v for k, v in scores.items()},
                  "n_calib": args.n_calib, "seq_len": args.seq_len, "windows": args.windows,
                  "comp_seconds": res.timings["compensation_statistics"] + res.timings["solve"],
                  "shifts": {str(k): v for k, v in res.shifts.items()},
                  "report": res.compensation_report})
            del model


if __name__ == "__main__":
    main()
