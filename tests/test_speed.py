"""`inference_speed` and `--speed` on prune / compare: structure, arithmetic, sizes, knob checks.

Everything runs on tiny models with tiny lengths; no test asserts how fast anything is (speed
claims live in bench/inference_speed.py), only that figures are positive and ratios consistent.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import types

import pytest
import torch
from tiny import tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer

import gradmap
import gradmap.core.models
import gradmap.evaluate
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError
from gradmap.evaluate.speed import PROMPT, check_speed_options, inference_speed, throughputs
from gradmap.experiments.dense_source import DenseSource

TINY = dict(prefill=(16,), decode_tokens=4, batches=(1, 2), warmup=0, repeats=2)
KNOBS = ["--speed", "--speed-prefill", "16", "--speed-decode", "3", "--speed-batches", "1,2",
         "--speed-repeats", "1"]


def _pruned(model, ids):
    out = copy.deepcopy(model)
    gradmap.remove_layers(out, ids)
    return out


def _safetensors_bytes(model, folder) -> int:
    path = gradmap.save_pretrained(model, None, folder)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.fixture(scope="module")
def timed():
    dense = tiny_model("llama", n_layers=6, tied=True)
    models = {"dense": dense, "minus2": _pruned(dense, [2, 3]), "minus3": _pruned(dense, [1, 2, 3])}
    return models, inference_speed(models, **TINY)


def test_rows_hold_every_figure_with_ratios_to_dense(timed):
    models, res = timed
    assert res["reference"] == "dense" and set(res["models"]) == set(models)
    assert res["settings"]["prefill"] == (16,) and res["settings"]["prompt_tokens"] == PROMPT
    base = res["models"]["dense"]
    for name, row in res["models"].items():
        assert row["layers"] == models[name].config.num_hidden_layers
        assert set(row["prefill_tok_s"]) == {"16"} and set(row["decode_tok_s"]) == {"1", "2"}
        assert set(row["seconds"]) == {"prefill_16", "decode_b1", "decode_b2"}
        assert all(len(ts) == TINY["repeats"] and min(ts) > 0 for ts in row["seconds"].values())
        # tokens/s is the tokens of one run over the median of its timed runs
        median = {k: statistics.median(ts) for k, ts in row["seconds"].items()}
        assert row["prefill_tok_s"]["16"] == pytest.approx(16 / median["prefill_16"])
        assert row["decode_tok_s"]["2"] == pytest.approx(2 * 4 / median["decode_b2"])
        for key, value in throughputs(row).items():
            assert value > 0
            assert row["x_dense"][key] == pytest.approx(value / throughputs(base)[key])
        for key in ("params", "checkpoint_bytes"):
            assert row["x_dense"][key] == pytest.approx(row[key] / base[key])
        assert row["expected_speedup"] == pytest.approx(base["matmul_params"] / row["matmul_params"])
    assert all(v == 1.0 for v in base["x_dense"].values()) and base["expected_speedup"] == 1.0
    assert "llama_cpp" not in res and "llama_cpp_skipped" not in res


def test_sizes_are_direct_counts_and_saved_bytes(timed, tmp_path):
    models, res = timed
    for name, model in models.items():
        row = res["models"][name]
        assert row["params"] == sum(p.numel() for p in model.parameters())  # tied head once
        layers = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        assert row["matmul_params"] == layers + model.lm_head.weight.numel()
        assert row["checkpoint_bytes"] == _safetensors_bytes(model, tmp_path / name)
    assert res["models"]["minus3"]["params"] < res["models"]["minus2"]["params"] < \
        res["models"]["dense"]["params"]


def test_timed_decode_is_the_new_tokens_only():
    """The timed decode run is `decode_tokens` single-token steps of the batch, not the prompt."""
    model = tiny_model("llama", n_layers=2)
    calls = []

    def record(module, args, kwargs):
        calls.append(tuple((args[0] if args else kwargs["input_ids"]).shape))
    model.register_forward_pre_hook(record, with_kwargs=True)
    inference_speed({"dense": model}, prefill=(8,), decode_tokens=3, batches=(2,), warmup=0, repeats=1)
    assert calls == [(1, 8), (2, PROMPT), (2, 1), (2, 1), (2, 1)]


@pytest.mark.parametrize("kwargs,fragment", [
    ({"prefill": "512,x"}, "prefill '512,x' is not a comma-separated list"),
    ({"prefill": ""}, "prefill '' is not"),
    ({"batches": (1, 0)}, "batches (1, 0) is not"),
    ({"decode_tokens": "0"}, "decode_tokens must be a positive integer, got '0'"),
    ({"decode_tokens": "12.5"}, "decode_tokens must be a positive integer"),
    ({"repeats": 0}, "repeats must be a positive integer, got 0"),
    ({"warmup": -1}, "warmup must be a non-negative integer, got -1"),
])
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(GradmapError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_speed_options(**kwargs)


def test_reference_and_gguf_paths_are_checked_before_timing(tmp_path):
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(GradmapError, match="reference model 'dense'"):
        inference_speed({"pruned": model}, **TINY)
    with pytest.raises(GradmapError, match="not found"):
        inference_speed({"dense": model}, gguf_paths={"dense": str(tmp_path / "no.gguf")}, **TINY)
    with pytest.raises(GradmapError, match="it needs 'dense'"):
        inference_speed({"dense": model, "p": model}, gguf_paths={"p": str(tmp_path / "x")}, **TINY)


class FakeLlama:
    """Stands in for llama_cpp.Llama: records what it is asked to evaluate."""
    created: list = []

    def __init__(self, model_path, n_ctx, n_batch, n_threads, verbose):
        self.path, self.n_ctx, self.tokens = model_path, n_ctx, 0
        FakeLlama.created.append(self)

    def reset(self):
        self.tokens = 0

    def eval(self, ids):
        self.tokens += len(ids)
        assert self.tokens <= self.n_ctx
        sum(range(2000))  # some work, so a timed run lasts a measurable time


def test_llama_cpp_figures_come_from_the_gguf_files(tmp_path, monkeypatch):
    ggufs = {"dense": tmp_path / "d.gguf", "pruned": tmp_path / "p.gguf"}
    ggufs["dense"].write_bytes(b"x" * 300)
    ggufs["pruned"].write_bytes(b"x" * 200)
    model = tiny_model("llama", n_layers=2)
    models = {"dense": model, "pruned": _pruned(model, [0])}
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    FakeLlama.created = []
    res = inference_speed(models, gguf_paths={k: str(v) for k, v in ggufs.items()}, **TINY)
    assert sorted(llm.path for llm in FakeLlama.created) == sorted(str(v) for v in ggufs.values())
    cpp = res["llama_cpp"]
    assert cpp["pruned"]["gguf_bytes"] == 200
    assert cpp["pruned"]["x_dense"]["gguf_bytes"] == pytest.approx(2 / 3)
    for row in cpp.values():
        assert set(row["decode_tok_s"]) == {"1"}  # llama.cpp's Python API: one sequence
        for key, value in throughputs(row).items():
            assert value > 0 and row["x_dense"][key] == pytest.approx(value / throughputs(cpp["dense"])[key])
    paths = {k: str(v) for k, v in ggufs.items()}
    skipped = inference_speed(models, gguf_paths=paths, llama_cpp=False, **TINY)
    assert "llama_cpp" not in skipped and "not requested" in skipped["llama_cpp_skipped"]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    auto = inference_speed(models, gguf_paths=paths, **TINY)
    assert "not installed" in auto["llama_cpp_skipped"]
    with pytest.raises(GradmapError, match="llama-cpp-python"):
        inference_speed(models, gguf_paths=paths, llama_cpp=True, **TINY)


# --- gradmap prune --speed -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_cli")
    tiny_model("llama", n_layers=6, seed=0).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n\n".join(TRAIN_TEXT * 8))
    return root


def _prune_argv(root, out, *extra):
    return ["prune", "--model", str(root / "model"), "--n-prune", "2", "--metric", "block-influence",
            "--compensation", "none", "--calib", str(root / "calib.txt"), "--n-calib", "4",
            "--seq-len", "24", "--out", str(out), "--no-progress", *extra]


def test_prune_speed_reports_dense_before_and_pruned_after(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_argv(tiny_dir, out, *KNOBS)) == 0
    printed = capsys.readouterr().out
    speed = json.loads((out / "report.json").read_text())["speed"]
    dense, pruned = speed["models"]["dense"], speed["models"]["pruned"]
    assert (dense["layers"], pruned["layers"]) == (6, 4)
    assert pruned["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert speed["settings"]["decode_tokens"] == 3 and speed["settings"]["repeats"] == 1
    ratio = pruned["decode_tok_s"]["2"] / dense["decode_tok_s"]["2"]
    assert pruned["x_dense"]["decode_b2"] == pytest.approx(ratio)
    assert "inference speed" in printed and "  pruned: " in printed


@pytest.mark.parametrize("extra,fragment", [
    (["--speed", "--speed-prefill", "512,abc"], "--speed-prefill '512,abc' is not a comma-separated list"),
    (["--speed", "--speed-batches", "0"], "--speed-batches '0' is not"),
    (["--speed", "--speed-decode", "-1"], "--speed-decode must be a positive integer, got '-1'"),
    (["--speed", "--speed-repeats", "two"], "--speed-repeats must be a positive integer"),
    (["--speed-repeats", "5"], "--speed-repeats only apply with --speed"),
    (["--speed", "--offload", "layer"], "--speed times whole models"),
])
def test_bad_speed_knobs_fail_in_one_line_before_loading(tmp_path, capsys, monkeypatch, extra, fragment):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad knob was found")
    monkeypatch.setattr(gradmap.core.models, "load_model", refuse)
    for command in (_prune_argv(tmp_path, tmp_path / "o", *extra),
                    ["compare", "--model", "m", "--n-prune", "1", "--out", str(tmp_path / "c"), *extra]):
        if command[0] == "compare" and "--offload" in extra:
            continue
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


# --- gradmap compare --speed ---------------------------------------------------------------

def _loader(name, dtype=None, device="cpu"):
    return tiny_model("llama", n_layers=6, seed=3), tiny_tokenizer()


def test_compare_speed_times_every_method_against_dense(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gradmap.core.models, "load_model", _loader)
    text = str(tiny_dir / "calib.txt")
    out = tmp_path / "o"
    rc = main(["compare", "--model", "tiny", "--n-prune", "2", "--methods", "block-influence,angular",
               "--tasks", "none", "--calib", text, "--n-calib", "4", "--seq-len", "16",
               "--ppl-data", text, "--ppl-seq-len", "32", "--ppl-windows", "1", "--out", str(out),
               "--no-progress", *KNOBS])
    printed = capsys.readouterr().out
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["speed"]["prefill"] == [16]
    for row in res["methods"]:
        speed = row["speed"]["models"]
        assert set(speed) == {"dense", row["label"]}
        assert (speed["dense"]["layers"], speed[row["label"]]["layers"]) == (6, 4)
        assert speed[row["label"]]["x_dense"]["params"] == pytest.approx(
            speed[row["label"]]["params"] / speed["dense"]["params"])
    md = (out / "results.md").read_text()
    assert "## What pruning buys (--speed)" in md and "| dense | 6 |" in md
    for row in res["methods"]:
        assert f"| {row['label']} | 4 |" in md
    assert "| prefill 16 tok/s | decode b=1 tok/s | decode b=2 tok/s |" in md
    assert "What pruning buys" in printed


def test_compare_speed_refuses_seeds_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gradmap.core.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert main(["compare", "--model", "m", "--n-prune", "1", "--seeds", "0,1", "--speed",
                 "--out", str(tmp_path / "c")]) == 2
    assert "drop --seeds" in capsys.readouterr().err


@pytest.mark.parametrize("restore", ["copy", "reload"])
def test_dense_reference_is_the_kept_copy_or_a_fresh_load(restore):
    source = DenseSource(_loader, "tiny", None, "cpu", restore)
    first = source.reference()
    assert (source.reference() is first) == (restore == "copy")
    source.check(first)  # the dense weights
    assert isinstance(first, torch.nn.Module)
