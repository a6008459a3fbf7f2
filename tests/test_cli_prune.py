"""`gradmap prune` end to end on a tiny saved model (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer
from transformers import AutoModelForCausalLM

from gradmap.cli.app import main
from gradmap.cli.prune import parse_options
from gradmap.core.errors import GradmapError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_prune")
    model_dir = root / "model"
    tiny_model("llama", n_layers=6, seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = root / "calib.txt"
    text.write_text("\n\n".join(TRAIN_TEXT * 8))
    return model_dir, text


@pytest.mark.parametrize("metric,schedule,options", [
    ("gradmap", "iterative", ["verify=2"]),
    ("block-influence", "one-shot", []),
])
def test_prune_cli_saves_checkpoint_report_and_plot(tiny_dir, tmp_path, metric, schedule, options):
    model_dir, text = tiny_dir
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--n-prune", "2", "--metric", metric,
            "--schedule", schedule, "--calib", str(text), "--n-calib", "4", "--seq-len", "24",
            "--compensation", "none", "--out", str(out), "--no-progress"]
    for o in options:
        argv += ["--metric-option", o]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == metric and report["schedule"] == schedule
    removed = report["removed_layers"]
    assert len(removed) == 2 and not {0, 5} & set(removed)
    assert len(report["scores"]) == (2 if schedule == "iterative" else 1)
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    assert reloaded.config.gradmap_layer_ids == [i for i in range(6) if i not in removed]


def test_prune_cli_checks_out_before_loading(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep me")
    code = main(["prune", "--model", str(tmp_path / "does-not-exist"), "--n-prune", "2",
                 "--compensation", "none", "--out", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep me"


def test_prune_cli_rejects_bad_metric_before_loading(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "nothing"), "--n-prune", "2", "--metric", "foo",
                 "--out", str(tmp_path / "o"), "--compensation", "none"])
    assert code == 2
    assert "valid metrics" in capsys.readouterr().err


def test_parse_options():
    assert parse_options(["verify=4", "gradient=token", "verify_samples=None"]) == {
        "verify": 4, "gradient": "token", "verify_samples": None}
    with pytest.raises(GradmapError, match="KEY=VALUE"):
        parse_options(["verify"])


def test_prune_cli_offload_layer_matches_in_memory(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    model_dir, text = tiny_dir
    common = ["prune", "--model", str(model_dir), "--n-prune", "2", "--calib", str(text),
              "--n-calib", "4", "--seq-len", "24", "--compensation", "magnitude", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "mem")]) == 0
    assert main(common + ["--out", str(tmp_path / "off"), "--offload", "layer"]) == 0
    rep = {k: json.loads((tmp_path / k / "report.json").read_text()) for k in ("mem", "off")}
    assert rep["off"]["removed_layers"] == rep["mem"]["removed_layers"]
    assert rep["off"]["command"]["offload"] == "layer"
    mem, off = (load_file(tmp_path / k / "model.safetensors") for k in ("mem", "off"))
    assert mem.keys() == off.keys()
    for name in mem:  # folded magnitude scales included
        torch.testing.assert_close(off[name], mem[name], rtol=1e-5, atol=1e-6)


def test_prune_cli_offload_rejects_unstreamable_metric_before_loading(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "does-not-exist"), "--n-prune", "2",
                 "--metric", "taylor", "--compensation", "none", "--offload", "layer",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "offload='layer'" in err and "taylor" in err
    assert not (tmp_path / "o").exists()


def test_prune_cli_method_string_carries_compensator_options(tiny_dir, tmp_path):
    model_dir, text = tiny_dir
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--n-prune", "2", "--calib", str(text),
                 "--n-calib", "4", "--seq-len", "24", "--out", str(out), "--no-progress",
                 "--method", "block-influence+magnitude+replaceme(each_step=True)@iterative"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "block-influence" and report["schedule"] == "iterative"
    assert report["compensation"] == ["magnitude", "replaceme"]
    assert report["options"]["compensation_options"]["replaceme"]["each_step"] is True
    assert report["options"]["default_pipeline"] is False
    assert report["command"]["method"].startswith("block-influence+magnitude+replaceme(")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


@pytest.mark.parametrize("extra,message", [
    (["--metric", "gradmap"], "--metric cannot be given"),
    (["--compensation", "magnitude", "--schedule", "one-shot"], "--schedule, --compensation cannot"),
    (["--metric-option", "verify=4"], "--metric-option cannot"),
])
def test_prune_cli_method_refuses_other_pipeline_flags_before_loading(tmp_path, capsys, extra, message):
    code = main(["prune", "--model", str(tmp_path / "nothing"), "--n-prune", "2", "--out", str(tmp_path / "o"),
                 "--method", "block-influence+magnitude"] + extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prune_cli_rejects_bad_method_before_loading(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "nothing"), "--n-prune", "2", "--out", str(tmp_path / "o"),
                 "--method", "block-influence+replaceme(each_stp=True)"])
    assert code == 2
    err = capsys.readouterr().err
    assert "each_stp" in err and "Traceback" not in err
