"""`gradmap sparsify`: unstructured or N:M pruning (Wanda/magnitude/SparseGPT) with uniform, OWL or MRP allocation.

The checkpoint is saved dense with zeros (a standard HF checkpoint) together with
`report.json` (the SparsifyResult, including the N:M `pattern` and the per-block redundancy
spread, plus the calibration settings) and `sparsity.png`
(achieved sparsity per decoder layer). With `--eval` the sparse model's perplexity and 7-task
zero-shot accuracy are measured after saving (a failed evaluation keeps the checkpoint) and added
to report.json under "evaluation".
"""
from __future__ import annotations

import argparse
import io
import time

from typing import TYPE_CHECKING

from gradmap.cli.checks import (add_overwrite_arguments, check_context, overwrite_mode, positive,
                                run_on_ranks)
from gradmap.core.model_checks import DTYPE_NAMES

if TYPE_CHECKING:
    from gradmap.sparsity.sparsify import SparsifyResult

__all__ = ["add_parser", "run", "plot_sparsity"]

# copies of gradmap.sparsity.sparsify's names, so `--help` needs no torch import;
# tests/test_reliability_cli.py checks they match
ALLOCATIONS = ("uniform", "owl", "mrp")
SCORES = ("wanda", "magnitude", "sparsegpt")
# None on the command line: given only with --eval (ppl-windows' own default is None: all)
EVAL_DEFAULTS = {"--ppl-data": "wikitext2", "--ppl-seq-len": 2048, "--ppl-windows": None,
                 "--tasks": "all", "--limit": 100}
OPTION_DEFAULTS = {"outlier_m": 5.0, "owl_lambda": 0.08, "mrp_delta": 0.1, "mrp_step": 0.01,
                   "mrp_cap": 0.2}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sparsify", help="zero a fraction of the decoder's linear weights",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF directory, hub id, .gguf file or alias (smollm2-135m)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="overall fraction of weights zeroed, in (0, 1) (default 0.7; with --pattern 1 - N/M)")
    p.add_argument("--allocation", default=None,
                   help=f"one of {', '.join(ALLOCATIONS)} (default mrp; uniform with --pattern)")
    p.add_argument("--pattern", default=None,
                   help="N:M semi-structured sparsity, e.g. 2:4 or 4:8 (N non-zeros in every M inputs)")
    p.add_argument("--score", default="wanda", help=f"one of {', '.join(SCORES)} (default wanda)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    add_overwrite_arguments(p, "a non-empty --out")
    p.add_argument("--calib-source", default="c4",
                   help="calibration text: c4, wikitext2 or a .jsonl/.txt path")
    p.add_argument("--n-samples", type=int, default=128, help="calibration samples (default 128, as Wanda)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="calibration micro-batch (samples)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="load dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, cuda:1, ...)")
    for key, default in OPTION_DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=default,
                       help=f"{key} (default {default}; see gradmap.sparsify)")
    p.add_argument("--eval", action="store_true",
                   help="measure the sparse model's perplexity and zero-shot accuracy (report.json)")
    p.add_argument("--ppl-data", default=None,
                   help="with --eval: perplexity data, wikitext2 (test split), c4 or a .txt/.jsonl path")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="with --eval: perplexity window length (2048)")
    p.add_argument("--ppl-windows", type=int, default=None,
                   help="with --eval: score only the first N perplexity windows (default: all)")
    p.add_argument("--tasks", default=None,
                   help="with --eval: zero-shot tasks, 'all', 'none' or a comma list (default: all 7)")
    p.add_argument("--limit", type=int, default=None,
                   help="with --eval: first N examples of each zero-shot task (100, as the sparsity "
                        "study; 0 = all)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def plot_sparsity(result: SparsifyResult, title: str | None = None) -> bytes:
    """PNG bytes: achieved sparsity per decoder layer (bars), allocated target (dots, if any), S (line)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    fig = Figure(figsize=(9, 3.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(result.block_sparsity)))
    ax.bar(x, result.block_sparsity, color="#4c72b0", label="achieved")
    values = list(result.block_sparsity)
    if result.block_targets:
        ax.plot(x, result.block_targets, "o", color="#dd8452", markersize=3, label="allocated")
        values += list(result.block_targets)
    ax.axhline(result.target_sparsity, color="k", lw=0.8, ls="--", label=f"S = {result.target_sparsity:g}")
    ax.set_xticks(x, [str(i) for i in result.layer_ids], fontsize=6)
    ax.set_xlabel("decoder layer (original index)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
    ax.set_title(title or f"{result.allocation} / {result.score}: overall {result.overall_sparsity:.4f}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    """Under `torchrun` every rank runs this; calibration is data-parallel and rank 0 writes --out."""
    return run_on_ranks(args, _run)


def _run(args: argparse.Namespace, device: str) -> int:
    from gradmap.core import distributed
    from gradmap.core.calibration import calibration_data, check_seed, check_source
    from gradmap.core.checkpoint import prepare_output_dir, save_pretrained
    from gradmap.core.models import load_model
    from gradmap.sparsity.sparsify import check_options, needs_calibration, resolve_pattern, sparsify

    from gradmap.core.output_paths import input_paths

    # everything checkable without the model is checked before any work
    _eval_arguments(args)
    overwrite = overwrite_mode(args)
    prepare_output_dir(args.out, overwrite, input_paths(args.model, [args.calib_source, args.ppl_data]))
    options = {k: getattr(args, k) for k in OPTION_DEFAULTS}
    nm, args.sparsity, args.allocation = resolve_pattern(args.pattern, args.sparsity, args.allocation)
    check_options(args.sparsity, args.allocation, args.score, args.batch_size, options)
    positive(args, "n_samples", "seq_len")
    check_seed(args.seed)
    needs_calib = needs_calibration(args.allocation, args.score)
    if needs_calib:
        check_source(args.calib_source, "--calib-source")
    if args.eval:
        _check_eval(args)
    check_context(args.model, {"--seq-len": args.seq_len if needs_calib else None,
                               "--ppl-seq-len": args.ppl_seq_len})
    from gradmap.core.config_checks import check_family, check_pattern_widths
    check_family(args.model)
    if nm is not None:
        check_pattern_widths(args.model, *nm)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    calib = (calibration_data(tokenizer, args.calib_source, args.n_samples, args.seq_len, args.seed)
             if needs_calib else None)
    result = sparsify(model, calib, args.sparsity, args.allocation, args.score,
                      pattern=args.pattern, batch_size=args.batch_size, progress=not args.no_progress,
                      **options)
    if not distributed.is_main():  # identical weights on every rank; rank 0 writes, the others wait
        distributed.barrier()
        return 0
    report = {"command": "sparsify", "model": args.model, **result.to_dict(),
              "calibration": ({"source": str(args.calib_source), "n_samples": args.n_samples,
                               "seq_len": args.seq_len, "seed": args.seed} if needs_calib else None),
              "wall_seconds": time.perf_counter() - start, "world_size": distributed.world_size()}
    kind = f"{args.score} {args.pattern}" if args.pattern else f"{args.allocation}/{args.score}"
    png = plot_sparsity(result, f"{args.model}: {kind}, "
                                f"overall sparsity {result.overall_sparsity:.4f}")
    out = save_pretrained(model, tokenizer, args.out, report=report, overwrite=overwrite,
                          extra_files={"sparsity.png": png})
    if args.eval:  # after saving, so a failing evaluation keeps the sparse checkpoint
        from gradmap.core.checkpoint import write_file_atomic
        from gradmap.core.result import json_text
        report["evaluation"] = _evaluate(model, tokenizer, args)
        write_file_atomic(out / "report.json", json_text(report).encode())
    print(f"overall sparsity {result.overall_sparsity:.4f} (target {args.sparsity}"
          + (f", pattern {args.pattern}" if args.pattern else "") + f") over "
          f"{sum(result.block_params)} weights; saved to {out}")
    print(f"block redundancy spread: std {result.redundancy_std:.4f}, max-min {result.redundancy_range:.4f}")
    per_layer = zip(result.layer_ids, result.block_sparsity)
    print("per-layer sparsity: " + " ".join(f"{i}:{s:.3f}" for i, s in per_layer))
    if args.eval:
        ev = report["evaluation"]
        line = f"perplexity {ev['ppl']:.3f} ({ev['ppl_data']})"
        if ev["zero_shot"] is not None:
            zs = ev["zero_shot"]
            if zs["tasks"]:
                line += (f"; zero-shot average {zs['average']:.4f} over {len(zs['tasks'])} tasks, "
                         f"{zs['limit'] or 'all'} examples each: "
                         + ", ".join(f"{k} {v['value']:.3f}" for k, v in zs["tasks"].items()))
            if zs.get("lambada_openai"):
                lam = zs["lambada_openai"]
                line += (f"; LAMBADA (beside the average) acc {lam['acc']:.3f} on {lam['n']} "
                         f"texts, PPL {lam['ppl']:.2f}")
        print(line)
    return 0


def _eval_arguments(args: argparse.Namespace) -> None:
    """The evaluation options apply only with --eval (they used to be ignored silently); their
    defaults are filled in here."""
    from gradmap.core.errors import GradmapError
    given = [flag for flag, value in EVAL_DEFAULTS.items()
             if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given and not args.eval:
        raise GradmapError(f"{', '.join(given)} only apply with --eval; add --eval or drop them")
    for flag, default in EVAL_DEFAULTS.items() if args.eval else ():
        if getattr(args, flag[2:].replace("-", "_")) is None:
            setattr(args, flag[2:].replace("-", "_"), default)


def _check_eval(args: argparse.Namespace) -> None:
    """The evaluation options, checked with the others before the model loads."""
    from gradmap.core.calibration import check_source
    from gradmap.core.errors import GradmapError
    from gradmap.evaluate.tasks import check_task_files

    check_source(args.ppl_data, "--ppl-data")
    positive(args, "ppl_windows")
    if args.ppl_seq_len < 2:
        raise GradmapError(f"--ppl-seq-len must be at least 2, got {args.ppl_seq_len}")
    if args.limit < 0:
        raise GradmapError(f"--limit must be 0 (all examples) or a positive integer, got {args.limit}")
    if args.tasks.strip().lower() != "none":
        check_task_files(args.tasks)


def _evaluate(model, tokenizer, args: argparse.Namespace) -> dict:
    """Perplexity and zero-shot accuracy of the sparse model, as `gradmap eval` measures them."""
    from gradmap.evaluate import perplexity_report, zero_shot

    progress = not args.no_progress
    rep = perplexity_report(model, tokenizer, args.ppl_data, args.ppl_seq_len, args.ppl_windows,
                            progress=progress)
    out = {"ppl": rep.ppl, "ppl_data": f"{rep.data}, L={rep.seq_len}, {rep.windows} windows",
           "perplexity": rep.as_dict(), "zero_shot": None}
    if args.tasks.strip().lower() != "none":
        zs = zero_shot(model, tokenizer, args.tasks, limit=args.limit or None, progress=progress)
        out["zero_shot"] = {"average": zs["average"], "limit": zs["limit"], "seconds": zs["seconds"],
                            "tasks": {k: {"metric": v["metric"], "value": v["value"], "n": v["n"],
                                          "interval": v["interval"]}
                                      for k, v in zs["tasks"].items()},
                            "lambada_openai": zs["lambada_openai"]}
    return out
