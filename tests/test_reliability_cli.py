"""Every CLI input is checked before the model loads; help is fast and complete."""
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer

import gradmap.core.models
from gradmap.cli import checks
from gradmap.cli.app import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_cli")
    tiny_model("llama", n_layers=6, seed=0).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n\n".join(TRAIN_TEXT * 8))
    return root


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any command gets as far as loading the model."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(gradmap.core.models, "load_model", refuse)
    import gradmap.cli.eval as cli_eval
    monkeypatch.setattr(cli_eval, "load_model", refuse)


def _prune(root, tmp_path, *extra):
    return ["prune", "--model", str(root / "model"), "--n-prune", "2", "--calib",
            str(root / "calib.txt"), "--n-calib", "4", "--seq-len", "24", "--out",
            str(tmp_path / "out"), "--no-progress", *extra]


@pytest.mark.parametrize("extra,match", [
    (["--calib", "/nonexistent/calib.txt"], "neither an existing file"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--n-calib", "0"], "--n-calib must be a positive integer"),
    (["--protect-first", "10"], "protect fewer layers"),
    (["--n-prune", "6"], "n_prune=6 but only 4 of 6 layers"),
    (["--metric", "ppl", "--schedule", "iterative"], "supports schedule 'one-shot' only"),
    (["--device", "tpu"], "not supported|not a device"),
    (["--device", "cuda:7"], "CUDA"),
    pytest.param(["--device", "cuda", "--offload", "layer"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["--compensation", ",,,"], "has an empty name"),
    (["--out", ""], "output directory is empty"),
    (["--out", "."], "current directory"),
])
def test_prune_refuses_bad_input_before_loading(tiny_dir, tmp_path, capsys, no_load, extra, match):
    assert main(_prune(tiny_dir, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert "-1" not in err  # the old protect_first message suggested n_prune <= -1


def test_sparsify_and_compare_check_their_data_files_before_loading(tiny_dir, tmp_path, capsys,
                                                                    no_load):
    assert main(["sparsify", "--model", str(tiny_dir / "model"), "--out", str(tmp_path / "s"),
                 "--calib-source", "/nonexistent.jsonl"]) == 2
    assert "--calib-source '/nonexistent.jsonl' is neither" in capsys.readouterr().err
    assert main(["compare", "--model", str(tiny_dir / "model"), "--n-prune", "2", "--out",
                 str(tmp_path / "c"), "--ppl-data", "wikitxt2", "--tasks", "none"]) == 2
    assert "'wikitxt2' does not exist" in capsys.readouterr().err
    assert main(["compare", "--model", str(tiny_dir / "model"), "--n-prune", "5", "--out",
                 str(tmp_path / "c"), "--tasks", "none"]) == 2
    assert "n_prune=5 but only 4 of 6" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        main(["sparsify", "--model", "m", "--out", str(tmp_path / "s"), "--dtype", "foo"])


@pytest.mark.parametrize("target,match", [("dir", "is a directory"), ("/proc/x.json", "cannot write"),
                                          ("/nonexistent/x.json", "does not exist")])
def test_eval_json_target_is_probed_before_loading(tmp_path, capsys, no_load, target, match):
    path = str(tmp_path) if target == "dir" else target
    assert main(["eval", "--model", "m", "--ppl", "text:" + "a b c " * 50, "--json", path]) == 2
    assert match in capsys.readouterr().err


def test_eval_json_on_a_full_disk_leaves_no_file(tmp_path, monkeypatch, capsys):
    import gradmap.cli.eval as cli_eval
    monkeypatch.setattr(cli_eval, "load_model", lambda *a, **k: (tiny_model("llama", 2), tiny_tokenizer()))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", "m", "--ppl", "text:" + "the cat sat. " * 40, "--seq-len", "16",
               "--json", str(out), "--no-progress"])
    assert rc == 2 and "is full" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_json_nan_is_written_as_null(tmp_path):
    checks.write_json(str(tmp_path / "r.json"), {"ppl": float("nan"), "acc": [float("-inf")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"ppl": None, "acc": [None]}


def test_compare_reports_every_methods_typo(tmp_path, capsys, no_load):
    assert main(["compare", "--model", "m", "--n-prune", "1", "--methods", "gradmapp,sleb,angulr",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "2 method names are invalid" in err and "'gradmapp'" in err and "'angulr'" in err


def test_compare_rerun_after_an_aborted_run_needs_no_overwrite(tmp_path):
    from gradmap.experiments.compare_checks import unfinished_run
    out = tmp_path / "c"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"status": "aborted: GradmapError: x"}))
    assert unfinished_run(out)
    (out / "results.json").write_text(json.dumps({"status": "complete"}))
    assert not unfinished_run(out)
    (out / "results.json").write_text(json.dumps({"status": "running"}))  # maybe still going
    assert not unfinished_run(out)


def test_help_lists_values_and_version_and_bare_command_prints_help(capsys):
    from gradmap.prune.compensation import COMPENSATORS
    from gradmap.prune.metrics import available_metrics
    assert list(checks.METRICS) == available_metrics()
    assert list(checks.COMPENSATIONS) == list(COMPENSATORS)
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "block-influence, angular" in text and "projection, magnitude, replaceme" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("gradmap 0.")
    assert main([]) == 2  # no command: the help, on stderr, and the usage-error status
    captured = capsys.readouterr()
    out = captured.err
    assert captured.out == "" and "usage: gradmap" in out and "cli_" not in out and "prune" in out


def test_sparsify_cli_copies_of_the_library_names_match():
    import importlib
    lib = importlib.import_module("gradmap.sparsity.sparsify")
    import gradmap.cli.sparsify as cli
    assert cli.ALLOCATIONS == lib.ALLOCATIONS and cli.SCORES == lib.SCORES
    assert cli.OPTION_DEFAULTS == lib.OPTION_DEFAULTS


@pytest.mark.parametrize("argv", [["-v", "eval", "--model", "m"], ["eval", "--model", "m", "-v"]])
def test_verbose_flag_works_before_and_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["eval", "--model", "m"]).verbose is False


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, time; t = time.perf_counter(); from gradmap.cli.app import main\n"
            "try:\n    main(['prune', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
            "print('SECONDS', time.perf_counter() - t)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "HEAVY []" in out
    assert float(out.split("SECONDS")[1]) < 1.0, out
    assert time.perf_counter() - start < 10  # interpreter start included, on a busy machine


FORBIDDEN = [("torch.load(", "torch.load without weights_only=True"), ("pickle", "pickle"),
             ("eval(", "eval("), ("exec(", "exec("), ("shell=True", "shell=True")]


def test_security_no_unsafe_loading_or_execution_in_the_package():
    import re
    problems = []
    for path in sorted((ROOT / "gradmap").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for needle, what in FORBIDDEN:
                hit = re.search(rf"(?<![\w.]){re.escape(needle)}" if needle.endswith("(")
                                else re.escape(needle), code)
                if hit and not (needle == "torch.load(" and "weights_only=True" in code):
                    problems.append(f"{path.relative_to(ROOT)}:{n}: {what}")
    assert problems == []


@pytest.mark.parametrize("cmd,match", [
    (lambda r, t: _prune(r, t, "--compensation", "magnitude,magnitude"), "'magnitude' is given twice"),
    (lambda r, t: _prune(r, t, "--metric", "gradmap", "--metric-option", "verify=2",
                         "--metric-option", "verify=4"), "--metric-option verify is given twice"),
    (lambda r, t: _prune(r, t, "--seed", "-7"), "--seed must be a non-negative integer"),
    (lambda r, t: _prune(r, t, "--method", "block-influence+replaceme(safeguards='False')"),
     "safeguards must be True or False"),
    (lambda r, t: ["eval", "--model", "m", "--tasks", ""], "--tasks is empty"),
    (lambda r, t: ["sparsify", "--model", str(r / "model"), "--out", str(t / "s"), "--tasks", "boolq"],
     "--tasks only apply with --eval"),
    (lambda r, t: ["sparsify", "--model", str(r / "model"), "--out", str(t / "s"), "--seed", "-1"],
     "--seed must be a non-negative integer"),
])
def test_silent_reinterpretations_are_refused_before_loading(tiny_dir, tmp_path, capsys, no_load, cmd,
                                                            match):
    assert main(cmd(tiny_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("cmd,match", [
    (lambda r, t: ["compare", "--model", str(r / "model"), "--n-prune", "1", "--tasks", "none",
                   "--calib", str(r / "calib.txt"), "--seq-len", "5000", "--out", str(t / "c")],
     "--seq-len 5000 exceeds the model's context of 256"),
    (lambda r, t: ["sparsify", "--model", str(r / "model"), "--out", str(t / "s"), "--score", "magnitude",
                   "--allocation", "uniform", "--eval", "--ppl-seq-len", "100000"],
     "--ppl-seq-len 100000 exceeds"),
    (lambda r, t: _prune(r, t, "--speed", "--speed-prefill", "100000"), "--speed-prefill 100000 exceeds"),
])
def test_lengths_beyond_the_context_are_refused_before_loading(tiny_dir, tmp_path, capsys, no_load, cmd,
                                                               match):
    assert main(cmd(tiny_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert os.listdir(tmp_path) == []


def test_a_tiny_mrp_step_is_refused_before_loading(tiny_dir, tmp_path, capsys, no_load):
    assert main(["sparsify", "--model", str(tiny_dir / "model"), "--out", str(tmp_path / "s"),
                 "--mrp-step", "1e-300"]) == 2  # used to run ~1e300 steps
    assert "mrp_step" in capsys.readouterr().err and os.listdir(tmp_path) == []


def _copy_model(root, tmp_path, **config):
    """The tiny model with `config` merged into its config.json (weights untouched)."""
    import shutil
    d = tmp_path / "model"
    shutil.copytree(root / "model", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


@pytest.mark.parametrize("cmd", [
    lambda m, r, t: _prune(r, t, "--model", str(m)),
    lambda m, r, t: ["sparsify", "--model", str(m), "--out", str(t / "s"), "--score", "magnitude"],
    lambda m, r, t: ["compare", "--model", str(m), "--n-prune", "1", "--tasks", "none", "--calib",
                     str(r / "calib.txt"), "--seq-len", "16", "--ppl-seq-len", "32", "--out",
                     str(t / "c")],
])
def test_unsupported_model_type_is_refused_before_loading(tiny_dir, tmp_path, capsys, no_load, cmd):
    model = _copy_model(tiny_dir, tmp_path, model_type="gpt2")
    assert main(cmd(model, tiny_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'gpt2' model (config.json model_type)" in err, err
    assert "supported model types: gemma2, gemma3_text, llama" in err


def test_nm_pattern_that_does_not_divide_the_widths_is_refused_before_loading(tiny_dir, tmp_path,
                                                                              capsys, no_load):
    # tiny: hidden_size 32 (4:32 fits), intermediate_size 48 (it does not)
    assert main(["sparsify", "--model", str(tiny_dir / "model"), "--out", str(tmp_path / "s"),
                 "--score", "magnitude", "--pattern", "4:32"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "pattern 4:32 needs every layer's in_features to be a multiple of 32" in err
    assert "has 48 (config.json)" in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,data,match", [
    ("empty.txt", b"", "holds no text"), ("blank.txt", b" \n\n\t", "holds no text"),
    ("blank.jsonl", b'{"text": " "}\n\n', "holds no text"),
    ("latin1.txt", "café ".encode("latin-1") * 50, "is not UTF-8 text.*iconv"),
    ("bad.jsonl", b'{"txt": "x"}\n', "has no string field 'text'"),
])
@pytest.mark.parametrize("cmd", [
    lambda r, t, c: _prune(r, t, "--calib", str(c)),
    lambda r, t, c: ["sparsify", "--model", str(r / "model"), "--out", str(t / "s"),
                     "--calib-source", str(c)],
    lambda r, t, c: ["compare", "--model", str(r / "model"), "--n-prune", "1", "--tasks", "none",
                     "--calib", str(c), "--seq-len", "16", "--ppl-seq-len", "32", "--out", str(t / "c")],
])
def test_bad_calibration_files_are_refused_before_loading(tiny_dir, tmp_path, capsys, no_load, cmd,
                                                          name, data, match):
    calib = tmp_path / "data" / name
    calib.parent.mkdir()
    calib.write_bytes(data)
    assert main(cmd(tiny_dir, tmp_path, calib)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("family", FAMILIES)
def test_widths_read_from_config_are_the_loaded_layers_in_features(family):
    """The early N:M check reads config.json; it must name the widths the sparsifier will see."""
    from gradmap.core.adapter import get_adapter
    from gradmap.core.config_checks import config_widths
    model = tiny_model(family, 2, **({} if family == "phi3" else {"head_dim": 10}))  # o_proj: 40
    adapter = get_adapter(model)
    real = {lin.in_features for p in range(adapter.num_layers)
            for lin in adapter.linear_modules(p).values()}
    assert config_widths(json.loads(model.config.to_json_string())) == real
