"""Does the default's held-out check pick the candidate that is better on data it never saw?

    OMP_NUM_THREADS=1 taskset -c 0 python bench/validation_agreement.py --out bench/results/validation_agreement.jsonl

For each family's tiny "realistic" model (tests/test_pipeline_safeguard.py: norm scales far from
1, a near-dead and a massive channel, trained on a Markov chain), several calibration seeds and
removal counts, it runs `fast_prune` with the default ("auto"), then every candidate alone, and
scores each on 64 independent rows of the same chain. A row agrees when the chosen candidate has
the lower independent loss (ties within 1e-4 count as agreement). Tiny models only: a proxy for
the question on real models, which needs one full study per model and depth.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_compensation import markov_ids  # noqa: E402
from test_pipeline_safeguard import mean_loss, realistic_model  # noqa: E402
from tiny import FAMILIES  # noqa: E402

from gradmap import fast_prune  # noqa: E402
from gradmap.experiments.methods import parse_method  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-prune", default="1,2,3")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--holdout", type=float, default=0.125)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    test = markov_ids(64, 32, 99)
    rows = []
    for family in a.families.split(","):
        dense = realistic_model(family)
        for seed in map(int, a.seeds.split(",")):
            calib = markov_ids(a.n_calib, 32, 100 + seed)
            for n in map(int, a.n_prune.split(",")):
                r = fast_prune(copy.deepcopy(dense), calib, n, progress=False, holdout=a.holdout)
                auto = r.options["auto"]
                indep = {}
                for c in auto["candidates"]:
                    m = copy.deepcopy(dense)
                    fast_prune(m, calib, n, progress=False, holdout=a.holdout, **parse_method(c["pipeline"]).prune_kwargs())
                    indep[c["pipeline"]] = mean_loss(m, test)
                best = min(indep.values())
                row = {"family": family, "seed": seed, "n_prune": n, "n_calib": a.n_calib, "holdout_fraction": a.holdout,
                       "chosen": auto["chosen"],
                       "holdout": {c["pipeline"]: c["holdout_loss"] for c in auto["candidates"]},
                       "independent": indep, "agrees": indep[auto["chosen"]] <= best + 1e-4}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    agree = sum(r["agrees"] for r in rows)
    regret = [r["independent"][r["chosen"]] - min(r["independent"].values()) for r in rows]
    print(f"agreement {agree}/{len(rows)}; mean regret {sum(regret) / len(regret):.4f} nats, "
          f"max {max(regret):.4f}")


if __name__ == "__main__":
    main()
