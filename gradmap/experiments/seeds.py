"""`gradmap compare --seeds 0,1,2`: every method on one calibration draw per seed.

The evaluation data (PPL windows, zero-shot examples) is the same for every seed; only the
calibration set is redrawn (`calibration_data(..., seed=s)`), so the spread over seeds is
the calibration noise the issue asks about. Per seed: one forward+backward floor on that
seed's calibration set (the unit of cost), then every method from the pristine dense
weights. The dense model is evaluated once. Zero-shot keeps per-example correctness, so
methods are compared with paired tests on the same examples (`gradmap.experiments.paired`).

results.json holds the raw per-seed rows (`runs`), the dense row, the floor of every seed
and the `summary` (levels over seeds, paired differences from the reference, Jaccard
overlap of removed layers); results.md the table. Both are rewritten after every run.
"""
from __future__ import annotations

import gc
import os
import logging
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any


from gradmap.core.checkpoint import write_file_atomic
from gradmap.core.errors import GradmapError
from gradmap.core.result import json_text
from gradmap.evaluate.intervals import accuracy_text
from gradmap.experiments.compare import (FLOOR_DESCRIPTION, CompareConfig, DenseSource,
                                         environment, evaluate_model, forward_backward_seconds,
                                         prune_row, run_method)
from gradmap.experiments.dense_source import check_calibration_untouched
from gradmap.experiments.compare_checks import check_before_loading, open_results_dir
from gradmap.experiments.methods import MethodSpec, parse_methods
from gradmap.experiments.seed_table import (SeedRun, markdown_seed_table, method_lines, summarize,
                                            zero_shot_fields)

__all__ = ["run_seed_compare", "parse_seeds", "seed_runs"]

log = logging.getLogger(__name__)


def parse_seeds(seeds: str | list[int]) -> list[int]:
    """'0,1,2' or [0, 1, 2] -> [0, 1, 2]; distinct non-negative integers, at least one."""
    bad = GradmapError(f"--seeds {seeds!r}: give non-negative integers separated by commas, "
                       "e.g. --seeds 0,1,2")
    if isinstance(seeds, str):
        items = [s.strip() for s in seeds.split(",") if s.strip()]
        if not all(s.isdigit() for s in items):
            raise bad
        out = [int(s) for s in items]
    else:
        out = list(seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in out):
            raise bad
    if not out:
        raise GradmapError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2")
    if any(s < 0 for s in out) or len(set(out)) != len(out):
        raise GradmapError(f"--seeds {seeds!r}: seeds must be distinct non-negative integers")
    return out


def _reference(specs: list[MethodSpec], reference: str | None) -> str:
    names = [s.name for s in specs]
    if reference is None:
        return names[0]
    for s in specs:
        if reference in (s.name, s.label):
            return s.name
    raise GradmapError(f"--reference {reference!r} is not among the methods {names}; name one "
                       "of them")


def seed_runs(results: dict[str, Any]) -> list[SeedRun]:
    """The rows of a seed comparison in the table's form (finished and failed ones)."""
    out = []
    for row in results["runs"]:
        if row["status"] not in ("ok", "failed"):
            continue
        out.append(SeedRun(
            method=row["method"], seed=row["seed"], ok=row["status"] == "ok", ppl=row.get("ppl"),
            task_values=dict(row.get("tasks") or {}),
            seconds=(row.get("timings") or {}).get("total"),
            ratio_to_floor=row.get("ratio_to_floor"), removed_layers=row.get("removed_layers"),
            **zero_shot_fields(row.get("zero_shot"))))
    return out


def _settings_lines(results: dict[str, Any]) -> list[str]:
    s, dense = results["settings"], results.get("dense") or {}
    lines = [f"# gradmap compare over seeds: {s['model']}, {s['n_prune']} of "
             f"{results.get('dense_layers', '?')} layers removed", "",
             f"- calibration: {s['calib']}, {s['n_calib']} x {s['seq_len']} tokens, one draw per "
             f"seed {s['seeds']}; micro-batch {s.get('batch_size')}; reference {s['reference']}"]
    ppl = dense.get("ppl_report")
    if ppl:
        lines.append(f"- PPL: {ppl['data']}, L={ppl['seq_len']}, {ppl['windows']} windows "
                     f"({'all' if s['ppl_windows'] is None else '--ppl-windows'}), "
                     f"dense {dense['ppl']:.2f}")
    if s.get("tasks"):
        limit = "all examples" if s["limit"] is None else f"first {s['limit']} examples (--limit)"
        avg = dense.get("average")
        lines.append(f"- zero-shot: {', '.join(s['tasks'])}; {limit} per task; accuracy in %"
                     + (f"; dense average {100 * avg:.2f}" if avg is not None else ""))
        lam = (dense.get("zero_shot") or {}).get("lambada_openai")
        if lam:
            lines.append(f"- LAMBADA (beside the averages): {lam['n']} texts; dense acc "
                         f"{accuracy_text(lam['acc'], lam['n'], 2)} % (95% Wilson), PPL {lam['ppl']:.2f}")
    floors = results["floor"].get("seconds") or {}
    if floors:
        lines.append("- floor seconds per seed: " + ", ".join(f"{k}: {v:.2f}"
                                                             for k, v in floors.items()))
    return lines


def _write(out: Path, results: dict[str, Any]) -> None:
    runs = seed_runs(results)
    if runs:
        results["summary"] = summarize(runs, results["settings"]["methods"],
                                       results["settings"]["reference"])
    parts = ["\n".join(_settings_lines(results))]
    if results.get("summary"):
        parts += [markdown_seed_table(results["summary"]), "\n".join(method_lines(results["summary"]))]
    if results["status"] != "complete":
        parts.append(f"- run status: {results['status']} (rewritten after every run)")
    write_file_atomic(out / "results.json", json_text(results).encode("utf-8"))
    write_file_atomic(out / "results.md", ("\n\n".join(parts) + "\n").encode("utf-8"))


def run_seed_compare(cfg: CompareConfig, seeds: str | list[int], out_dir: str | Path,
                     reference: str | None = None, progress: bool = True,
                     loader: Callable[..., tuple[Any, Any]] | None = None,
                     prune_fn: Callable[..., Any] | None = None,
                     on_update: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every method of `cfg` on every seed's calibration draw; returns results.json's dict.

    `cfg.seed` is ignored (the seeds are `seeds`); `save_dir` and `generate` are refused
    (which seed's model would they be?). Everything is validated before the model loads.
    """
    from gradmap.evaluate.tasks import resolve_tasks

    seeds = parse_seeds(seeds)
    specs = parse_methods(cfg.methods)
    ref = _reference(specs, reference)
    if cfg.save_dir is not None or cfg.generate is not None:
        raise GradmapError("--save and --generate keep one model; with --seeds there is one per "
                           "seed and method: run a single --seed for them")
    tasks = resolve_tasks(cfg.tasks) if cfg.tasks else None
    check_before_loading(cfg, default_loader=loader is None)
    out, lock = open_results_dir(out_dir, cfg, default_loader=loader is None)
    try:
        loader = loader or _default_loader()
        if prune_fn is None:
            from gradmap.prune.driver import fast_prune as prune_fn

        settings = asdict(cfg)
        settings.update(seed=None, seeds=seeds, reference=ref, methods=[s.name for s in specs],
                        tasks=tasks)
        results: dict[str, Any] = {"mode": "seeds", "settings": settings, "status": "running",
                                   "floor": {"description": FLOOR_DESCRIPTION, "seconds": {}},
                                   "dense": None, "runs": [], "summary": None, **environment(cfg)}

        def write() -> None:
            _write(out, results)
            if on_update is not None:
                on_update(results)

        try:
            _run_seeds(cfg, seeds, specs, tasks, results, write, loader, prune_fn, progress)
        except BaseException as exc:  # keep what finished, and say why the run stopped
            results["status"] = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                                 else f"aborted: {type(exc).__name__}: {exc}")
            for row in results["runs"]:
                if row["status"] == "running":
                    row.update(status="failed", error=f"run {results['status']}")
            write()
            raise
        results["status"] = "complete"
        write()
        return results
    finally:
        os.close(lock)


def _default_loader():
    from gradmap.core.models import load_model
    return load_model


def _run_seeds(cfg: CompareConfig, seeds: list[int], specs: list[MethodSpec], tasks, results,
               write, loader, prune_fn, progress: bool) -> None:
    from gradmap.core.calibration import calibration_data
    from gradmap.prune.driver import check_prune_plan
    from gradmap.runtime.batching import default_batch_size

    source = DenseSource(loader, cfg.model, cfg.dtype, cfg.device, cfg.restore)
    results["dense_layers"] = source.num_layers
    results["load_seconds"] = source.load_seconds
    check_prune_plan(source.layer_ids, cfg.n_prune, cfg.protect_first, cfg.protect_last)
    model = source.fresh()
    # with batch_size None each method keeps fast_prune's per-phase defaults; the floor (one
    # forward + backward) uses fast_prune's backward default
    floor_batch = cfg.batch_size or default_batch_size(cfg.seq_len, config=model.config)
    results["settings"]["batch_size"] = cfg.batch_size
    results["settings"]["floor_batch_size"] = floor_batch
    # the evaluation data does not depend on the seed: the dense model is evaluated once
    results["dense"] = evaluate_model(model, source.tokenizer, cfg, tasks, progress,
                                      per_example=True)
    del model
    write()
    for seed in seeds:
        calib = calibration_data(source.tokenizer, cfg.calib, n_samples=cfg.n_calib,
                                 seq_len=cfg.seq_len, seed=seed)
        calib_copy = calib.clone()
        model = source.fresh()
        floor = forward_backward_seconds(model, calib, floor_batch)
        source.check(model)  # the floor measurement must leave the weights as they were
        del model
        results["floor"]["seconds"][str(seed)] = floor
        context = {"floor": {"seconds": floor}, "dense": results["dense"]}
        for spec in specs:
            row = {**prune_row(spec), "seed": seed}
            results["runs"].append(row)
            model = source.fresh()
            try:
                run_method(model, source.tokenizer, calib, spec, row, cfg, tasks, prune_fn,
                           progress, context, per_example=True)
            except Exception as exc:  # one failing run must not lose the others
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
                log.error("seed %d, method %s failed: %s", seed, spec.name, row["error"])
            finally:
                del model
                gc.collect()
            check_calibration_untouched(calib, calib_copy, spec.name)
            write()
