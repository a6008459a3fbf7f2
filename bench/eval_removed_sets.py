"""WikiText-2 perplexity of the model with given layer sets removed (no compensation).

    python bench/eval_removed_sets.py --from-bench bench/results/prune_speed_cpu.json --windows 8 --out sets.jsonl
    python bench/eval_removed_sets.py --case sleb=4,5,13,14,15,16,17,18 --windows 16 --limit 100 --out s.jsonl

Without compensation a pruned model depends only on the removed set, so the layer sets that
a timing run chose (pytest-benchmark JSON of bench/test_prune_speed.py, `extra_info.removed`)
can be scored afterwards without re-running the metrics; `--case NAME=LAYERS` names a set by
hand (e.g. a costly method's choice, scored under a cheaper study's evaluation). `--limit N`
adds the 7-task zero-shot average on the first N examples per task (per-example correctness
kept, for paired tests). One JSON line per set is appended to --out (a rerun skips sets
already there). Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--from-bench", type=Path)
    p.add_argument("--case", action="append", default=[], help="NAME=i,j,... (repeatable)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="zero-shot examples per task (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not args.from_bench and not args.case:
        p.error("give --from-bench FILE or --case NAME=LAYERS")
    torch.set_num_threads(args.threads)

    from gradmap import load_model, remove_layers
    from gradmap.evaluate import perplexity_report, zero_shot

    cases = [(b["extra_info"]["case"], b["extra_info"]["removed"])
             for b in json.loads(args.from_bench.read_text())["benchmarks"]
             if "removed" in b["extra_info"]] if args.from_bench else []
    cases += [(name, [int(i) for i in layers.split(",")])
              for name, layers in (c.split("=", 1) for c in args.case)]
    done = {json.loads(l)["case"] for l in args.out.read_text().splitlines()} if args.out.exists() else set()
    model, tok = load_model(args.model)
    for case, removed in cases:
        if case in done:
            continue
        pruned = copy.deepcopy(model)
        remove_layers(pruned, removed)
        rep = perplexity_report(pruned, tok, "wikitext2", 2048, args.windows, progress=False)
        row = {"case": case, "removed": removed, "ppl": rep.ppl, "windows": args.windows,
               "source": str(args.from_bench or "--case")}
        if args.limit:
            zs = zero_shot(pruned, tok, "all", limit=args.limit, progress=False, per_example=True)
            row.update(average=zs["average"], tasks={t: e["value"] for t, e in zs["tasks"].items()},
                       zero_shot=zs, limit=args.limit)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        del pruned


if __name__ == "__main__":
    main()
