"""Sparsity allocation benchmark: WikiText-2 perplexity of Wanda/magnitude pruning under
uniform / OWL / MRP allocation, and the wall time of each `gradmap.sparsify` call.

    nice .venv/bin/python bench/sparsity_allocation.py --out /tmp/sparsity.jsonl

One JSON line per configuration is appended to --out as soon as it is measured (a rerun
skips configurations already there). The per-layer sparsity plot of the first MRP run at
--plot-sparsity is written to bench/figures/. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.7,0.6,0.5")
    p.add_argument("--allocations", default="uniform,owl,mrp")
    p.add_argument("--scores", default="wanda,magnitude")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8, help="first N WikiText-2 windows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-sparsity", type=float, default=0.7)
    p.add_argument("--out", required=True, help="JSONL file the results are appended to")
    p.add_argument("--replot", action="store_true", help="only redraw the MRP figures from --out")
    p.add_argument("--table", action="store_true", help="only print the markdown tables from --out")
    args = p.parse_args()
    if args.replot:
        return replot(Path(args.out), args.plot_sparsity)
    if args.table:
        return print(table(Path(args.out)))
    torch.set_num_threads(args.threads)

    from gradmap import load_model
    from gradmap.sparsity import sparsify
    from gradmap.core.calibration import calibration_data
    from gradmap.cli.sparsify import plot_sparsity
    from gradmap.evaluate import perplexity_report

    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["sparsity"], row["allocation"], row["score"]))
    model, tok = load_model(args.model, dtype=torch.float32)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_data(tok, "c4", args.n_samples, args.seq_len, seed=0)
    env = {"torch": torch.__version__, "threads": args.threads, "cores": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "load_avg_start": os.getloadavg()[0]}

    def record(row: dict) -> None:
        row.update(env, calib=f"c4 {args.n_samples}x{args.seq_len} seed 0",
                   ppl_data=f"wikitext2 test, L={args.ppl_seq_len}, first {args.windows} windows")
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keys = ("sparsity", "allocation", "score", "ppl", "sparsify_s")
        print(json.dumps({k: row[k] for k in keys}), flush=True)

    if (0.0, "dense", "-") not in done:
        rep = perplexity_report(model, tok, "wikitext2", args.ppl_seq_len, args.windows, progress=False)
        record({"sparsity": 0.0, "allocation": "dense", "score": "-", "ppl": rep.ppl, "sparsify_s": 0.0,
                "ppl_s": rep.seconds})
    for s in [float(x) for x in args.sparsities.split(",")]:
        for alloc in args.allocations.split(","):
            for score in args.scores.split(","):
                if (s, alloc, score) in done:
                    continue
                model.load_state_dict(dense)
                t = time.perf_counter()
                res = sparsify(model, calib, s, alloc, score, batch_size=args.batch_size, progress=False)
                took = time.perf_counter() - t
                rep = perplexity_report(model, tok, "wikitext2", args.ppl_seq_len, args.windows,
                                        progress=False)
                record({"sparsity": s, "allocation": alloc, "score": score, "ppl": rep.ppl,
                        "sparsify_s": took,
                        "ppl_s": rep.seconds, "overall_sparsity": res.overall_sparsity,
                        "block_sparsity": res.block_sparsity, "block_targets": res.block_targets,
                        "layer_ids": res.layer_ids, "timings": res.timings,
                        "mrp_steps": len(res.trajectory), "outlier_ratios": res.outlier_ratios})
                if alloc == "mrp" and abs(s - args.plot_sparsity) < 1e-9:
                    _write_plot(res, plot_sparsity)


def _write_plot(res, plot_sparsity) -> None:
    title = (f"SmolLM2-135M, MRP ({res.score}) at S={res.target_sparsity:g}: per-layer sparsity "
             f"(overall {res.overall_sparsity:.4f})")
    path = HERE / "figures" / f"sparsify_mrp_{res.score}_{round(res.target_sparsity * 100)}.png"
    path.write_bytes(plot_sparsity(res, title))


def table(out: Path) -> str:
    """Markdown: PPL per (sparsity, allocation) x score, then the wall time of each sparsify call."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["sparsity"], r["allocation"], r["score"]): r for r in rows}
    allocs = [a for a in ("uniform", "owl", "mrp") if any(k[1] == a for k in by)]
    scores = [sc for sc in ("wanda", "magnitude") if any(k[2] == sc for k in by)]
    dense = by.get((0.0, "dense", "-"))
    lines = []
    if dense:
        lines.append(f"Dense model: PPL {dense['ppl']:.2f} ({dense['ppl_s']:.0f} s to evaluate).\n")
    head = " | ".join(f"{sc} PPL | {sc} time" for sc in scores)
    lines += [f"| sparsity | allocation | {head} |", "|---" * (2 + 2 * len(scores)) + "|"]
    for s in sorted({k[0] for k in by if k[0] > 0}, reverse=True):
        for a in allocs:
            cells = []
            for sc in scores:
                r = by.get((s, a, sc))
                cells += [f"{r['ppl']:.1f}", f"{r['sparsify_s']:.0f} s"] if r else ["-", "-"]
            lines.append(f"| {s:.0%} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replot(out: Path, sparsity: float) -> None:
    """Redraw the MRP per-layer figures from the recorded JSONL (no model is loaded)."""
    from gradmap.cli.sparsify import plot_sparsity
    from gradmap.sparsity.sparsify import SparsifyResult

    for line in out.read_text().splitlines():
        row = json.loads(line)
        if row["allocation"] == "mrp" and abs(row["sparsity"] - sparsity) < 1e-9:
            n = len(row["block_sparsity"])
            res = SparsifyResult("mrp", row["score"], row["sparsity"], row["overall_sparsity"],
                                 layer_ids=row.get("layer_ids", list(range(n))),
                                 block_targets=row.get("block_targets", []),
                                 block_sparsity=row["block_sparsity"])
            _write_plot(res, plot_sparsity)


if __name__ == "__main__":
    main()
