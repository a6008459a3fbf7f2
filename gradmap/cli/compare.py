"""`gradmap compare`: several pruning methods from the same dense weights, timed and evaluated."""
from __future__ import annotations

import argparse
import re

from gradmap.cli.checks import (DTYPES, add_gguf_type_argument, add_overwrite_arguments, check_gguf_output,
                                check_runtime, overwrite_mode)
from gradmap.cli.speed import add_speed_arguments, speed_settings
from gradmap.core.errors import GradmapError

__all__ = ["add_parser", "run", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("gradmap+projection,gradmap,block-influence,block-influence+magnitude,"
                   "angular+replaceme,sleb,taylor,ppl")

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gradmap compare` and its options."""
    p = subparsers.add_parser(
        "compare", help="compare pruning methods from the same dense weights",
        description="Prune the same dense model with every method (same calibration data), "
                    "time each phase, evaluate WikiText-2 perplexity and zero-shot accuracy, "
                    "and write results.md, results.json and plots into --out as methods finish. "
                    "Methods are metric[(key=value,...)][+compensation[(key=value,...)]...]"
                    "[@one-shot|@iterative]; --seeds repeats it over calibration draws.")
    p.add_argument("--model", required=True,
                   help="hub id, local HF directory, .gguf file or alias (e.g. smollm2-135m)")
    p.add_argument("--n-prune", type=int, required=True, help="decoder layers to remove")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated method names (default: {DEFAULT_METHODS})")
    p.add_argument("--tasks", default="all",
                   help="zero-shot tasks: 'all' (the seven below and LAMBADA), 'none', or a comma "
                        "list of boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa "
                        "(averaged) and lambada_openai (shown beside the average) (default: all)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples of each zero-shot task, LAMBADA included (default: all)")
    p.add_argument("--calib", default="c4", help="calibration data: c4, wikitext2 or a .jsonl/.txt")
    p.add_argument("--n-calib", type=int, default=128, help="calibration sequences (128)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="calibration sequence length (512, shorter than prune's 2048 because "
                        "compare prunes once per method; pass 2048 to match gradmap prune)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (0)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="one calibration draw per seed (same evaluation data): mean ± s.e. over "
                        "seeds and paired 95%% intervals against --reference")
    p.add_argument("--reference", default=None, metavar="METHOD",
                   help="with --seeds: the method the others are compared with (default: first)")
    p.add_argument("--ppl-data", default="wikitext2",
                   help="perplexity data: wikitext2 (test split), c4, or a .txt/.jsonl path")
    p.add_argument("--ppl-seq-len", type=int, default=2048, help="perplexity window length L (2048)")
    p.add_argument("--ppl-windows", type=int, default=None,
                   help="score only the first N perplexity windows (default: all; stated in output)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration sequences per micro-batch when pruning and for the "
                        "forward+backward floor (default: about 2048 tokens per micro-batch)")
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="zero-shot continuations per forward (32)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="load the model in this dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--protect-first", type=int, default=1, help="never remove the first N layers (1)")
    p.add_argument("--protect-last", type=int, default=1, help="never remove the last N layers (1)")
    p.add_argument("--reload", action="store_true",
                   help="reload the model for every method instead of keeping a dense copy in "
                        "memory (half the memory, slower)")
    p.add_argument("--out", default=None,
                   help="results folder (default: runs/compare-<model>-n<N>)")
    add_overwrite_arguments(p, "an existing non-empty --out (and --save) folder")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="save the pruned checkpoint of --save-method here (plain HF checkpoint)")
    p.add_argument("--save-method", default=None,
                   help="which method's model --save keeps (default: the first gradmap method)")
    p.add_argument("--save-gguf", metavar="FILE", default=None,
                   help="also write --save's model as FILE.gguf for llama.cpp (from a .gguf or HF --model)")
    add_gguf_type_argument(p, "--save-gguf")
    p.add_argument("--generate", metavar="PROMPT", default=None,
                   help="print greedy generations for PROMPT from the dense and each pruned model")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_speed_arguments(p, "the dense model and each method's pruned model")
    return p


def _default_out(model: str, n_prune: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]).strip("-") or "model"
    return f"runs/compare-{stem}-n{n_prune}"


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table (and generations); 1 when a method failed."""
    from gradmap.experiments.compare import CompareConfig, run_compare
    from gradmap.experiments.compare_report import markdown_table
    from gradmap.experiments.compare_speed import speed_markdown

    check_runtime(args)
    speed = speed_settings(args)
    if speed is not None and args.seeds is not None:
        raise GradmapError("--speed times one run's models; drop --seeds (pruned models of one depth "
                           "run at the same speed whatever the seed)")

    tasks = None if args.tasks.strip().lower() == "none" else args.tasks
    if args.seeds is not None and args.seed is not None:
        raise GradmapError("--seed and --seeds both given; pass --seeds S1,S2,... alone")
    if args.reference is not None and args.seeds is None:
        raise GradmapError("--reference compares over seeds; pass --seeds too, e.g. --seeds 0,1,2")
    if args.save_method is not None and args.save is None:
        raise GradmapError("--save-method needs --save DIR to say where the checkpoint goes")
    if args.gguf_type is not None and args.save_gguf is None:
        raise GradmapError("--gguf-type sets the type of the --save-gguf file's changed tensors; pass "
                           "--save-gguf FILE.gguf too (or drop --gguf-type)")
    if args.save_gguf is not None:
        if args.save is None:
            raise GradmapError("--save-gguf needs --save DIR (the GGUF is written next to that checkpoint)")
        from gradmap.core.output_paths import check_apart, input_paths
        check_apart({"--save": args.save, "--save-gguf": args.save_gguf})
        check_gguf_output(args.model, args.save_gguf, overwrite_mode(args), "--save-gguf",
                          input_paths(args.model, [args.calib, args.ppl_data]))
    cfg = CompareConfig(
        model=args.model, n_prune=args.n_prune, methods=args.methods, tasks=tasks,
        limit=args.limit, calib=args.calib, n_calib=args.n_calib, seq_len=args.seq_len,
        seed=args.seed or 0, ppl_data=args.ppl_data, ppl_seq_len=args.ppl_seq_len,
        ppl_windows=args.ppl_windows, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, dtype=args.dtype, device=args.device,
        protect_first=args.protect_first, protect_last=args.protect_last,
        restore="reload" if args.reload else "copy", save_dir=args.save,
        save_method=args.save_method, save_gguf=args.save_gguf, save_gguf_dtype=args.gguf_type,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens, overwrite=overwrite_mode(args), speed=speed)
    out = args.out or _default_out(args.model, args.n_prune)
    if args.seeds is not None:
        return _run_seeds(cfg, args, out)
    results = run_compare(cfg, out, progress=not args.no_progress)
    print()
    print(markdown_table(results))
    speed_section = speed_markdown(results)
    if speed_section:
        print("\n" + "\n".join(speed_section))
    print(f"\nresults: {out}/results.md, {out}/results.json"
          + "".join(f", {p}" for p in results.get("plots", {}).values()))
    if args.generate is not None:
        print(f"\ngreedy generation for {args.generate!r}:")
        print(f"  dense: {results['dense'].get('generation', '')!r}")
        for row in results["methods"]:
            if row.get("status") == "ok":
                print(f"  {row['label']}: {row.get('generation', '')!r}")
    failed = [r["label"] for r in results["methods"] if r.get("status") != "ok"]
    for row in results["methods"]:
        if row.get("saved_to"):
            print(f"\npruned checkpoint ({row['method']}): {row['saved_to']}")
        if row.get("save_error"):
            print(f"\nsaving {row['method']} failed: {row['save_error']}")
    if failed:
        print(f"\nfailed methods: {', '.join(failed)} (see results.json for tracebacks)")
    return 1 if failed or any(r.get("save_error") for r in results["methods"]) else 0


def _run_seeds(cfg, args: argparse.Namespace, out: str) -> int:
    from gradmap.experiments.seed_table import markdown_seed_table, method_lines
    from gradmap.experiments.seeds import run_seed_compare

    results = run_seed_compare(cfg, args.seeds, out, reference=args.reference,
                               progress=not args.no_progress)
    print()
    print(markdown_seed_table(results["summary"]))
    print("\n".join(method_lines(results["summary"])))
    print(f"\nresults: {out}/results.md, {out}/results.json")
    failed = [f"{r['method']} (seed {r['seed']})" for r in results["runs"] if r["status"] != "ok"]
    if failed:
        print(f"\nfailed runs: {', '.join(failed)} (see results.json for tracebacks)")
    return 1 if failed else 0
