"""The healing study's table (issue 26): bench/results/heal_data_*.json -> markdown, paired statistics.

    python bench/heal_report.py [--results bench/results] [--prefix heal_data_]
    python bench/heal_report.py --curve bench/results/heal_curve_s0_norms_compensation.json

The first form reads PREFIX*.json (PREFIXdense.json, PREFIXsS_VARIANT.json); the second tabulates
a budget curve (`bench/heal_smollm2.py heal --curve ...`) against its seed's unhealed run.

Every comparison is paired: the same seed's unhealed model (PPL, per-seed ratios, t interval over
seeds) and the same examples (LAMBADA and the 7 tasks: each example's difference averaged over the
seeds, normal 95% interval over the examples). The dense row is seed-independent (one run).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided t quantiles by degrees of freedom
NO_BOOLQ = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def _load(results: Path, prefix: str) -> tuple[dict, dict]:
    runs: dict[str, dict[int, dict]] = {}
    dense = None
    for f in sorted(glob.glob(str(results / f"{prefix}*.json"))):
        d = json.loads(Path(f).read_text())
        name = Path(f).stem.removeprefix(prefix)
        if name == "dense":
            dense = d["dense"]
            continue
        seed, _, variant = name.partition("_")
        runs.setdefault(variant, {})[int(seed.removeprefix("s"))] = d
    return runs, dense


def _mean_ci(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return f"{m:+.1f}"
    half = T95[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{m:+.1f} [{m - half:+.1f}, {m + half:+.1f}]"


def _correct(ev: dict, task: str) -> list[int]:
    if task == "lambada":
        return ev["lambada"]["correct"]["acc"]
    t = ev["tasks"]["tasks"][task]
    return t["correct"][t["metric"]]


def _paired(pairs: list[tuple[list[int], list[int]]]) -> str:
    """Mean per-example difference (points) of b − a with a normal 95% interval. The seeds score the
    same examples, so each example's difference is averaged over the seeds first and the interval
    is over examples (n = examples, not examples × seeds)."""
    n = len(pairs[0][0])
    diffs = [statistics.fmean(b[i] - a[i] for a, b in pairs) for i in range(n)]
    m = statistics.fmean(diffs)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(n)
    return f"{100 * m:+.1f} [{100 * (m - half):+.1f}, {100 * (m + half):+.1f}] (n={n})"


def _avg_no_boolq(ev: dict) -> list[int]:
    return [c for t in NO_BOOLQ for c in _correct(ev, t)]


def report(results: Path, prefix: str = "heal_data_") -> str:
    runs, dense = _load(results, prefix)
    lines = ["| model | seeds | WikiText-2 PPL (16 windows), per seed | PPL change vs unhealed, % [95% t] | "
             "LAMBADA acc % (n = 500 per seed) | LAMBADA vs unhealed, points [95%] | 6-task avg (no BoolQ) % | "
             "6-task vs dense, points [95%] | heal × floor (teacher incl.) |", "|" + "---|" * 9]
    if dense is not None:
        lines.append(f"| dense | — | {dense['wikitext2']['ppl']:.2f} | — | {100 * dense['lambada']['acc']:.1f} | — | "
                     f"{100 * statistics.fmean(_avg_no_boolq(dense)):.1f} | — | — |")
    order = sorted(runs, key=lambda v: (v.startswith("gradmap_projection"), not v.endswith("unhealed"), v))
    for variant in order:
        by_seed = runs[variant]
        # a pipeline's own unhealed run is its base (the default's: "unhealed")
        base = runs.get("gradmap_projection_unhealed" if variant.startswith("gradmap_projection") else "unhealed", {})
        unhealed = variant.endswith("unhealed")
        seeds = sorted(s for s in by_seed if s in base)
        if not seeds:
            continue
        ev = {s: by_seed[s]["unhealed" if unhealed else "healed"] for s in seeds}
        ppl = [ev[s]["wikitext2"]["ppl"] for s in seeds]
        change = [100 * (ev[s]["wikitext2"]["ppl"] / base[s]["unhealed"]["wikitext2"]["ppl"] - 1) for s in seeds]
        lam = statistics.fmean(c for s in seeds for c in _correct(ev[s], "lambada"))
        lam_vs = _paired([(_correct(base[s]["unhealed"], "lambada"), _correct(ev[s], "lambada")) for s in seeds])
        avg6 = statistics.fmean(c for s in seeds for c in _avg_no_boolq(ev[s]))
        vs_dense = _paired([(_avg_no_boolq(dense), _avg_no_boolq(ev[s])) for s in seeds]) if dense else "—"
        budget = [by_seed[s].get("budget", {}).get("total_x_floor") for s in seeds]
        cost = "—" if None in budget else ", ".join(f"{b:.1f}" for b in budget)
        lines.append(f"| {variant} | {','.join(map(str, seeds))} | {', '.join(f'{p:.2f}' for p in ppl)} | "
                     f"{'—' if unhealed else _mean_ci(change)} | {100 * lam:.1f} | "
                     f"{'—' if unhealed else lam_vs} | {100 * avg6:.1f} | {vs_dense} | {cost} |")
    return "\n".join(lines)


def curve(path: Path, results: Path) -> str:
    """One row per evaluated step of a --curve run, paired with the seed's unhealed run (same examples)."""
    d = json.loads(path.read_text())
    seed = d["settings"]["seed"]
    base = json.loads((results / f"heal_data_s{seed}_unhealed.json").read_text())["unhealed"]
    dense_file = results / "heal_data_dense.json"
    dense = json.loads(dense_file.read_text())["dense"] if dense_file.exists() else None
    lines = ["| step | tokens × calib set | × floor (teacher incl.) | held-out KL | WikiText-2 PPL | vs unhealed | "
             "LAMBADA % | vs unhealed, points [95%] | 6-task avg % | vs dense, points [95%] |", "|" + "---|" * 10]
    lines.append(f"| 0 (unhealed) | 0 | — | {d['heal']['holdout'][0]['kl']:.3f} | {base['wikitext2']['ppl']:.2f} | — | "
                 f"{100 * base['lambada']['acc']:.1f} | — | {100 * statistics.fmean(_avg_no_boolq(base)):.1f} | "
                 f"{_paired([(_avg_no_boolq(dense), _avg_no_boolq(base))]) if dense else '—'} |")
    for pt in d["curve"]:
        lam = _paired([(_correct(base, "lambada"), _correct(pt, "lambada"))])
        vs_dense = _paired([(_avg_no_boolq(dense), _avg_no_boolq(pt))]) if dense else "—"
        lines.append(f"| {pt['step']} | {pt['trained_tokens_x_calib']:.0f} | {pt['total_x_floor']:.1f} | "
                     f"{pt['heldout_kl']:.3f} | {pt['wikitext2']['ppl']:.2f} | "
                     f"{100 * (pt['wikitext2']['ppl'] / base['wikitext2']['ppl'] - 1):+.1f}% | "
                     f"{100 * pt['lambada']['acc']:.1f} | {lam} | {100 * statistics.fmean(_avg_no_boolq(pt)):.1f} | "
                     f"{vs_dense} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--prefix", default="heal_data_", help="raw files PREFIX*.json (heal_gemma3_ for Gemma 3)")
    p.add_argument("--curve", type=Path, default=None, help="a --curve run's JSON: its budget table instead")
    args = p.parse_args()
    print(curve(args.curve, args.results) if args.curve else report(args.results, args.prefix))


if __name__ == "__main__":
    main()
