"""Sparsity study: {uniform, OWL, MRP} × {magnitude, Wanda, SparseGPT} × sparsities, plus N:M rows,
each over several calibration seeds, with WikiText-2 perplexity, the 7-task zero-shot average and
the wall time of each `gradmap.sparsify` call.

    python bench/sparsity_allocation.py --out /tmp/sparsity.jsonl              # the full grid
    python bench/sparsity_allocation.py --out /tmp/s.jsonl --table             # mean-over-seeds table

One JSON line per (configuration, seed) is appended to --out as soon as it is measured (a rerun
skips those already there). Per-block sparsity plots of MRP at --plot-sparsity, one per score
(principle 2: the allocation depends on the score), go to --figures. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

# magnitude scores without OWL read no activations: one run stands for every seed
from gradmap.sparsity.sparsify import needs_calibration

HERE = Path(__file__).resolve().parent
SCORE_ORDER = ("magnitude", "wanda", "sparsegpt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--allocations", default="uniform,owl,mrp")
    p.add_argument("--scores", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="2:4,4:8", help="N:M rows (uniform, every score); '' for none")
    p.add_argument("--seeds", default="0,1", help="calibration sampling seeds; tables show the mean")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8, help="first N WikiText-2 windows (0: all)")
    p.add_argument("--zero-shot-limit", type=int, default=100, help="examples per task (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-sparsity", type=float, default=0.7)
    p.add_argument("--figures", default=str(HERE / "figures"))
    p.add_argument("--out", required=True, help="JSONL file the results are appended to")
    p.add_argument("--table", action="store_true", help="only print the markdown table from --out")
    args = p.parse_args()
    if args.table:
        return print(table(Path(args.out)))
    torch.set_num_threads(args.threads)
    run_grid(args)


def _configs(args):
    for s in [float(x) for x in args.sparsities.split(",") if x]:
        for alloc in args.allocations.split(","):
            for score in args.scores.split(","):
                yield dict(sparsity=s, allocation=alloc, score=score, pattern=None)
    for pattern in [x for x in args.patterns.split(",") if x]:
        n, m = map(int, pattern.split(":"))
        for score in args.scores.split(","):
            yield dict(sparsity=1 - n / m, allocation="uniform", score=score, pattern=pattern)


def _key(row: dict) -> tuple:
    return row["sparsity"], row["allocation"], row["score"], row.get("pattern"), row.get("seed")


def run_grid(args) -> None:
    from gradmap import load_model
    from gradmap.cli.sparsify import plot_sparsity
    from gradmap.core.calibration import calibration_data
    from gradmap.evaluate import perplexity_report, zero_shot
    from gradmap.sparsity import sparsify

    out = Path(args.out)
    done = {_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    windows = args.windows or None
    env = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
           "cpu": platform.processor() or platform.machine(), "load_avg_start": os.getloadavg()[0],
           "ppl_data": f"wikitext2 test, L={args.ppl_seq_len}, windows {args.windows or 'all'}",
           "zero_shot_limit": args.zero_shot_limit}

    def evaluate(row: dict) -> None:
        rep = perplexity_report(model, tok, "wikitext2", args.ppl_seq_len, windows, progress=False)
        row.update(ppl=rep.ppl, ppl_s=rep.seconds)
        if args.zero_shot_limit:
            zs = zero_shot(model, tok, "all", limit=args.zero_shot_limit, progress=False)
            row.update(zero_shot=zs["average"], zero_shot_tasks={k: v["value"] for k, v in zs["tasks"].items()},
                       zero_shot_s=zs["seconds"])
        row.update(env)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keys = ("sparsity", "allocation", "score", "pattern", "seed", "ppl", "zero_shot", "sparsify_s")
        print(json.dumps({k: row.get(k) for k in keys}), flush=True)

    if (0.0, "dense", "-", None, None) not in done:
        evaluate({"sparsity": 0.0, "allocation": "dense", "score": "-", "pattern": None, "seed": None,
                  "sparsify_s": 0.0})
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:
        calib = calibration_data(tok, "c4", args.n_samples, args.seq_len, seed=seed)
        for cfg in _configs(args):
            if _key({**cfg, "seed": seed}) in done:
                continue
            # magnitude without OWL reads no activations: another seed would repeat the same model
            if not needs_calibration(cfg["allocation"], cfg["score"]) and (
                    seed != seeds[0] or any(k[:4] == _key(cfg)[:4] for k in done)):
                continue
            model.load_state_dict(dense)
            t = time.perf_counter()
            kwargs = dict(pattern=cfg["pattern"]) if cfg["pattern"] else dict(sparsity=cfg["sparsity"],
                                                                               allocation=cfg["allocation"])
            res = sparsify(model, calib, score=cfg["score"], batch_size=args.batch_size, progress=False,
                           **kwargs)
            took = time.perf_counter() - t
            evaluate({**cfg, "seed": seed, "sparsify_s": took,
                      "calib": f"c4 {args.n_samples}x{args.seq_len} seed {seed}",
                      "overall_sparsity": res.overall_sparsity, "block_sparsity": res.block_sparsity,
                      "block_targets": res.block_targets, "layer_ids": res.layer_ids,
                      "block_redundancy": res.block_redundancy, "redundancy_std": res.redundancy_std,
                      "redundancy_range": res.redundancy_range, "timings": res.timings,
                      "mrp_steps": len(res.trajectory), "outlier_ratios": res.outlier_ratios})
            if cfg["allocation"] == "mrp" and abs(cfg["sparsity"] - args.plot_sparsity) < 1e-9 \
                    and seed == int(args.seeds.split(",")[0]):
                title = (f"{args.model}, MRP ({res.score}) at S={res.target_sparsity:g}: per-layer "
                         f"sparsity (overall {res.overall_sparsity:.4f})")
                path = Path(args.figures) / f"sparsify_mrp_{res.score}_{round(res.target_sparsity * 100)}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(plot_sparsity(res, title))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _per_seed(values: list[float], fmt: str) -> str:
    """The mean, then each seed's value in brackets (seed order), so a reader sees the spread."""
    mean = format(_mean(values), fmt)
    return mean if len(values) == 1 else f"{mean} ({' / '.join(format(v, fmt) for v in values)})"


def table(out: Path) -> str:
    """Markdown, one row per configuration: mean over seeds (each seed's value in brackets) of PPL
    and the zero-shot average, then the mean redundancy std and sparsify seconds."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r)[:4], []).append(r)
    lines = []
    dense = groups.pop((0.0, "dense", "-", None), None)
    if dense:
        zs = f", zero-shot average {dense[0]['zero_shot']:.4f}" if "zero_shot" in dense[0] else ""
        lines.append(f"Dense model: PPL {dense[0]['ppl']:.2f}{zs}.\n")
    lines += ["| sparsity | allocation | score | seeds | PPL | zero-shot avg | redundancy std | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    alloc_order = {"uniform": 0, "owl": 1, "mrp": 2}
    order = sorted(groups, key=lambda k: (k[3] is not None, k[3] or "", -k[0], SCORE_ORDER.index(k[2]),
                                          alloc_order[k[1]]))
    for key in order:
        g = sorted(groups[key], key=lambda r: r.get("seed") or 0)
        s, alloc, score, pattern = key
        zs = _per_seed([r["zero_shot"] for r in g], ".4f") if all("zero_shot" in r for r in g) else "-"
        label = pattern if pattern else f"{s:.0%}"
        seeds = ",".join(str(r.get("seed")) for r in g) if needs_calibration(alloc, score) else "none used"
        lines.append(f"| {label} | {alloc} | {score} | {seeds} | "
                     f"{_per_seed([r['ppl'] for r in g], '.1f')} | {zs} | "
                     f"{_mean([r.get('redundancy_std', float('nan')) for r in g]):.4f} | "
                     f"{_mean([r['sparsify_s'] for r in g]):.0f} |")
    return "\n".join(lines + ["", *paired(rows)])


def paired(rows: list[dict]) -> list[str]:
    """MRP against OWL and uniform on the same calibration draw: the PPL ratio and the zero-shot
    average difference per seed (the seeds both sides share), so agreement across seeds shows.
    A configuration that reads no calibration (magnitude without OWL) pairs with every seed."""
    by = {_key(r): r for r in rows if r.get("pattern") is None and r["allocation"] != "dense"}

    def at(s: float, alloc: str, score: str, seed) -> dict | None:
        if (s, alloc, score, None, seed) in by:
            return by[(s, alloc, score, None, seed)]
        if not needs_calibration(alloc, score):
            return next((r for k, r in by.items() if k[:4] == (s, alloc, score, None)), None)
        return None

    out = ["| sparsity | score | vs | PPL ratio MRP / other, per seed | zero-shot Δ points, per seed |",
           "|---|---|---|---|---|"]
    for s, score in sorted({(k[0], k[2]) for k in by if k[1] == "mrp"}, key=lambda k: (-k[0], k[1])):
        for other in ("owl", "uniform"):
            seeds = sorted({k[4] for k in by if k[0] == s and k[2] == score and k[1] in ("mrp", other)})
            pairs = [(d, at(s, "mrp", score, d), at(s, other, score, d)) for d in seeds]
            pairs = [(d, a, b) for d, a, b in pairs if a and b]
            if not pairs:
                continue
            ratio = " / ".join(f"s{d}: {a['ppl'] / b['ppl']:.3f}" for d, a, b in pairs)
            zs = " / ".join(f"s{d}: {100 * (a['zero_shot'] - b['zero_shot']):+.2f}"
                            for d, a, b in pairs if "zero_shot" in a and "zero_shot" in b)
            out.append(f"| {s:.0%} | {score} | {other} | {ratio} | {zs or '-'} |")
    return out

if __name__ == "__main__":
    main()
