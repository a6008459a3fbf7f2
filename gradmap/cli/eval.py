"""`gradmap eval`: paper-style perplexity and lm-eval-style zero-shot accuracy of a model."""
from __future__ import annotations

import argparse
import time

from gradmap.cli.checks import DTYPES, check_context, check_json_target, check_runtime, positive, write_json
from gradmap.core.errors import GradmapError

__all__ = ["add_parser", "run", "format_table"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gradmap eval` on the dispatcher's subparsers and return its parser."""
    p = subparsers.add_parser(
        "eval", help="perplexity and zero-shot accuracy, scored as the papers do",
        description="Perplexity (non-overlapping windows of --seq-len, paper style) and zero-shot "
                    "accuracy (as lm-evaluation-harness). With neither --ppl nor --tasks, "
                    "measures WikiText-2 perplexity.")
    p.add_argument("--model", required=True,
                   help="hub id, local HF directory, .gguf file or alias (e.g. smollm2-135m)")
    p.add_argument("--ppl", metavar="DATA",
                   help="perplexity data: wikitext2 (test split), c4, a .txt/.jsonl path, or "
                        "text:<literal text>")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window length L (2048)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="score only the first N perplexity windows (default: all)")
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks: 'all' (the seven below and LAMBADA) or a comma list of "
                        "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa "
                        "(averaged) and lambada_openai (LAMBADA, shown beside the average)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples of each zero-shot task, LAMBADA included (default: all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward for perplexity (default 1); continuations per "
                        "forward for zero-shot (default 32)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="load the model in this dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def load_model(*args, **kwargs):
    """`gradmap.core.models.load_model`, imported on first use so building the parser needs no torch."""
    from gradmap.core.models import load_model as load
    return load(*args, **kwargs)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _zero_shot_tables(res: dict) -> str:
    """The average's row, one row per task (every accuracy with its 95% interval and n), and
    LAMBADA beside the average."""
    from gradmap.evaluate.intervals import accuracy_text
    tasks = res["tasks"]
    limit = "all examples" if res["limit"] is None else f"limit {res['limit']} per task"
    blocks = [f"zero-shot accuracy (%, {limit}; [95% Wilson interval])"]
    if tasks:
        header = [f"{name} ({e['metric']})" for name, e in tasks.items()]
        header.append(f"average ({len(tasks)} tasks)")
        wide = [[f"{100 * e['value']:.2f}" for e in tasks.values()] + [f"{100 * res['average']:.2f}"]]
        detail = [[name, accuracy_text(e["acc"], e["n"], 2),
                   accuracy_text(e["acc_norm"], e["n"], 2) if "acc_norm" in e else "-", str(e["n"])]
                  for name, e in tasks.items()]
        blocks += [format_table(header, wide), format_table(["task", "acc", "acc_norm", "n"], detail)]
    lam = res.get("lambada_openai")
    if lam:
        blocks.append(format_table(
            ["LAMBADA (lambada_openai, beside the average)", "acc", "ppl", "n"],
            [["last word, greedy", accuracy_text(lam["acc"], lam["n"], 2), f"{lam['ppl']:.3f}",
              str(lam["n"])]]))
    blocks.append(f"{res['requests']} requests, {res['tokens']} tokens in {res['seconds']:.1f} s "
                  f"({res['tokens_per_s']:.0f} tokens/s)")
    return "\n\n".join(blocks)


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, load the model, evaluate, print the tables (and write JSON)."""
    from gradmap.evaluate import perplexity_report, zero_shot
    from gradmap.evaluate.perplexity import check_text
    from gradmap.evaluate.tasks import check_task_files

    positive(args, "seq_len", "max_windows", "limit", "batch_size")
    if args.tasks is not None and not args.tasks.strip():  # used to run perplexity instead
        raise GradmapError("--tasks is empty; pass 'all' or a comma list such as boolq,piqa, or "
                           "drop --tasks for perplexity only")
    tasks = check_task_files(args.tasks) if args.tasks else None  # validate before loading
    ppl_data = args.ppl if args.ppl or tasks else "wikitext2"
    if ppl_data:
        check_text(ppl_data)  # a missing file fails here, before the slow model load
    if args.json:
        check_json_target(args.json)
    check_runtime(args)
    check_context(args.model, {"--seq-len": args.seq_len if ppl_data else None})
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    out: dict = {"model": args.model, "dtype": str(next(model.parameters()).dtype),
                 "load_seconds": time.perf_counter() - start}
    blocks = []
    if ppl_data:
        rep = perplexity_report(model, tokenizer, ppl_data, seq_len=args.seq_len,
                                max_windows=args.max_windows, batch_size=args.batch_size or 1,
                                progress=not args.no_progress)
        out["perplexity"] = rep.as_dict()
        blocks.append(format_table(
            ["data", f"ppl (L={rep.seq_len})", "windows", "tokens", "seconds"],
            [[rep.data, f"{rep.ppl:.4f}", str(rep.windows), str(rep.tokens),
              f"{rep.seconds:.1f}"]]))
    if tasks:
        res = zero_shot(model, tokenizer, tasks, limit=args.limit,
                        batch_size=args.batch_size or 32, progress=not args.no_progress)
        out["zero_shot"] = res
        blocks.append(_zero_shot_tables(res))
    print(f"model: {args.model} ({out['dtype']})\n")
    print("\n\n".join(blocks))
    if args.json:
        write_json(args.json, out)
    return 0
