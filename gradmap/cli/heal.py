"""`gradmap heal`: heal a checkpoint gradmap pruned earlier, against its dense model, into a new folder.

The dense teacher is loaded first, writes its top-K log-probs on the healing rows (and, with
`--heal-data self`, the rows themselves) and is freed before the pruned model loads: never two
models in memory. The output is a plain checkpoint like `prune`'s; the input is never changed.
"""
from __future__ import annotations

import argparse
import time

from gradmap.cli.checks import DTYPES, add_overwrite_arguments, check_context, overwrite_mode, positive, run_on_ranks
from gradmap.core.errors import GradmapError

__all__ = ["add_parser", "run"]

COMPENSATION_MODES = ("compensation", "norms+compensation")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "heal", help="distil a pruned checkpoint towards its dense model, folded into plain weights",
        description="Heal a checkpoint `gradmap prune` saved: top-K KL distillation towards the dense "
                    "model (--teacher) on fresh rows, left as plain weights in --out (docs/guide.md, "
                    "'Healing'). `gradmap prune --heal` does the same in one run.")
    p.add_argument("--model", required=True, help="the pruned checkpoint (a folder `gradmap prune` wrote)")
    p.add_argument("--teacher", required=True,
                   help="the dense model it was pruned from: hub id, HF folder, .gguf file or alias")
    p.add_argument("--out", required=True, help="output directory for the healed checkpoint")
    p.add_argument("--mode", default="norms+compensation",
                   help="what trains: norms+compensation (default), compensation, lora or partial")
    p.add_argument("--heal-option", action="append", default=[], metavar="KEY=VALUE",
                   help="healing option, repeatable (e.g. steps=320, lr=3e-4, top_k=128, seed=0, seam_mse=1.0)")
    p.add_argument("--heal-data", default="c4", metavar="SOURCE",
                   help="healing text: c4 (default), wikitext2, a .jsonl/.txt path, or 'self' (the dense "
                        "model continues the first 16 tokens of each c4 row)")
    p.add_argument("--heal-rows", type=int, default=None, help="healing rows (256)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per healing row (256)")
    p.add_argument("--seed", type=int, default=0, help="row draw (seed + 1000, as prune --heal) and training seed")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load both models in this dtype")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_overwrite_arguments(p, "a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _check_pair(model: str, teacher: str, opts) -> list[int] | None:
    """From config.json / GGUF headers only: the pruned model's layers are a strict subset of the teacher's.
    Returns the seams (original ids of kept layers right after removed ones), None when unknown."""
    from gradmap.core.models import model_layer_ids
    mode = opts.train
    kept, dense = model_layer_ids(model), model_layer_ids(teacher)
    if kept is None or dense is None:
        return None  # a hub id not cached yet: checked after loading
    if len(kept) >= len(dense) or max(kept) >= len(dense):
        raise GradmapError(f"--model has {len(kept)} layers (original ids up to {max(kept)}) but --teacher has "
                           f"{len(dense)}: --teacher must be the dense model --model was pruned from")
    if mode in COMPENSATION_MODES and all(b - a == 1 for a, b in zip(kept, kept[1:])):
        raise GradmapError(f"--mode {mode} trains a map where layers were removed, and --model records no gap "
                           "between kept layers (only the last layers removed, or not pruned by gradmap); use "
                           "--mode lora or partial")
    from gradmap.healing.seams import seams_of
    seams = seams_of(kept)
    if opts.seam_mse > 0 and not seams:
        raise GradmapError("--heal-option seam_mse needs a kept layer right after removed ones, and --model records "
                           "none (only the last layers removed, or not pruned by gradmap); leave seam_mse out")
    return seams


def run(args: argparse.Namespace) -> int:
    return run_on_ranks(args, _run)


def _run(args: argparse.Namespace, device: str) -> int:
    from gradmap.cli.prune import SELF, SELF_PREFIX, parse_options
    from gradmap.core import distributed
    from gradmap.core.calibration import calibration_data, check_seed, check_source
    from gradmap.core.checkpoint import prepare_output_dir, save_pretrained
    from gradmap.core.models import load_model
    from gradmap.core.output_paths import input_paths
    from gradmap.healing.options import HEAL_ROWS, heal_options

    if distributed.world_size() > 1:
        raise GradmapError("gradmap heal runs in one process; start it without torchrun")
    overwrite = overwrite_mode(args)
    source = "c4" if args.heal_data == SELF else args.heal_data
    inputs = input_paths(args.model, [source]) + input_paths(args.teacher)
    out_dir = prepare_output_dir(args.out, overwrite, inputs)
    args.heal_rows = HEAL_ROWS if args.heal_rows is None else args.heal_rows
    positive(args, "heal_rows", "seq_len")
    if args.heal_rows < 2:
        raise GradmapError(f"--heal-rows must be at least 2 (one is held out), got {args.heal_rows}")
    check_seed(args.seed)
    check_source(source, "--heal-data")
    opts = heal_options({"train": args.mode, "seed": args.seed,
                         **parse_options(args.heal_option, "--heal-option", "steps=320")})
    check_context(args.teacher, {"--seq-len": args.seq_len})
    seams = _check_pair(args.model, args.teacher, opts)
    if opts.seam_mse > 0 and seams is None:
        raise GradmapError("--heal-option seam_mse needs --model's layer ids before the teacher loads; pass the "
                           "pruned checkpoint as a local folder")
    from gradmap.healing import check_heal, self_generated, teacher_targets
    from gradmap.healing import heal as heal_fn

    t0 = time.perf_counter()
    print(f"loading the teacher {args.teacher} ...", flush=True)
    dense, tokenizer = load_model(args.teacher, dtype=args.dtype, device=device)
    print(f"drawing {args.heal_rows} x {args.seq_len} healing tokens from {source} (seed {args.seed + 1000}) ...",
          flush=True)
    rows = calibration_data(tokenizer, source, args.heal_rows, args.seq_len, args.seed + 1000)
    if args.heal_data == SELF:
        print(f"the dense model writes the healing text (first {SELF_PREFIX} tokens of each row kept) ...", flush=True)
        rows = self_generated(dense, rows, prefix=min(SELF_PREFIX, args.seq_len - 1), seed=args.seed + 1000,
                              progress=not args.no_progress)
    start = time.perf_counter()
    targets = teacher_targets(dense, rows, opts.top_k, hidden_at=seams if opts.seam_mse > 0 else ())
    teacher_seconds = time.perf_counter() - start
    vocab = dense.get_output_embeddings().weight.shape[0]
    del dense  # before the pruned model loads: one model in memory at a time
    print(f"loading the pruned model {args.model} ...", flush=True)
    model, own_tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if model.get_output_embeddings().weight.shape[0] != vocab:
        raise GradmapError(f"--model's vocabulary ({model.get_output_embeddings().weight.shape[0]} tokens) is not "
                           f"--teacher's ({vocab}): --teacher must be the dense model --model was pruned from")
    check_heal(model, opts)
    report = heal_fn(model, rows, teacher=targets, options=opts, progress=not args.no_progress)
    report.teacher_seconds = teacher_seconds
    out = save_pretrained(model, own_tokenizer or tokenizer, out_dir, overwrite=overwrite, report={
        "heal": report.to_dict() | {"summary": report.summary(), "rows": int(rows.shape[0])},
        "pruned_from": _previous_report(args.model),
        "command": {k: v for k, v in vars(args).items() if not k.startswith("_")}})
    print(report.summary())
    print(f"wall incl. loading {time.perf_counter() - t0:.1f}s; saved to {out} (report.json)")
    return 0


def _previous_report(model: str) -> dict | None:
    """The pruned checkpoint's own report.json, kept in the healed one's (what was removed, how)."""
    import json
    import os
    path = os.path.join(os.path.expanduser(model), "report.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
