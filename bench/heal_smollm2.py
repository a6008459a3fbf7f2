"""Healing after the default 8-of-30 prune of SmolLM2-135M (issue 26, Part 2): before and after.

Two stages, each a separate process so that one stage's memory never holds two models:

    # 1. dense teacher targets, default prune, pruned weights saved, unhealed evaluation
    flock /tmp/cpu0.lock taskset -c 0 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python bench/heal_smollm2.py prune --work runs/heal --out bench/results/heal_unhealed.json
    # 2. one healing mode on the saved pruned weights, then the same evaluation
    flock /tmp/cpu0.lock taskset -c 0 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python bench/heal_smollm2.py heal --mode compensation --steps 40 --lr 1e-3 \
        --work runs/heal --out bench/results/heal_compensation.json

Stage 1 computes the dense model's top-K next-token log-probs on the calibration rows once
(`gradmap.healing.teacher_targets`, saved beside the pruned weights), prunes with the default
(`fast_prune(model, calib, 8)`), saves the pruned model and evaluates it. Stage 2 loads the
pruned model and the cached teacher targets (no dense model in memory), heals and evaluates.
Evaluation: WikiText-2 PPL (L = 2048, first --ppl-windows windows) and LAMBADA on the first
--limit texts, with seconds. `heal --curve 40,160,...` also evaluates the state after each of those
steps inside the one run (heal's on_eval; with a constant learning rate that is the model a run of
that many steps would end with, before early stopping picks among the held-out checks): a budget
curve whose healing seconds leave out the evaluations. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.evaluate import perplexity_report, zero_shot


SEVEN = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def evaluate(model, tokenizer, args) -> dict:
    start = time.perf_counter()
    zs = zero_shot(model, tokenizer, "lambada_openai", limit=args.limit, batch_size=args.eval_batch, progress=False,
                   per_example=True)
    lam = dict(zs["lambada_openai"], seconds=time.perf_counter() - start)
    start = time.perf_counter()
    rep = perplexity_report(model, tokenizer, "wikitext2", seq_len=2048, max_windows=args.ppl_windows,
                            progress=False)
    out = {"lambada": lam, "wikitext2": dict(rep.as_dict(), seconds=time.perf_counter() - start)}
    if args.task_limit:
        start = time.perf_counter()
        zs = zero_shot(model, tokenizer, SEVEN, limit=args.task_limit, batch_size=args.eval_batch, progress=False,
                       per_example=True)
        out["tasks"] = {"tasks": zs["tasks"], "average": zs["average"], "seconds": time.perf_counter() - start}
    return out


def fwd_bwd_floor(model, calib) -> float:
    """Seconds of one forward+backward of the dense model over every calibration row (one row at a
    time, as healing runs): the unit of the issue's budget."""
    start = time.perf_counter()
    for r in range(calib.shape[0]):
        loss = model(input_ids=calib[r:r + 1], labels=calib[r:r + 1], use_cache=False).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def header(args) -> dict:
    import transformers
    return {"command": shlex.join(["python"] + sys.argv),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "affinity": sorted(os.sched_getaffinity(0)),
                        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "gradmap": gradmap.__version__}}


def stage_prune(args, out: dict) -> None:
    from gradmap.healing import teacher_targets
    model, tok = gradmap.load_model(args.model)
    calib = calibration_data(tok, "c4", n_samples=args.n_calib, seq_len=args.seq_len, seed=args.seed)
    # healing text: the calibration rows, or --heal-rows fresh C4 windows of another draw
    heal_ids = calib if not args.heal_rows else calibration_data(
        tok, "c4", n_samples=args.heal_rows, seq_len=args.seq_len, seed=args.seed + 1000)
    if args.heal_source == "self":  # self-distillation: the dense model continues each row's first 16 tokens
        from gradmap.healing import self_generated
        start = time.perf_counter()
        heal_ids = self_generated(model, heal_ids, prefix=16, seed=args.seed + 1000)
        out["self_generated"] = {"seconds": time.perf_counter() - start,
                                 "first_rows": tok.batch_decode(heal_ids[:3])}
    out["fwd_bwd_floor_seconds"] = fwd_bwd_floor(model, calib)
    start = time.perf_counter()
    targets = teacher_targets(model, heal_ids, k=args.top_k)
    out["teacher_seconds"] = time.perf_counter() - start
    out["heal_rows"] = heal_ids.shape[0]
    torch.save({"calib": heal_ids, "calib_tokens": calib.numel(), "floor": out["fwd_bwd_floor_seconds"],
                "teacher_seconds": out["teacher_seconds"], "targets": targets.state_dict()},
               args.work / "teacher.pt")
    start = time.perf_counter()
    from gradmap.experiments.methods import parse_method
    res = gradmap.fast_prune(model, calib, args.n_prune, progress=False, **parse_method(args.method).prune_kwargs())
    out["prune"] = {"wall_seconds": time.perf_counter() - start, "removed_layers": sorted(res.removed_layers),
                    "summary": res.compensation_summary()}
    gradmap.save_pretrained(model, tok, args.work / "pruned", report=res.to_dict(), overwrite=True)
    out["unhealed"] = evaluate(model, tok, args)


def stage_heal(args, out: dict) -> None:
    from gradmap.healing import TeacherTargets, heal
    model, tok = gradmap.load_model(str(args.work / "pruned"))
    saved = torch.load(args.work / "teacher.pt")
    targets = TeacherTargets.from_state_dict(saved["targets"])
    curve_steps = sorted({int(x) for x in args.curve.split(",")}) if args.curve else []
    steps = max(curve_steps + [args.steps])
    options = json.loads(args.options)
    if curve_steps and any(s % options.get("eval_every", 40) for s in curve_steps):
        raise SystemExit("--curve steps must be multiples of eval_every (40 unless --options sets it)")
    teacher_seconds = saved.get("teacher_seconds", 0.0)
    if options.get("seam_mse", 0) > 0:  # the seam loss needs the dense states at this prune's seams: one more pass
        from gradmap.core.adapter import get_adapter
        from gradmap.healing import teacher_targets
        from gradmap.healing.seams import seam_layers
        dense, _ = gradmap.load_model(args.model)
        t0 = time.perf_counter()
        targets = teacher_targets(dense, saved["calib"], k=args.top_k, hidden_at=seam_layers(get_adapter(model)))
        teacher_seconds = time.perf_counter() - t0  # top-K and the seam states in one pass, as `gradmap heal`
        del dense
    out["curve"], spent = [], {"eval": 0.0}
    calib_tokens, floor = saved.get("calib_tokens", saved["calib"].numel()), saved.get("floor", float("nan"))
    start = time.perf_counter()

    def observe(m, step, kl):
        if step not in curve_steps:
            return
        t0 = time.perf_counter()
        healing = t0 - start - spent["eval"]
        point = {"step": step, "heldout_kl": kl, "heal_seconds": healing,
                 "trained_tokens_x_calib": step * args.batch_rows * saved["calib"].shape[1] / calib_tokens,
                 "total_x_floor": (healing + teacher_seconds) / floor, **evaluate(m, tok, args)}
        out["curve"].append(point)
        spent["eval"] += time.perf_counter() - t0
        # every point on disk as it comes: a run cut short (a session's end) keeps what it measured
        partial = args.out.with_name(args.out.stem + ".partial.json")
        partial.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(json.dumps({k: point[k] for k in ("step", "heldout_kl", "total_x_floor")} |
                         {"ppl": point["wikitext2"]["ppl"], "lambada": point["lambada"]["acc"]}), flush=True)

    rep = heal(model, saved["calib"], teacher=targets, train=args.mode, steps=steps, lr=args.lr,
               batch_rows=args.batch_rows, seed=args.seed, progress=False, on_eval=observe, **options)
    out["heal"] = dict(rep.to_dict(), wall_seconds=time.perf_counter() - start - spent["eval"],
                       curve_eval_seconds=spent["eval"])
    if "floor" in saved:  # the budget in the unit: × one forward+backward over the calibration set
        out["budget"] = {"trained_tokens_x_calib": rep.tokens / saved["calib_tokens"],
                         "heal_x_floor": out["heal"]["wall_seconds"] / saved["floor"],
                         "teacher_x_floor": teacher_seconds / saved["floor"],
                         "total_x_floor": (out["heal"]["wall_seconds"] + teacher_seconds) / saved["floor"]}
    last = out["curve"][-1] if out["curve"] else {}
    if last.get("step") == rep.best_step:  # the kept state was just evaluated: don't evaluate it twice
        out["healed"] = {k: last[k] for k in ("lambada", "wikitext2", "tasks") if k in last}
    else:
        out["healed"] = evaluate(model, tok, args)


def stage_dense(args, out: dict) -> None:
    model, tok = gradmap.load_model(args.model)
    out["dense"] = evaluate(model, tok, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prune", "heal", "dense"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-prune", type=int, default=8)
    p.add_argument("--method", default="auto", help="the pruning pipeline, a compare method string (auto)")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--mode", default="compensation")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--curve", default="", help="heal: also evaluate after these steps (comma list, multiples of "
                   "eval_every); the run lasts until the largest")
    p.add_argument("--options", default="{}", help="further heal() options as JSON")
    p.add_argument("--limit", type=int, default=500, help="first N LAMBADA texts")
    p.add_argument("--eval-batch", type=int, default=32,
                   help="LAMBADA / task batch (8 for Gemma 3: its 262k-token logits)")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--task-limit", type=int, default=0, help="also the 7 tasks on their first N examples")
    p.add_argument("--heal-rows", type=int, default=0,
                   help="heal on N fresh C4 windows (draw seed + 1000) instead of the calibration rows")
    p.add_argument("--heal-source", choices=["c4", "self"], default="c4",
                   help="prune: the healing rows as drawn (c4), or written by the dense model from their first 16 "
                        "tokens (self)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = header(args)
    start = time.perf_counter()
    {"prune": stage_prune, "heal": stage_heal, "dense": stage_dense}[args.stage](args, out)
    out["total_seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "versions")}, indent=1, default=str))


if __name__ == "__main__":
    main()
