"""`gradmap compare --seeds`: statistics with known answers, method options, rerunnable
results, per-example zero-shot, the seed runner, the CLI and bench/seed_study_report.py."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random

import pytest
import torch

import gradmap.core.models
import gradmap.evaluate
from gradmap import remove_layers
from gradmap.cli import app as cli
from gradmap.core.errors import GradmapError
from gradmap.core.result import PruneResult
from gradmap.evaluate.tasks import build_examples, resolve_tasks
from gradmap.evaluate.zero_shot import correctness, encode_request, loglikelihoods, zero_shot
from gradmap.experiments.methods import (format_method, method_from_result, parse_method,
                                         parse_methods, split_methods)
from gradmap.experiments.paired import (jaccard, mean_pairwise_jaccard, mean_se,
                                        paired_bootstrap, paired_log_ppl, t_quantile)
from gradmap.experiments.seed_table import SeedRun, markdown_seed_table, summarize
from gradmap.experiments.seeds import parse_seeds, run_seed_compare
from gradmap.prune.driver import fast_prune
from test_compare import N_LAYERS, config, text_file, tiny_loader  # noqa: F401 (fixture)
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

# --- statistics with known answers ---------------------------------------------------------


def test_t_quantiles_match_the_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for dof, want in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.975, dof) == pytest.approx(want, abs=1e-3)
    assert t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)


def test_paired_log_ppl_by_hand_and_one_seed():
    ref = [100.0, 50.0, 80.0]
    d = [0.1, 0.2, 0.3]
    iv = paired_log_ppl([r * math.exp(x) for r, x in zip(ref, d)], ref)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s_d / sqrt(n)
    assert iv.estimate == pytest.approx(0.2)
    assert (iv.low, iv.high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-6)
    assert iv.verdict == "tie" and iv.method == "paired t, 2 dof"
    one = paired_log_ppl([120.0], [100.0])
    assert one.low is None and one.verdict == "n/a" and one.estimate == pytest.approx(math.log(1.2))
    assert mean_se([3.0]) == (3.0, None)
    assert mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))


def test_t_interval_covers_the_truth_95_percent_and_detects_a_shift():
    rng = random.Random(1)
    covered = 0
    for _ in range(2000):  # identical methods: log-ratios pure noise, true difference 0
        ref = [math.exp(rng.gauss(4.0, 0.3)) for _ in range(3)]
        other = [r * math.exp(rng.gauss(0.0, 0.05)) for r in ref]
        iv = paired_log_ppl(other, ref)
        covered += iv.low <= 0.0 <= iv.high
    assert 0.935 <= covered / 2000 <= 0.965
    # a constant 20% PPL increase on every seed, small noise: detected as worse (higher)
    ref = [100.0, 140.0, 90.0]
    worse = [r * 1.2 * math.exp(e) for r, e in zip(ref, (0.01, -0.02, 0.015))]
    assert paired_log_ppl(worse, ref).verdict == "higher"


def _coin(p: float, n: int, rng: random.Random) -> list[int]:
    return [int(rng.random() < p) for _ in range(n)]


def test_bootstrap_identical_methods_tie_and_a_shift_is_detected():
    rng = random.Random(2)
    ref = {t: [_coin(0.6, 200, rng) for _ in range(3)] for t in ("a", "b")}
    same = paired_bootstrap(ref, ref)
    assert same.estimate == 0.0 and same.low == 0.0 == same.high and same.verdict == "tie"
    # another model of the same quality, errors independent of the reference: a tie
    other = {t: [_coin(0.6, 200, rng) for _ in range(3)] for t in ("a", "b")}
    iv = paired_bootstrap(other, ref)
    assert iv.low < 0.0 < iv.high and iv.verdict == "tie"
    # the same model with 15% of its wrong answers per task turned right: known difference
    better = {t: [[1 if (c == 0 and i % 7 == 0) else c for i, c in enumerate(row)] for row in rows]
              for t, rows in ref.items()}
    want = sum(sum(b) - sum(r) for t in ref for b, r in zip(better[t], ref[t])) / (2 * 3 * 200)
    iv = paired_bootstrap(better, ref)
    assert iv.estimate == pytest.approx(want) and iv.low > 0 and iv.verdict == "higher"
    assert paired_bootstrap(better, ref) == iv  # fixed RNG seed: same data, same interval


def test_bootstrap_interval_covers_the_truth_about_95_percent():
    rng = random.Random(3)
    covered = 0
    for _ in range(100):  # two equally good, independent models: true difference 0
        a = {"t": [_coin(0.5, 150, rng) for _ in range(2)]}
        b = {"t": [_coin(0.5, 150, rng) for _ in range(2)]}
        iv = paired_bootstrap(a, b, samples=500, seed=rng.randrange(1 << 30))
        covered += iv.low <= 0.0 <= iv.high
    assert 88 <= covered <= 100


def test_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"a": [[1]]}, {"b": [[1]]})
    with pytest.raises(ValueError, match="equal shape"):
        paired_bootstrap({"a": [[1, 0]]}, {"a": [[1, 0, 1]]})


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert jaccard([], []) == 1.0
    assert mean_pairwise_jaccard([[1, 2], [1, 2], [3, 4]]) == pytest.approx((1 / 3, 0.0))
    assert mean_pairwise_jaccard([[1, 2]]) is None


def test_summary_table_marks_significance_and_ties():
    rng = random.Random(4)
    tasks = ("boolq", "piqa")
    base = {t: _coin(0.5, 300, rng) for t in tasks}
    runs = []
    for seed, ppl in enumerate((100.0, 130.0, 90.0)):
        for name, factor, flip in (("ref", 1.0, False), ("twin", 1.0, False),
                                   ("bad", 1.5, True)):
            correct = {t: [0 if (flip and i % 3 == 0) else c for i, c in enumerate(v)]
                       for t, v in base.items()}
            noise = 1.0 + 0.01 * (seed - 1) if name != "ref" else 1.0
            runs.append(SeedRun(name, seed, ppl=ppl * factor * noise,
                                task_values={t: sum(c) / 300 for t, c in correct.items()},
                                correct=correct, seconds=10.0 + seed, ratio_to_floor=2.0,
                                removed_layers=[1, 2] if seed < 2 or name == "ref" else [2, 3]))
    s = summarize(runs, reference="ref")
    rows = {r["method"]: r for r in s["methods"]}
    assert rows["ref"]["vs_reference"] is None and rows["ref"]["jaccard"]["mean"] == 1.0
    assert rows["bad"]["vs_reference"]["ppl"]["verdict"] == "higher"
    assert rows["bad"]["vs_reference"]["avg"]["verdict"] == "lower"
    assert rows["twin"]["vs_reference"]["avg"]["verdict"] == "tie"
    assert rows["twin"]["jaccard"]["min"] == pytest.approx(1 / 3)
    assert rows["bad"]["seconds"] == {"mean": 11.0, "se": pytest.approx(1 / math.sqrt(3)), "n": 3}
    table = markdown_seed_table(s)
    bad = next(line for line in table.splitlines() if line.startswith("| bad |"))
    assert "×1.500 [" in bad and "**worse**" in bad and "| 11.0 ± 0.6 | 2.00 ± 0.00 |" in bad
    twin = next(line for line in table.splitlines() if line.startswith("| twin |"))
    assert "tie" in twin and "0.33" in twin
    with pytest.raises(ValueError, match="not among"):
        summarize(runs, reference="nope")


# --- method strings with options, rerunnable results ---------------------------------------


def test_method_options_parse_validate_and_split():
    spec = parse_method("gradmap(verify=4, verify_samples=8)+magnitude")
    assert spec.prune_kwargs() == {"metric": "gradmap", "compensation": "magnitude",
                                   "schedule": "one-shot", "verify": 4, "verify_samples": 8}
    assert split_methods("gradmap(verify=4,verify_samples=8)+magnitude, sleb") == [
        "gradmap(verify=4,verify_samples=8)+magnitude", "sleb"]
    proj = parse_method("gradmap+projection(per_gap=True,top_m=0)@iterative")
    comp = proj.prune_kwargs()["compensation"]
    assert type(comp).__name__ == "ProjectionCompensation" and comp.per_gap and comp.top_m == 0
    assert proj.prune_kwargs()["compensation"] is not comp  # a fresh compensator per run
    # options make methods distinct; the same options twice repeat a method
    assert len(parse_methods("gradmap,gradmap(verify=2)")) == 2
    with pytest.raises(GradmapError, match="repeats an earlier method"):
        parse_methods("gradmap(verify=2),gradmap(verify=2)@one-shot")


@pytest.mark.parametrize("name, fragments", [
    ("gradmap(verfy=4)", ["unknown option(s) ['verfy']", "valid options: gradient, normalize"]),
    ("gradmap(verify=-1)", ["verify must be an integer >= 0"]),
    ("gradmap(verify=four)", ["not key=value with a Python literal"]),
    ("gradmap(verify=4", ["must end with ')'"]),
    ("gradmap(verify=1,verify=2)", ["given twice"]),
    ("gradmap+projection(topm=1)", ["no option(s) ['topm']", "'top_m'", "'per_gap'"]),
    ("gradmap+none(x=1)", ["'none' takes no options"]),
])
def test_bad_method_options_name_the_valid_ones(name, fragments):
    with pytest.raises(GradmapError) as exc:
        parse_methods(name)
    assert str(exc.value).startswith(f"method {name!r}")
    for f in fragments:
        assert f in str(exc.value)


def test_prune_result_records_every_option_and_reruns(text_file):
    calib = torch.randint(3, 90, (6, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", n_layers=N_LAYERS, seed=3)
    res = fast_prune(model, calib, 2, metric="gradmap", verify=2, schedule="iterative",
                     compensation=parse_method("gradmap+projection(per_gap=True,ridge=0.5)")
                     .prune_kwargs()["compensation"], batch_size=2)
    d = json.loads(json.dumps(res.to_dict(), default=str))
    opts = d["options"]["compensation_options"]["projection"]
    assert opts["per_gap"] is True and opts["ridge_grid"] == [0.5] and opts["holdout"] == 0.125
    assert d["options"]["verify"] == 2 and d["options"]["offload"] is None
    pipeline = method_from_result(d)
    assert pipeline.startswith("gradmap(gradient='token',gradient_checkpointing=False,norm='l1',"
                               "normalize='none',verify=2,verify_holdout=False,verify_samples=None)"
                               "+projection(")
    assert pipeline.endswith("@iterative") and "per_gap=True" in pipeline
    # the recorded string reruns the same pipeline: same layers, same weights
    again = tiny_model("llama", n_layers=N_LAYERS, seed=3)
    res2 = fast_prune(again, calib, 2, batch_size=2, **parse_method(pipeline).prune_kwargs())
    assert res2.removed_layers == res.removed_layers
    for (n1, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert method_from_result(res2.to_dict()) == pipeline
    assert format_method("sleb", ["none"], "iterative") == "sleb@iterative"


# --- per-example zero-shot -----------------------------------------------------------------


def test_zero_shot_per_example_matches_the_aggregates():
    model, tok = tiny_model("llama", n_layers=2, seed=5), tiny_tokenizer()
    plain = zero_shot(model, tok, "piqa,hellaswag,boolq", limit=5, progress=False)
    res = zero_shot(model, tok, "piqa,hellaswag,boolq", limit=5, progress=False, per_example=True)
    for task, entry in res["tasks"].items():
        assert "correct" not in plain["tasks"][task]
        assert {k: v for k, v in entry.items() if k != "correct"} == plain["tasks"][task]
        assert set(entry["correct"]) == {k for k in ("acc", "acc_norm") if k in entry}
        for metric, flags in entry["correct"].items():
            assert len(flags) == 5 and set(flags) <= {0, 1}
            assert sum(flags) / 5 == entry[metric]
    # the lists are the argmax of each example's scores, in the task's example order
    examples = build_examples("piqa", 5)
    reqs = [encode_request(tok, c, t, False, 2048) for ex in examples for c, t in ex.requests]
    scores, _ = loglikelihoods(model, reqs, progress=False)
    want, i = [], 0
    for ex in examples:
        ll = scores[i:i + len(ex.requests)]
        i += len(ex.requests)
        want.append(int(ll.index(max(ll)) == ex.gold))
    assert res["tasks"]["piqa"]["correct"]["acc"] == want == correctness(examples, scores)["acc"]


# --- the seed runner and the CLI -----------------------------------------------------------

QUALITY = {"block-influence": 1.0, "angular": 0.5, "taylor": 1.0}


def seed_prune(model, calib, n_prune, metric="gradmap", compensation="none",
               schedule="iterative", protect_first=1, protect_last=1, batch_size=None,
               progress=False, **options):
    """Removes calibration-dependent layers (so seeds differ) and tags the model's quality."""
    first = 1 + int(calib.sum()) % (N_LAYERS - 1 - n_prune)
    ids = list(range(first, first + n_prune))
    remove_layers(model, ids)
    model.config.fake_quality = QUALITY.get(metric, 1.0)
    comp = [compensation] if isinstance(compensation, str) else list(compensation)
    return PruneResult(metric=metric, schedule=schedule, compensation=comp, removed_layers=ids,
                       timings={"scoring": 0.2, "removal": 0.0, "compensation_statistics": 0.1,
                                "solve": 0.05, "total": 0.4}, options=dict(options))


def seed_zero_shot(model, tokenizer, tasks, limit=None, batch_size=32, progress=True,
                   per_example=False):
    """Every example right at quality 1; at quality 0.5 every other example wrong."""
    quality = getattr(model.config, "fake_quality", 1.0)
    names = resolve_tasks(tasks)
    entries = {}
    for t in names:
        flags = [1 if quality == 1.0 or i % 2 else 0 for i in range(40)]
        entries[t] = {"acc": sum(flags) / 40, "n": 40, "metric": "acc", "value": sum(flags) / 40}
        if per_example:
            entries[t]["correct"] = {"acc": flags}
    lam = None
    if entries.pop("lambada_openai", None) is not None:  # beside the average: 1 in 4 at 0.5
        flags = [1 if quality == 1.0 or i % 4 == 0 else 0 for i in range(40)]
        lam = {"acc": sum(flags) / 40, "ppl": 20.0 / quality, "n": 40, "interval": [0.0, 1.0],
               **({"correct": {"acc": flags}} if per_example else {})}
    avg = sum(e["value"] for e in entries.values()) / len(entries)
    return {"tasks": entries, "average": avg, "average_metrics": {t: "acc" for t in entries},
            "lambada_openai": lam, "limit": limit, "requests": 0, "tokens": 0,
            "forwarded_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}


def test_seed_compare_draws_one_calibration_per_seed(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", seed_zero_shot)
    seen = []

    def spy(model, calib, n_prune, **kw):
        seen.append((kw["metric"], calib.clone()))
        return seed_prune(model, calib, n_prune, **kw)

    out = tmp_path / "o"
    snapshots = []
    res = run_seed_compare(config(text_file, methods="block-influence,angular,taylor(gradient_checkpointing=True)",
                                  tasks="piqa,boolq,lambada_openai"),
                           "0,1,2", out, progress=False, loader=tiny_loader(), prune_fn=spy,
                           on_update=lambda r: snapshots.append(len(r["runs"])))
    assert [m for m, _ in seen] == ["block-influence", "angular", "taylor"] * 3
    for seed in range(3):  # same calibration within a seed, a new draw for each seed
        group = [c for _, c in seen[3 * seed:3 * seed + 3]]
        assert all(torch.equal(c, group[0]) for c in group)
    assert not torch.equal(seen[0][1], seen[3][1]) and not torch.equal(seen[3][1], seen[6][1])
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "complete" and saved["mode"] == "seeds"
    assert saved["settings"]["seeds"] == [0, 1, 2] and saved["settings"]["reference"] == \
        "block-influence"
    assert sorted(saved["floor"]["seconds"]) == ["0", "1", "2"]
    assert [(r["seed"], r["method"]) for r in saved["runs"]] == [
        (s, m) for s in range(3) for m in ("block-influence", "angular", "taylor(gradient_checkpointing=True)")]
    assert all(r["status"] == "ok" and len(r["zero_shot"]["tasks"]["piqa"]["correct"]["acc"]) == 40
               for r in saved["runs"])
    assert saved["runs"][2]["pipeline"] == "taylor(gradient_checkpointing=True)@iterative"
    assert saved["dense"]["zero_shot"]["tasks"]["piqa"]["correct"]["acc"] == [1] * 40
    assert snapshots == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]  # after dense, each run, the end
    rows = {r["method"]: r for r in saved["summary"]["methods"]}
    assert rows["angular"]["vs_reference"]["avg"]["estimate"] == pytest.approx(-0.5)
    assert rows["angular"]["vs_reference"]["avg"]["verdict"] == "lower"
    assert rows["taylor(gradient_checkpointing=True)"]["vs_reference"]["avg"]["verdict"] == "tie"
    # a fake prune removes the same layers for every method of a seed: PPL ratio exactly 1
    assert rows["angular"]["vs_reference"]["ppl"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert rows["angular"]["ppl"]["n"] == 3 and rows["angular"]["ppl"]["se"] is not None
    removed = rows["angular"]["removed_layers"]
    assert len({tuple(v) for v in removed.values()}) > 1  # seeds really chose differently
    # LAMBADA beside the averages (1 in 4 right at quality 0.5), never inside them
    assert rows["angular"]["avg"]["mean"] == pytest.approx(0.5)  # piqa and boolq only
    assert rows["angular"]["lambada"]["mean"] == pytest.approx(0.25)
    assert rows["angular"]["lambada_ppl"]["mean"] == 40.0
    assert rows["angular"]["vs_reference"]["lambada"]["verdict"] == "lower"
    assert rows["angular"]["vs_reference"]["lambada"]["estimate"] == pytest.approx(-0.75)
    md = (out / "results.md").read_text()
    assert "| angular | 0,1,2 |" in md and "**worse**" in md and "Student t" in md
    angular = next(line for line in md.splitlines() if line.startswith("| angular |"))
    assert "| 25.00 ± 0.00 | -75.00 [" in angular and "**worse** | 40.00 ± 0.00 |" in angular
    assert "- LAMBADA (beside the averages): 40 texts; dense acc 100.00 [91.24, 100.00] %" in md


def test_seed_compare_refuses_bad_input_before_loading(tmp_path, text_file):
    calls = []
    for seeds, kw, match in [("0,x", {}, "non-negative integers"), ("1,1", {}, "distinct"),
                             ("", {}, "empty"), ("0,1", {"save_dir": "s"}, "--save"),
                             ("0", {"reference": "nope"}, "--reference 'nope' is not among")]:
        ref = kw.pop("reference", None)
        with pytest.raises(GradmapError, match=match):
            run_seed_compare(config(text_file, **kw), seeds, tmp_path / "o", reference=ref,
                             loader=tiny_loader(calls))
    assert calls == [] and not (tmp_path / "o").exists()
    assert parse_seeds([3, 1]) == [3, 1]


def test_cli_seeds_end_to_end(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(gradmap.core.models, "load_model", tiny_loader())
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", seed_zero_shot)
    args = ["compare", "--model", "tiny", "--n-prune", "2", "--tasks", "piqa,boolq,lambada_openai",
            "--calib", text_file, "--n-calib", "4", "--seq-len", "32", "--batch-size", "2",
            "--ppl-data", text_file, "--ppl-seq-len", "64", "--ppl-windows", "2",
            "--no-progress"]
    rc = cli.main(args + ["--methods", "angular,block-influence+magnitude", "--seeds", "0,1",
                          "--reference", "block-influence+magnitude", "--out",
                          str(tmp_path / "o")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "PPL ratio vs block-influence+magnitude [95%]" in printed
    assert "| angular | 0,1 |" in printed and "**worse**" in printed
    # LAMBADA beside the averages: level ± s.e. over seeds, paired bootstrap, its PPL
    assert "| LAMBADA % | ΔLAMBADA pts [95%] | LAMBADA PPL |" in printed
    angular = next(line for line in printed.splitlines() if line.startswith("| angular |"))
    assert "| 100.00 ± 0.00 | +0.00 [+0.00, +0.00] tie | 20.00 ± 0.00 |" in angular
    assert "LAMBADA (lm-eval lambada_openai; not in either average)" in printed
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(res["runs"]) == 4 and res["summary"]["reference"] == "block-influence+magnitude"
    assert cli.main(args + ["--seeds", "0,1", "--seed", "3", "--out", str(tmp_path / "p")]) == 2
    assert "--seed and --seeds both given" in capsys.readouterr().err
    assert cli.main(args + ["--reference", "angular", "--out", str(tmp_path / "q")]) == 2
    assert "pass --seeds too" in capsys.readouterr().err


# --- bench/seed_study_report.py ------------------------------------------------------------


def _load_report_module():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "seed_study_report.py")
    spec = importlib.util.spec_from_file_location("seed_study_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_study_report_reads_the_study_format(tmp_path, capsys):
    report = _load_report_module()
    settings = {"model": "m", "n_prune": 8, "n_calib": 32, "seq_len": 256, "calib": "c4",
                "ppl_data": "wikitext2", "ppl_seq_len": 2048, "ppl_windows": 16, "limit": 4}

    def zs(flags):
        return {"tasks": {t: {"n": 4, "metric": "acc", "value": sum(f) / 4, "correct": {"acc": f}}
                          for t, f in flags.items()}}

    good, half = {"boolq": [1, 1, 1, 1], "piqa": [1, 1, 1, 0]}, {"boolq": [1, 1, 1, 1],
                                                                  "piqa": [0, 1, 0, 0]}
    rows = [{"kind": "dense", "status": "ok", "settings": settings, "ppl": 20.0,
             "tasks": {"boolq": 1.0, "piqa": 0.75}, "average": 0.875, "command": "python x"},
            {"kind": "floor", "status": "ok", "settings": settings, "seed": 0, "seconds": 80.0}]
    for seed in (0, 1):
        for name, ppl, flags, removed in (("a", 100.0, good, [1, 2]), ("b", 150.0, half,
                                                                       [1, 2 + seed])):
            rows.append({"kind": "run", "status": "ok", "settings": settings, "pipeline": name,
                         "seed": seed, "ppl": ppl * (1 + 0.01 * seed), "prune_seconds": 90.0,
                         "ratio_to_floor": 1.125, "removed_layers": removed,
                         "tasks": {t: sum(f) / 4 for t, f in flags.items()}, **{"zero_shot": zs(flags)}})
    rows.insert(3, {"kind": "run", "status": "failed", "settings": settings, "pipeline": "a",
                    "seed": 0, "error": "boom"})  # retried later: the ok row counts
    path = tmp_path / "study.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"kind\": \"ru")
    assert report.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "dense: PPL 20.00, avg 87.50, avg w/o boolq 75.00" in text
    a = next(line for line in text.splitlines() if line.startswith("| a |"))
    b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "| a | 0,1 | 100.50 ± 0.50 | reference |" in a and "1.00 / 1.00" in a
    # b: PPL ×1.5 on both seeds (a t-interval of zero width), piqa 2 of 4 examples lost
    assert "×1.500 [1.500, 1.500] **worse**" in b and "0.33 / 0.33" in b
    assert "| 25.00 ± 0.00 |" in b and "-50.00 [" in b
    assert "b: s0 [1, 2], s1 [1, 3]" in text


def test_average_without_boolq_is_blank_when_boolq_was_not_evaluated():
    runs = [SeedRun(m, 0, ppl=10.0, task_values={"piqa": 0.5}, correct={"piqa": [1, 0]})
            for m in ("a", "b")]
    rows = summarize(runs)["methods"]
    assert rows[0]["avg"]["mean"] == 0.5 and rows[0]["avg w/o boolq"] is None
    assert rows[1]["vs_reference"]["avg w/o boolq"] is None
    assert rows[1]["vs_reference"]["avg"]["estimate"] == 0.0
