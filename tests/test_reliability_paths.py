"""Outputs never replace or enter an input, a system or home folder, or each other (issue 25)."""
import hashlib
import os
import random
import re
import stat
from pathlib import Path

import pytest
from tiny import tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer

import gradmap.core.models
from gradmap import GradmapError, save_pretrained
from gradmap.cli.app import main
from gradmap.core.checkpoint import prepare_output_dir
from gradmap.core.gguf_write import check_gguf_target
from gradmap.core.output_paths import MARKER


@pytest.fixture
def project(tmp_path):
    """P/models/tiny (a model), P/calib.txt and an unrelated file, as a user's project folder."""
    model = tmp_path / "P" / "models" / "tiny"
    tiny_model("llama", n_layers=4, seed=0).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    (tmp_path / "P" / "calib.txt").write_text("\n\n".join(TRAIN_TEXT * 8))
    (tmp_path / "P" / "notes.txt").write_text("mine")
    return tmp_path / "P"


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad output was found")
    monkeypatch.setattr(gradmap.core.models, "load_model", refuse)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _prune(project, out, *extra):
    return ["prune", "--model", str(project / "models" / "tiny"), "--n-prune", "1", "--calib",
            str(project / "calib.txt"), "--n-calib", "2", "--seq-len", "16", "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("argv", [
    lambda P: _prune(P, P, "--overwrite"),                       # the reproducer
    lambda P: _prune(P, P, "--force-overwrite"),
    lambda P: _prune(P, P / "models" / "tiny", "--force-overwrite"),
    lambda P: _prune(P, P / "models" / "tiny" / "sub"),          # inside the model
    lambda P: _prune(P, P / "calib.txt", "--force-overwrite"),
    lambda P: ["sparsify", "--model", str(P / "models" / "tiny"), "--out", str(P / "models" / "tiny"),
               "--score", "magnitude", "--allocation", "uniform", "--force-overwrite"],
    lambda P: ["compare", "--model", str(P / "models" / "tiny"), "--n-prune", "1", "--calib",
               str(P / "calib.txt"), "--tasks", "none", "--seq-len", "16", "--ppl-seq-len", "64", "--out", str(P.parent / "c"),
               "--save", str(P / "models"), "--force-overwrite"],
])
def test_an_output_over_or_inside_an_input_is_refused_before_loading(project, capsys, no_load, argv):
    before = _snapshot(project.parent)
    assert main(argv(project)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the input" in err, err
    assert _snapshot(project.parent) == before
    assert not (project / "models" / "tiny" / "sub").exists()


@pytest.mark.parametrize("out", ["/usr", "/root", "~", "/proc/x", "/etc/gradmap", "/home", "/tmp"])
def test_system_and_home_folders_are_refused(out):
    with pytest.raises(GradmapError, match="system"):
        prepare_output_dir(out, overwrite="force")


def test_overwrite_replaces_only_what_gradmap_wrote(project):
    theirs = project.parent / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("keep")
    with pytest.raises(GradmapError, match="not written by gradmap .*--force-overwrite"):
        prepare_output_dir(theirs, overwrite=True)
    (theirs / MARKER).touch()
    assert prepare_output_dir(theirs, overwrite=True) == theirs


@pytest.mark.parametrize("argv,match", [
    (lambda P, T: _prune(P, T / "D", "--gguf", str(T / "D" / "m.gguf"), "--overwrite"), "--out .* contains --gguf"),
    (lambda P, T: ["compare", "--model", str(P / "models" / "tiny"), "--n-prune", "1", "--tasks", "none",
                   "--seq-len", "16", "--ppl-seq-len", "64", "--calib", str(P / "calib.txt"), "--out", str(T / "k" / "res"), "--save", str(T / "k"),
                   "--overwrite"], "--out .* lies inside --save"),
    (lambda P, T: ["compare", "--model", str(P / "models" / "tiny"), "--n-prune", "1", "--tasks", "none",
                   "--seq-len", "16", "--ppl-seq-len", "64", "--calib", str(P / "calib.txt"), "--out", str(T / "k"), "--save", str(T / "s"),
                   "--save-gguf", str(T / "s" / "m.gguf")], "--save .* contains --save-gguf"),
])
def test_outputs_of_one_command_must_not_overlap(project, tmp_path, capsys, no_load, argv, match):
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "m.gguf").write_bytes(b"gguf")
    assert main(argv(project, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert (tmp_path / "D" / "m.gguf").read_bytes() == b"gguf"


def test_random_in_out_combinations_never_touch_an_input(tmp_path):
    """Property: whatever output path is chosen (same, parent, child, sibling, symlinked, system),
    the checks refuse it or the save leaves every input byte as it was."""
    root = tmp_path / "w"
    model_dir = root / "a" / "model"
    tiny_model("llama", 2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (root / "a" / "calib.txt").write_text("text")
    (root / "link-model").symlink_to(model_dir)
    (root / "link-a").symlink_to(root / "a")
    inputs = [model_dir, root / "a" / "calib.txt"]
    model = gradmap.core.models.load_model(str(model_dir))[0]
    candidates = [model_dir, model_dir / "x", root / "a", root, root / "link-model", root / "link-a",
                  root / "link-a" / "model", root / "link-a" / "new", root / "a" / "calib.txt",
                  root / "sibling", root / "deep" / "er" / "out", Path("/usr"), Path("/root"),
                  Path.home(), Path("/")]
    state = lambda: (_snapshot(model_dir), (root / "a" / "calib.txt").read_bytes())  # noqa: E731
    before = state()
    rng = random.Random(0)
    refused = written = 0
    for _ in range(16):
        out = rng.choice(candidates)
        system = not str(out).startswith(str(tmp_path))
        for inputs_given in (inputs, []):  # the CLI names them; the API finds the model's own source
            try:
                prepare_output_dir(out, "force", inputs_given)
                check_gguf_target(out.with_suffix(".gguf"), True, inputs_given)
            except GradmapError:
                refused += 1
                continue
            assert not system, out  # never attempt a real save over a system folder
            try:
                save_pretrained(model, None, out, overwrite="force")
                written += 1
            except GradmapError:
                refused += 1
            assert state() == before, out
    assert refused and written


def test_missing_parent_folders_are_created_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_pretrained(tiny_model("llama", 2), tiny_tokenizer(), tmp_path / "runs" / "p8")
    finally:
        os.umask(old)
    assert (out / "config.json").is_file() and (out / MARKER).is_file()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # model.safetensors used to be 0600
    assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == 0o755


def test_a_failing_gguf_export_keeps_the_saved_checkpoint(project, tmp_path, monkeypatch, capsys):
    import gradmap.core.gguf_export as gguf_export

    def fail(*a, **k):
        raise GradmapError("GGUF export failed")
    monkeypatch.setattr(gguf_export, "export_gguf", fail)
    out = tmp_path / "out"
    argv = _prune(project, out, "--metric", "block-influence", "--compensation", "none",
                  "--gguf", str(tmp_path / "m.gguf"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "GGUF export failed (the pruned checkpoint is saved in" in err, err
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
