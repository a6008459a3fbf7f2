"""Which held-out signal picks the default's candidate right on SmolLM2 (issue 24, Part 4)?

    OMP_NUM_THREADS=1 taskset -c 1 python bench/validation_signal.py --n-prune 4 --seeds 0,1,2 \
        --out bench/results/validation_signal.jsonl

For each calibration seed (the seed study's draw: 32 x 256 C4 rows), every candidate of
`gradmap.prune.pipeline.CANDIDATES` runs alone on a fresh dense model, with the safeguard on
exactly as `auto` runs it. Each pruned model is then scored, per row, on
- the safeguard's held-out rows (the last 1/8 of the calibration rows, used by no score or fit):
  mean next-token loss (what `auto` compares today), KL(dense || pruned) over the full
  vocabulary, and the same KL with the dense top-K tokens and one bucket for the rest;
- `--extra` further C4 rows drawn with another seed (the same three signals, more rows);
- `--generated` rows sampled from the dense model itself (temperature 1, prompted with the first
  16 tokens of the extra rows): text of no particular domain, which a user always has;
- `--other` texts of another domain, the first LAMBADA passages (the experiment's check of
  "in-domain vs out-of-domain", not something a user has);
- WikiText-2 PPL (L = 2048, `--ppl-windows` windows): the ordering a signal should predict.
One JSON line per (seed, candidate); RESULTS.md reads them. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.evaluate import perplexity_report
from gradmap.experiments.dense_source import DenseSource
from gradmap.prune.pipeline import CANDIDATES, pipeline_name
from gradmap.prune.safeguard import split_holdout

TOP_K = 64


@torch.no_grad()
def log_probs(model, rows: torch.Tensor) -> list[torch.Tensor]:
    """Per row: next-token log-probabilities [L-1, V] (fp32)."""
    return [F.log_softmax(model(input_ids=r[None], use_cache=False).logits[0, :-1].float(), -1) for r in rows]


def bucket_kl(dense: torch.Tensor, pruned: torch.Tensor, k: int) -> torch.Tensor:
    """KL over the dense top-k tokens plus one bucket for the rest, per position."""
    top, idx = dense.topk(k, dim=-1)
    pm = pruned.gather(-1, idx)
    tail_d = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    tail_m = torch.log1p(-pm.exp().sum(-1).clamp(max=1 - 1e-7))
    return (top.exp() * (top - pm)).sum(-1) + tail_d.exp() * (tail_d - tail_m)


@torch.no_grad()
def generated_rows(model, prompts: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    new = length - prompts.shape[1]
    return model.generate(prompts, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                          min_new_tokens=new, attention_mask=torch.ones_like(prompts))


def other_rows(tok, n: int) -> list[torch.Tensor]:
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tasks" / "lambada_openai_test.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:n]]
    return [torch.tensor(tok(t).input_ids) for t in texts]


@torch.no_grad()
def signals(model, rows, dense: list[torch.Tensor]) -> dict[str, list[float]]:
    out = {"ce": [], "kl": [], f"kl_top{TOP_K}": []}
    for r, d in zip(rows, dense):
        lp = log_probs(model, r[None])[0]
        out["ce"].append(float(-lp.gather(-1, r[1:, None]).mean()))
        out["kl"].append(float((d.exp() * (d - lp)).sum(-1).mean()))
        out[f"kl_top{TOP_K}"].append(float(bucket_kl(d, lp, TOP_K).mean()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-prune", type=int, default=4)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--extra", type=int, default=16)
    p.add_argument("--generated", type=int, default=8)
    p.add_argument("--other", type=int, default=32)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    source = DenseSource(gradmap.load_model, "smollm2-135m", None, "cpu", "copy")
    tok = source.tokenizer
    for seed in map(int, a.seeds.split(",")):
        calib = calibration_data(tok, "c4", a.n_calib, a.seq_len, seed)
        _, hold = split_holdout(calib, 0.125)
        extra = calibration_data(tok, "c4", a.extra, a.seq_len, 1000 + seed)
        dense_model = source.reference()
        gen = generated_rows(dense_model, extra[:a.generated, :16], a.seq_len, seed)
        other = other_rows(tok, a.other)
        sets = {"holdout": hold, "extra": extra, "generated": gen, "other": other}
        dense = {k: log_probs(dense_model, v) for k, v in sets.items()}
        for cand in CANDIDATES:
            model = source.fresh()
            t = time.perf_counter()
            res = gradmap.fast_prune(model, calib, a.n_prune, metric=cand["metric"],
                                     compensation=list(cand["compensation"]), schedule=cand["schedule"],
                                     progress=False, **cand["metric_options"])
            secs = time.perf_counter() - t
            row = {"seed": seed, "n_prune": a.n_prune, "n_calib": a.n_calib, "seq_len": a.seq_len,
                   "pipeline": pipeline_name(cand), "removed_layers": list(res.removed_layers),
                   "reverted": res.safeguard.get("reverted", []), "prune_seconds": secs,
                   **{k: signals(model, v, dense[k]) for k, v in sets.items()},
                   "n_extra": a.extra, "n_generated": a.generated, "n_other": a.other, "top_k": TOP_K}
            rep = perplexity_report(model, tok, "wikitext2", seq_len=2048, max_windows=a.ppl_windows,
                                    progress=False)
            row.update(ppl=rep.ppl, ppl_windows=a.ppl_windows)
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(seed, row["pipeline"], row["removed_layers"], f"ppl {rep.ppl:.2f}",
                  {k: round(sum(v) / len(v), 4) for k, v in row["holdout"].items()}, flush=True)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
