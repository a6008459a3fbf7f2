"""Multi-seed quality study (issue 14): every pipeline on several calibration draws.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/seed_study.py --seeds 0,1,2 --n-prune 8 \
        --n-calib 32 --seq-len 256 --ppl-windows 16 --limit 100 \
        --pipelines gradmap+projection,block-influence+magnitude --out runs/study.jsonl

Appends one JSON line per finished run to --out and skips runs already there with the same
settings, so a stopped study resumes where it stopped. Line kinds: "dense" (once: PPL and
zero-shot of the unpruned model, independent of the seed), "floor" (per seed: one plain
forward+backward over that seed's calibration set, the unit of cost) and "run" (one
pipeline on one seed). Zero-shot rows keep per-example correctness, so methods can later be
compared with paired tests (McNemar, paired bootstrap) on the same examples.

Pipelines are `gradmap compare` method names (`gradmap.methods`), plus metric options in
brackets, which method names cannot spell: `gradmap(verify=4)+magnitude`. Order is
seed-major, so a study stopped early still has every pipeline on the same seeds.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.evaluate import perplexity_report, zero_shot
from gradmap.experiments.compare import FLOOR_DESCRIPTION, DenseSource, forward_backward_seconds
from gradmap.experiments.methods import parse_method
from gradmap.ops import backends  # compiled kernels or torch fallbacks: affects timings
from gradmap.runtime.batching import default_batch_size

log = logging.getLogger("seed_study")

def pipeline_kwargs(name: str) -> dict:
    """fast_prune keyword arguments for a method name, `metric(k=v,...)` options included."""
    return parse_method(name).prune_kwargs()


def evaluate(model, tokenizer, args) -> dict:
    rep = perplexity_report(model, tokenizer, "wikitext2", seq_len=2048,
                            max_windows=args.ppl_windows, progress=False)
    zs = zero_shot(model, tokenizer, "all", args.limit, args.eval_batch_size, progress=False, per_example=True)
    return {"ppl": rep.ppl, "ppl_report": rep.as_dict(),
            "tasks": {k: e["value"] for k, e in zs["tasks"].items()},
            "average": zs["average"], "zero_shot": zs}


def settings(args) -> dict:
    # rows only count as "done" for identical settings: a file never mixes protocols silently
    return {"model": args.model, "n_prune": args.n_prune, "n_calib": args.n_calib,
            "seq_len": args.seq_len, "calib": "c4", "ppl_data": "wikitext2", "ppl_seq_len": 2048,
            "ppl_windows": args.ppl_windows, "limit": args.limit,
            "eval_batch_size": args.eval_batch_size,
            # zero_shot's "all" gained LAMBADA (issue 26): rows without it are another protocol
            "tasks": "all+lambada_openai"}


def key(row: dict) -> tuple:
    return row["kind"], row.get("pipeline"), row.get("seed"), json.dumps(row["settings"], sort_keys=True)


def load_done(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("status") == "ok":  # failed rows are retried on resume
                    done[key(row)] = row
    return done


def _jsonable(obj):
    # a compensator configured with options (`replaceme(each_step=True)`) is an object in the
    # fast_prune arguments; the row records its name and options
    if hasattr(obj, "options") and hasattr(obj, "name"):
        return {"compensator": obj.name, **obj.options()}
    raise TypeError(f"cannot record {type(obj).__name__} in a result row")


def append(path: Path, row: dict) -> None:
    text = json.dumps(row, default=_jsonable)  # before opening: a bad row must not leave half a line
    with path.open("a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def provenance() -> dict:
    import transformers
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(gradmap.__file__).parent).stdout.strip()
    return {"command": shlex.join([sys.executable] + sys.argv), "cwd": os.getcwd(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "PYTHONPATH")},
            "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "gradmap": gradmap.__file__, "git_commit": commit, "extension": backends(),
            "extension_file": getattr(sys.modules.get("gradmap._C"), "__file__", None),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-prune", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None,
                   help="micro-batch of every pass (default: fast_prune's per-phase defaults)")
    p.add_argument("--pipelines", required=True, help="comma list of method names")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--prune-only", action="store_true",
                   help="time pruning against the floor and skip every evaluation (rows of kind "
                        "'cost'; the report reads only 'run' rows): re-measures cost after a speed-up "
                        "without re-running quality")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # commas inside metric options, e.g. gradmap(verify=4,verify_samples=8), are not separators
    names = [n.strip() for n in re.split(r",(?![^()]*\))", args.pipelines) if n.strip()]
    if len(set(names)) != len(names):
        raise SystemExit(f"--pipelines names a pipeline twice: {names}")
    kwargs = {n: pipeline_kwargs(n) for n in names}  # every name is checked before any work
    # --batch-size fixes the micro-batch of every pass (the recorded study used 8); without it
    # fast_prune keeps its per-phase defaults and the floor uses the runtime's backward default
    batch_size = args.batch_size
    cfg, prov = settings(args), provenance()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(args.out)
    base = {"settings": cfg, "status": "ok", **prov}

    source = DenseSource(gradmap.load_model, args.model, None, "cpu", "reload")
    tok = source.tokenizer
    kind = "cost" if args.prune_only else "run"
    if not args.prune_only and ("dense", None, None, json.dumps(cfg, sort_keys=True)) not in done:
        model = source.fresh()
        t = time.perf_counter()
        row = {"kind": "dense", **evaluate(model, tok, args)}
        row["eval_seconds"] = time.perf_counter() - t
        append(args.out, {**base, **row})
        log.info("dense: ppl %.2f, average %.4f", row["ppl"], row["average"])
        del model
        gc.collect()

    for seed in seeds:
        calib = calibration_data(tok, "c4", args.n_calib, args.seq_len, seed)
        calib_copy = calib.clone()
        floor_key = ("floor", None, seed, json.dumps(cfg, sort_keys=True))
        if floor_key not in done:
            model = source.fresh()
            floor_batch = batch_size or default_batch_size(args.seq_len, config=model.config)
            secs = forward_backward_seconds(model, calib, floor_batch)
            source.check(model)  # the floor must leave the weights dense
            done[floor_key] = {"kind": "floor", "seed": seed, "seconds": secs,
                               "batch_size": floor_batch, "description": FLOOR_DESCRIPTION}
            append(args.out, {**base, **done[floor_key]})
            log.info("seed %d: forward+backward %.1fs", seed, secs)
            del model
            gc.collect()
        floor = done[floor_key]["seconds"]
        for name in names:
            if (kind, name, seed, json.dumps(cfg, sort_keys=True)) in done:
                log.info("seed %d %s: already in %s, skipped", seed, name, args.out)
                continue
            row = {"kind": kind, "pipeline": name, "seed": seed,
                   "fast_prune": {"n_prune": args.n_prune, **pipeline_kwargs(name),
                                  "batch_size": batch_size, "protect_first": 1,
                                  "protect_last": 1}}
            model = source.fresh()  # fast_prune edits in place: every run starts dense
            try:
                t = time.perf_counter()
                # fresh compensators for every run: configured ones keep per-run state
                res = gradmap.fast_prune(model, calib, args.n_prune, **pipeline_kwargs(name),
                                         batch_size=batch_size)
                row.update(prune_wall_seconds=time.perf_counter() - t,
                           prune_seconds=res.timings["total"], floor_seconds=floor,
                           ratio_to_floor=res.timings["total"] / floor,
                           removed_layers=sorted(res.removed_layers),
                           removal_order=list(res.removed_layers), prune_result=res.to_dict())
                if not args.prune_only:
                    t = time.perf_counter()
                    row.update(evaluate(model, tok, args))
                    row["eval_seconds"] = time.perf_counter() - t
            except Exception as exc:  # one failing pipeline must not stop the others
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
                log.error("seed %d %s failed: %s", seed, name, row["error"])
            finally:
                del model
                gc.collect()
            if not torch.equal(calib, calib_copy):
                raise RuntimeError(f"{name} changed the calibration tensor in place")
            append(args.out, {**base, **row})
            if "ppl" in row or (args.prune_only and "prune_seconds" in row):
                log.info("seed %d %s: removed %s, ppl %.2f, average %.4f, prune %.1fs (%.2fx "
                         "fwd+bwd), eval %.1fs", seed, name, row["removed_layers"], row.get("ppl", float("nan")),
                         row.get("average", float("nan")), row["prune_seconds"], row["ratio_to_floor"],
                         row.get("eval_seconds", 0.0))


if __name__ == "__main__":
    main()
