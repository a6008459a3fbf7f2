"""`gradmap compare`: method grammar, same dense start, failure isolation, result files, CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch

import gradmap.evaluate
import gradmap.core.models
import gradmap.prune.driver
from gradmap.cli import app as cli
from gradmap import remove_layers
from gradmap.experiments.compare import CompareConfig, DenseSource, forward_backward_seconds, run_compare, weights_fingerprint
from gradmap.prune.compensation import COMPENSATORS
from gradmap.experiments.compare_report import accuracy_standard_errors, wilson_interval
from gradmap.core.errors import GradmapError
from gradmap.experiments.methods import MethodSpec, parse_method, parse_methods
from gradmap.prune.metrics import METRICS
from gradmap.core.result import PruneResult
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

N_LAYERS = 6
DEFAULT = ("gradmap+projection,gradmap,block-influence,block-influence+magnitude,"
           "angular+replaceme,sleb,taylor,ppl")


def tiny_loader(calls: list | None = None):
    def load(name, dtype=None, device="cpu"):
        if calls is not None:
            calls.append(name)
        return tiny_model("llama", n_layers=N_LAYERS, seed=3), tiny_tokenizer()
    return load


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, data_dir):
    """A short WikiText-2 excerpt: calibration stream and perplexity text for the tiny models."""
    with open(f"{data_dir}/wikitext2/test.txt", encoding="utf-8") as f:
        text = f.read(8000)
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


FAKE_N = 100  # examples per task the fake claims: enough for the full table (SMALL_SAMPLE)


def fake_zero_shot(model, tokenizer, tasks, limit=None, batch_size=32, progress=True, n=FAKE_N):
    """Deterministic accuracies that depend on the depth, so retention is a known number."""
    depth = model.config.num_hidden_layers
    names = gradmap.evaluate.tasks.resolve_tasks(tasks)
    mc = [t for t in names if t in gradmap.evaluate.TASK_NAMES]
    entries = {t: {"acc": depth / 10, "n": n, "metric": "acc", "value": depth / 10,
                   "interval": list(wilson_interval(depth / 10, n))} for t in mc}
    lam = ({"acc": depth / 20, "interval": list(wilson_interval(depth / 20, 2 * n)),
            "ppl": 120.0 / depth, "n": 2 * n} if "lambada_openai" in names else None)
    return {"tasks": entries, "average": depth / 10, "average_metrics": {t: "acc" for t in mc},
            "lambada_openai": lam, "limit": limit, "requests": 0, "tokens": 0,
            "forwarded_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}


def fake_prune(model, calib, n_prune, metric="gradmap", compensation="none",
               schedule="iterative", protect_first=1, protect_last=1, batch_size=None,
               progress=False):
    """Removes layers 1..n_prune and edits a weight, as a real method would; instant."""
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    ids = list(range(1, n_prune + 1))
    remove_layers(model, ids)
    comp = [compensation] if isinstance(compensation, str) else list(compensation)
    return PruneResult(metric=metric, schedule=schedule, compensation=comp, removed_layers=ids,
                       scores=[{i: float(i) for i in range(N_LAYERS)}],
                       timings={"scoring": 0.2, "removal": 0.0, "compensation_statistics": 0.1,
                                "solve": 0.05, "total": 0.4})


def config(text_file, **kw) -> CompareConfig:
    base = dict(model="tiny", n_prune=2, methods="block-influence", tasks="piqa,boolq", limit=2,
                calib=text_file, n_calib=4, seq_len=32, batch_size=2, ppl_data=text_file,
                ppl_seq_len=64, ppl_windows=2)
    base.update(kw)
    return CompareConfig(**base)


# --- grammar -------------------------------------------------------------------------------

def test_default_methods_parse_with_resolved_schedules():
    specs = {s.name: s for s in parse_methods(DEFAULT)}
    assert list(specs) == DEFAULT.split(",")
    assert specs["gradmap+projection"].prune_kwargs() == {
        "metric": "gradmap", "compensation": "projection", "schedule": "one-shot"}
    assert specs["gradmap"].compensation == ("none",)
    # a bare metric takes the metric's default schedule, as fast_prune(schedule=None) does
    assert specs["block-influence"].schedule == "iterative"
    assert specs["taylor"].schedule == "iterative"
    # metrics with one schedule get that one; the label always spells it out
    assert specs["ppl"].schedule == "one-shot" and specs["ppl"].label == "ppl@one-shot"
    assert specs["sleb"].schedule == "iterative"
    assert specs["angular+replaceme"].schedule == "one-shot"


def test_grammar_suffixes_and_chains():
    metrics, comps = ["a", "b"], ["none", "x", "y"]
    spec = parse_method("a+x+y@one-shot", metrics, comps)
    assert spec == MethodSpec("a+x+y@one-shot", "a", ("x", "y"), "one-shot")
    assert spec.prune_kwargs()["compensation"] == ["x", "y"]
    assert parse_method(" b@iterative ", metrics, comps).schedule == "iterative"
    assert parse_method("b+none", metrics, comps).compensation == ("none",)
    with pytest.raises(GradmapError, match="supports only @iterative; write b@iterative"):
        parse_method("b@one-shot", metrics, comps, schedules={"b": ("iterative",)})


@pytest.mark.parametrize("name, fragment", [
    ("bogus", "unknown metric 'bogus'"),
    ("gradmap+bogus", "unknown compensation 'bogus'"),
    ("gradmap@sometimes", "unknown schedule 'sometimes'"),
    ("", "empty method name"),
])
def test_unknown_names_list_every_valid_one(name, fragment):
    with pytest.raises(GradmapError) as exc:
        parse_method(name)
    msg = str(exc.value)
    assert fragment in msg
    for valid in list(METRICS) + list(COMPENSATORS):
        assert valid in msg


@pytest.mark.parametrize("names, fragment", [
    ("gradmap+projection+magnitude+replaceme", "at most 2"),
    ("gradmap+projection+projection", "twice"),
    ("gradmap+none+projection", "drop '+none'"),
    ("ppl@iterative", "metric 'ppl' supports only @one-shot"),
    ("gradmap,block-influence,gradmap@one-shot", "repeats an earlier method"),
    (" , ", "no methods given"),
])
def test_bad_method_lists_are_rejected(names, fragment):
    with pytest.raises(GradmapError, match=re.escape(fragment)):
        parse_methods(names)


def test_bad_method_fails_before_any_work(tmp_path, text_file):
    calls = []
    out = tmp_path / "out"
    with pytest.raises(GradmapError, match="unknown metric 'nope'"):
        run_compare(config(text_file, methods="block-influence,nope"), out, progress=False,
                    loader=tiny_loader(calls))
    assert calls == [] and not out.exists()


# --- same dense start ----------------------------------------------------------------------

@pytest.mark.parametrize("restore", ["copy", "reload"])
def test_dense_source_refuses_pruned_or_edited_models(restore):
    source = DenseSource(tiny_loader(), "tiny", None, "cpu", restore)
    dense = tiny_model("llama", n_layers=N_LAYERS, seed=3)
    assert source.fingerprint == weights_fingerprint(dense)
    a = source.fresh()
    with torch.no_grad():
        a.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="fingerprint mismatch"):
        source.check(a)
    b = source.fresh()  # editing one copy leaves the next one dense
    assert weights_fingerprint(b) == source.fingerprint
    remove_layers(b, [3])
    with pytest.raises(RuntimeError, match="refusing to prune a pruned model"):
        source.check(b)


def test_every_method_starts_from_the_same_dense_weights(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", fake_zero_shot)
    dense_fp = weights_fingerprint(tiny_model("llama", n_layers=N_LAYERS, seed=3))
    seen = []

    def spy(model, calib, n_prune, **kw):
        seen.append((kw["metric"], weights_fingerprint(model), len(model.model.layers),
                     calib.clone()))
        res = gradmap.prune.fast_prune(model, calib, n_prune, **kw)
        seen[-1] += (weights_fingerprint(model),)
        return res

    methods = "gradmap+projection,angular+replaceme"
    res = run_compare(config(text_file, methods=methods), tmp_path / "o", progress=False,
                      loader=tiny_loader(), prune_fn=spy, plots=False)
    assert [s[0] for s in seen] == ["gradmap", "angular"]
    for _, before, depth, calib, after in seen:
        assert before == dense_fp and depth == N_LAYERS
        assert torch.equal(calib, seen[0][3])   # same calibration tensor for everyone
        assert after != dense_fp                 # pruning really changed the model it got
    for row in res["methods"]:
        assert row["status"] == "ok", row.get("traceback")
        assert len(row["removed_layers"]) == 2
        assert set(row["timings"]) >= {"scoring", "compensation_statistics", "solve", "total"}
        assert row["ratio_to_floor"] == pytest.approx(row["timings"]["total"]
                                                      / res["floor"]["seconds"])
        assert row["retention"] == pytest.approx(100 * (N_LAYERS - 2) / N_LAYERS)


def test_floor_measurement_leaves_weights_grads_and_flags(text_file):
    model = tiny_model("llama", n_layers=2, seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = weights_fingerprint(model)
    seconds = forward_backward_seconds(model, torch.randint(3, 90, (3, 16)), batch_size=2)
    assert seconds > 0
    assert weights_fingerprint(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad


# --- failures, incremental writes, files ---------------------------------------------------

def test_failing_method_is_reported_in_its_row(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", fake_zero_shot)

    def flaky(model, calib, n_prune, **kw):
        if kw["metric"] == "taylor":
            raise RuntimeError("boom in taylor")
        return fake_prune(model, calib, n_prune, **kw)

    snapshots = []
    out = tmp_path / "o"
    res = run_compare(config(text_file, methods="block-influence,taylor,angular"), out,
                      progress=False, loader=tiny_loader(), prune_fn=flaky, plots=False,
                      on_update=lambda r: snapshots.append((out / "results.md").read_text()))
    status = {r["method"]: r["status"] for r in res["methods"]}
    assert status == {"block-influence": "ok", "taylor": "failed", "angular": "ok"}
    failed = res["methods"][1]
    assert failed["error"] == "RuntimeError: boom in taylor" and "boom" in failed["traceback"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in saved["methods"]] == ["ok", "failed", "ok"]
    md = (out / "results.md").read_text()
    assert "| taylor@iterative | FAILED: RuntimeError: boom in taylor |" in md
    assert "| angular@one-shot | 1, 2 | 0.4 (0.2 / 0.1 / 0.1) |" in md
    # rewritten after the dense model and after every method: 1 + 3 + the final one
    assert len(snapshots) == 5
    assert "| block-influence@iterative | (pending) |" in snapshots[0]
    assert "| block-influence@iterative | 1, 2 |" in snapshots[1]
    assert "| taylor@iterative | (pending) |" in snapshots[1]
    assert "FAILED" in snapshots[2] and "| angular@one-shot | (pending) |" in snapshots[2]


def test_results_files_hold_the_expected_columns_and_settings(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", fake_zero_shot)
    out = tmp_path / "o"
    run_compare(config(text_file, methods="block-influence+magnitude,ppl", tasks="all"), out,
                progress=False, loader=tiny_loader(), prune_fn=fake_prune)
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    # every task says on how many examples it was measured; LAMBADA comes after the average
    assert cells == ["method", "removed layers", "pruning s", "x fwd+bwd", "PPL",
                     *(f"{t} (acc, n=100) % [95%]" for t in
                       ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                        "openbookqa")),
                     "avg (7)", "retention %", "LAMBADA acc (n=200) % [95%]", "LAMBADA PPL"]
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    assert [r.split("|")[1].strip() for r in rows] == [
        "dense", "block-influence+magnitude@iterative", "ppl@one-shot"]
    dense = [c.strip() for c in rows[0].strip(" |").split("|")]
    pruned = [c.strip() for c in rows[1].strip(" |").split("|")]
    # depth 6 -> 60% on n = 100, Wilson [50.2, 69.1]; the average (60.00) is unchanged by LAMBADA
    assert dense[5:13] == ["60.0 [50.2, 69.1]"] * 7 + ["60.00"] and dense[13] == "100.0"
    # LAMBADA: 6/20 = 30% on 200 texts, Wilson [24.1, 36.7], PPL 120/6; pruned depth 4
    assert dense[14:] == ["30.0 [24.1, 36.7]", "20.00"]
    assert pruned[12:] == ["40.00", f"{100 * 4 / 6:.1f}", "20.0 [15.0, 26.1]", "30.00"]
    assert "LAMBADA (lm-eval lambada_openai), beside the average and not in it: first 200 texts" in md
    assert json.loads((out / "results.json").read_text())["methods"][0]["lambada"] == {
        "acc": 0.2, "interval": list(wilson_interval(0.2, 200)), "ppl": 30.0, "n": 200}
    assert "L=64, first 2 windows only (--ppl-windows 2)" in md
    assert "first 2 examples per task (--limit)" in md
    # dense depth 6 -> p = 0.6 on n = 100: se = 100*sqrt(0.24/100) = 4.9 per task, /sqrt(7) for the mean
    assert "per task 4.9–4.9 points, of the 7-task average 1.85 points" in md
    assert "forward+backward" in md and "requires_grad=True" in md
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete"
    assert set(res["versions"]) >= {"torch", "transformers", "gradmap"}
    assert set(res["machine"]) >= {"platform", "cpu_count", "gpu"}
    assert res["settings"]["calib_shape"] == [4, 32] and res["settings"]["n_prune"] == 2
    assert res["settings"]["ppl_windows"] == 2 and res["settings"]["limit"] == 2
    assert res["floor"]["seconds"] > 0
    assert res["dense"]["ppl_report"]["windows"] == 2
    assert res["methods"][1]["scores"] == [{str(i): float(i) for i in range(N_LAYERS)}]
    assert res["methods"][1]["ratio_to_floor"] == pytest.approx(0.4 / res["floor"]["seconds"])
    assert sorted(res["plots"]) == ["layer_scores.png", "ppl_vs_time.png"]
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_samples_show_the_interval_and_n_and_no_retention(tmp_path, text_file, monkeypatch):
    """3 examples per task (the demo): no per-task columns, no retention, avg with its interval."""
    monkeypatch.setattr(gradmap.evaluate, "zero_shot",
                        lambda *a, **k: fake_zero_shot(*a, **{**k, "n": 3}))
    out = tmp_path / "o"
    res = run_compare(config(text_file, tasks="all", limit=3), out, progress=False,
                      loader=tiny_loader(), prune_fn=fake_prune)
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][5:] == [
        "avg (7) % [95%]", "n", "LAMBADA acc (n=6) % [95%]", "LAMBADA PPL"]
    assert "retention %" not in md and "fewer than 100 examples per task" in md
    lo, hi = wilson_interval(0.6, 21)  # dense: depth 6 -> 60% on 7 tasks x 3 examples
    assert f"| 60.0 [{100 * lo:.1f}, {100 * hi:.1f}] | 21 | 30.0 [8.1, 67.5] | 20.00 |" in md
    assert res["methods"][0].get("retention") is None


def test_wilson_interval_known_values():
    # Wilson (1927), z = 1.96: 0 of 3 -> [0, 56.1%]; 30 of 100 -> [21.9%, 39.6%]
    assert wilson_interval(0.0, 3) == pytest.approx((0.0, 0.5615), abs=1e-4)
    assert wilson_interval(0.3, 100) == pytest.approx((0.2189, 0.3958), abs=1e-4)


def test_accuracy_standard_errors_are_binomial():
    zs = {"tasks": {"a": {"n": 100, "value": 0.5}, "b": {"n": 400, "value": 0.9}}}
    per_task, avg = accuracy_standard_errors(zs)
    assert per_task == pytest.approx({"a": 5.0, "b": 1.5})
    assert avg == pytest.approx((5.0 ** 2 + 1.5 ** 2) ** 0.5 / 2)
    assert accuracy_standard_errors({"tasks": {"a": {"n": None, "value": 0.5}}}) is None
    assert accuracy_standard_errors({}) is None


def test_existing_output_needs_overwrite(tmp_path, text_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.md").write_text("old")
    with pytest.raises(GradmapError, match="--overwrite"):
        run_compare(config(text_file), out, progress=False, loader=tiny_loader())
    assert (out / "results.md").read_text() == "old"


def test_an_aborted_run_says_why_in_its_results(tmp_path, text_file):
    out = tmp_path / "o"
    with pytest.raises(GradmapError, match="only 4 of 6 layers are removable"):
        run_compare(config(text_file, n_prune=4), out, progress=False, loader=tiny_loader())
    res = json.loads((out / "results.json").read_text())
    assert res["status"].startswith("aborted: GradmapError: n_prune=4")
    assert "run status: aborted" in (out / "results.md").read_text()


# --- CLI end to end ------------------------------------------------------------------------

def test_cli_end_to_end_saves_checkpoint_and_generates(tmp_path, text_file, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from gradmap.evaluate import perplexity, zero_shot

    monkeypatch.setattr(gradmap.core.models, "load_model", tiny_loader())
    out, ckpt = tmp_path / "o", tmp_path / "ckpt"
    rc = cli.main(["compare", "--model", "tiny", "--n-prune", "2",
                   "--methods", "gradmap+projection", "--tasks", "piqa,winogrande,lambada_openai",
                   "--limit", "2", "--calib", text_file, "--n-calib", "4", "--seq-len", "32",
                   "--batch-size", "2", "--ppl-data", text_file, "--ppl-seq-len", "64",
                   "--ppl-windows", "2", "--out", str(out), "--save", str(ckpt),
                   "--generate", "the cat", "--max-new-tokens", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| gradmap+projection@one-shot |" in printed and "greedy generation" in printed
    assert f"pruned checkpoint (gradmap+projection): {ckpt}" in printed
    res = json.loads((out / "results.json").read_text())
    row = res["methods"][0]
    assert row["saved_to"] == str(ckpt) and isinstance(row["generation"], str)
    saved = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert saved.config.num_hidden_layers == N_LAYERS - 2
    assert sorted(set(range(N_LAYERS)) - set(saved.config.gradmap_layer_ids)) == \
        row["removed_layers"]
    # the saved checkpoint is the model that was evaluated
    ppl = perplexity(saved, tiny_tokenizer(), text_file, seq_len=64, max_windows=2,
                     progress=False)
    assert ppl == pytest.approx(row["ppl"], rel=1e-5)
    report = json.loads((ckpt / "report.json").read_text())
    assert sorted(report["removed_layers"]) == row["removed_layers"]
    assert report["compare"]["ppl"] == row["ppl"]
    # LAMBADA, beside the average: in the printed table with n, in the row and in report.json
    assert "| LAMBADA acc (n=2) % [95%] | LAMBADA PPL |" in printed
    assert report["compare"]["lambada"] == row["lambada"] and row["lambada"]["n"] == 2
    lam = zero_shot(saved, tiny_tokenizer(), "lambada_openai", limit=2, progress=False)
    assert lam["lambada_openai"]["ppl"] == pytest.approx(row["lambada"]["ppl"], rel=1e-5)
    assert row["average"] == pytest.approx((row["tasks"]["piqa"] + row["tasks"]["winogrande"]) / 2)


def test_cli_reports_failures_with_exit_code(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(gradmap.core.models, "load_model", tiny_loader())
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", fake_zero_shot)

    def broken(*a, **kw):
        raise GradmapError("nothing works")
    monkeypatch.setattr(gradmap.prune.driver, "fast_prune", broken)
    rc = cli.main(["compare", "--model", "tiny", "--n-prune", "1", "--methods", "taylor",
                   "--tasks", "none", "--calib", text_file, "--n-calib", "2", "--seq-len", "16",
                   "--ppl-data", text_file, "--ppl-seq-len", "64", "--ppl-windows", "1",
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 1
    assert "failed methods: taylor@iterative" in capsys.readouterr().out
    rc = cli.main(["compare", "--model", "tiny", "--n-prune", "1", "--methods", "tylor",
                   "--out", str(tmp_path / "p")])
    assert rc == 2 and "unknown metric 'tylor'" in capsys.readouterr().err


# --- bench/render_results.py ---------------------------------------------------------------

def _bench(name, group, median, **extra):
    stats = {"median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 5}
    return {"name": name, "group": group, "extra_info": extra, "stats": stats}


def test_render_results_fills_only_the_marked_region(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "render_results.py")
    spec = importlib.util.spec_from_file_location("render_results", path)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)

    cpu = dict(gpu="none", torch="2.13.0", cpu_threads=2)
    gpu = dict(gpu="NVIDIA H100", cuda="12.8", torch="2.13.0", cpu_threads=2)
    run = {"machine_info": {"machine": "x86_64", "system": "Linux", "release": "6.1",
                            "python_version": "3.11.7", "cpu": {"brand_raw": "AMD EPYC",
                                                                "count": 2}},
           "datetime": "2026-01-02T03:04:05.123", "version": "5.3.1",
           "benchmarks": [_bench("fast", "prune", 0.5, tokens_per_s=123.456, p50_ms=500, **cpu),
                          _bench("reference", "prune", 2.0, baseline=True, **cpu),
                          _bench("kernel", "gpu_moments", 3e-4, TB_per_s=2.5, **gpu),
                          _bench("cublas", "gpu_moments", 6e-4, **gpu)]}
    (tmp_path / "cpu.json").write_text(json.dumps(run))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nhand A\n\n<!-- rendered:start -->\nstale\n<!-- rendered:end -->"
                   "\n\nhand B\n")
    assert render.main([str(tmp_path / "cpu.json"), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand A\n\n<!-- rendered:start -->\n")
    assert text.endswith("<!-- rendered:end -->\n\nhand B\n") and "stale" not in text
    assert ("Machine: AMD EPYC, 2 CPUs, x86_64 Linux 6.1; GPU rows: see each table; "
            "2 torch threads; torch 2.13.0; python 3.11.7.") in text
    assert "| fast | 4.00x | 500 ms | 50 ms | 450 ms | 5 | tokens_per_s=123.5 |" in text
    assert "| reference | 1.00x (baseline) | 2 s |" in text
    # no baseline marked: the first row is the baseline and the caption says so
    assert ("**gpu_moments** (speed-up = kernel median / row median; no baseline marked: first "
            "benchmark of the group; GPU NVIDIA H100 (cuda 12.8))") in text
    assert "| cublas | 0.50x | 600 µs |" in text and "TB_per_s=2.5 |" in text
    # rendering again replaces the region instead of adding a second one
    render.main([str(tmp_path), "--out", str(doc)])
    assert doc.read_text() == text.replace(str(tmp_path / "cpu.json"), str(tmp_path))
    assert render.splice("# only hand\n", "X") == \
        "# only hand\n\n<!-- rendered:start -->\nX\n<!-- rendered:end -->\n"


# --- +heal ---------------------------------------------------------------------------------

def test_heal_parts_parse_check_their_options_and_round_trip():
    spec = parse_method("gradmap+projection+heal(train='lora',steps=64)")
    assert (spec.metric, spec.compensation, spec.heal) == ("gradmap", ("projection",), (("train", "lora"), ("steps", 64)))
    assert spec.prune_kwargs()["heal"] == {"train": "lora", "steps": 64}
    assert parse_method("auto+heal").prune_kwargs() == {"heal": {}}
    assert "heal" not in parse_method("auto").prune_kwargs()
    with pytest.raises(GradmapError, match="unknown heal option 'stepz'"):
        parse_method("gradmap+heal(stepz=3)")
    with pytest.raises(GradmapError, match="names heal twice"):
        parse_method("gradmap+heal+heal")
    assert len(parse_methods("block-influence,block-influence+heal")) == 2  # not the same method


def test_compare_heals_a_heal_method_on_fresh_rows_and_reports_its_cost(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gradmap.evaluate, "zero_shot", fake_zero_shot)
    seen = []

    def spy(model, calib, n_prune, **kw):
        seen.append(kw.get("heal_data"))
        return gradmap.prune.fast_prune(model, calib, n_prune, **kw)

    methods = "block-influence,block-influence+heal(steps=2,top_k=8,eval_every=1)"
    res = run_compare(config(text_file, methods=methods), tmp_path / "o", progress=False,
                      loader=tiny_loader(), prune_fn=spy, plots=False)
    plain, healed = res["methods"]
    assert seen[0] is None and seen[1].shape == (256, 32)  # HEAL_ROWS windows of the calibration length
    assert not plain["prune_result"].get("heal") and "heal_ratio_to_floor" not in plain
    assert healed["status"] == "ok", healed.get("traceback")
    assert healed["prune_result"]["heal"]["steps"] == 2 and healed["prune_result"]["heal"]["rows"] == 256
    assert healed["heal_ratio_to_floor"] == pytest.approx(healed["timings"]["heal"] / res["floor"]["seconds"])
    again = parse_method(healed["pipeline"])  # the recorded pipeline reruns the heal, every option spelled out
    assert dict(again.heal)["steps"] == 2 and dict(again.heal)["top_k"] == 8
