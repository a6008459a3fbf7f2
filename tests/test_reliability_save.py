"""Faults while saving: concurrent saves, SIGKILL, full disk, bad targets, report/extra-file checks."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradmap import GradmapError, save_pretrained
from gradmap.core import checkpoint
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A child that saves a tiny model to OUT; between writing its temporary copy and the final
# rename it touches <sync>/<tag> and waits for <sync>/<other> (or sleeps forever with 'hang').
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from gradmap import GradmapError, save_pretrained
    from tiny import tiny_model
    out, sync, tag, other = sys.argv[1:5]
    model = tiny_model("llama", 2, seed=int(tag == "b"))
    real = model.save_pretrained
    def save_then_wait(path, **kw):
        real(path, **kw)
        open(os.path.join(sync, tag), "w").close()
        deadline = time.time() + 120
        while other == "hang" or not os.path.exists(os.path.join(sync, other)):
            time.sleep(0.05)
            if time.time() > deadline:
                sys.exit(3)
    model.save_pretrained = save_then_wait
    try:
        save_pretrained(model, None, out, report={{"writer": tag}})
    except GradmapError as exc:
        print("REFUSED", exc)
        sys.exit(2)
    print("SAVED")
""").format(root=str(ROOT), tests=str(TESTS))


def _child(tmp_path, out, tag, other):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path), tag, other],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_two_processes_saving_to_one_new_folder_exactly_one_wins(tmp_path):
    """Both pass the initial check; the second final rename must refuse, not replace."""
    out = tmp_path / "race" / "out"
    out.parent.mkdir()
    a, b = _child(tmp_path, out, "a", "b"), _child(tmp_path, out, "b", "a")
    outputs = [p.communicate(timeout=300)[0] for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], outputs
    winner = "a" if a.returncode == 0 else "b"
    loser_text = outputs[1] if winner == "a" else outputs[0]
    assert "filled by another process" in loser_text
    assert json.loads((out / "report.json").read_text()) == {"writer": winner}
    assert _leftovers(out.parent, "out") == []


def test_folder_filled_meanwhile_is_kept_and_empty_one_is_replaced(tmp_path):
    out = tmp_path / "out"
    model = tiny_model("llama", 2)
    real = model.save_pretrained

    def someone_else_writes(path, **kw):
        real(path, **kw)
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")

    model.save_pretrained = someone_else_writes
    with pytest.raises(GradmapError, match="filled by another process"):
        save_pretrained(model, None, out)
    assert os.listdir(out) == ["theirs.txt"] and _leftovers(tmp_path, "out") == []

    out2 = tmp_path / "out2"
    model.save_pretrained = lambda path, **kw: (real(path, **kw), out2.mkdir())
    save_pretrained(model, None, out2)
    assert (out2 / "config.json").is_file()


def test_sigkill_during_save_leaves_a_recognisable_folder_that_the_next_save_removes(tmp_path):
    out = tmp_path / "out"
    child = _child(tmp_path, out, "a", "hang")
    deadline = time.time() + 120
    while not (tmp_path / "a").exists():
        assert child.poll() is None and time.time() < deadline, child.communicate()[0]
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    stale = _leftovers(tmp_path, "out")
    assert len(stale) == 1 and ".gradmap-tmp-" in stale[0], stale
    assert (tmp_path / stale[0] / "model.safetensors").is_file()  # the partial copy
    save_pretrained(tiny_model("llama", 2), None, out)
    assert (out / "config.json").is_file() and _leftovers(tmp_path, "out") == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_checkpoint_replaced_by_a_killed_save_is_restored(tmp_path):
    """Killed between moving the old checkpoint aside and moving the new one in."""
    backup = tmp_path / f".out.gradmap-old-{_dead_pid()}-0badc0de"
    (backup / "old").mkdir(parents=True)
    (backup / "old" / "config.json").write_text("{}")
    live = tmp_path / f".out.gradmap-tmp-{os.getpid() + 0}-00000001"  # our own: never removed
    live.mkdir()
    with pytest.raises(GradmapError, match="not empty"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert _leftovers(tmp_path, "out") == [live.name]


def test_full_disk_while_writing_weights_is_one_clear_error(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a real full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(GradmapError, match="disk holding .* is full"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_full_disk_reported_by_safetensors_is_one_clear_error(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(GradmapError, match="is full"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=10))
    with pytest.raises(GradmapError, match="only 0.00 GiB are free"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["", "  ", ".", "/", "..", "./"])
def test_output_that_is_cwd_root_or_empty_is_refused(bad, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(GradmapError, match="empty|current directory|filesystem root"):
        save_pretrained(tiny_model("llama", 2), None, bad, overwrite=True)
    assert os.listdir(work) == [] and os.listdir(tmp_path) == ["work"]


@pytest.mark.parametrize("name", ["../escape.txt", "sub/x.txt", "/tmp/abs.txt", "..", ""])
def test_extra_file_names_cannot_leave_the_output_folder(name, tmp_path):
    with pytest.raises(GradmapError, match="not a plain file name"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out", extra_files={name: b"x"})
    assert os.listdir(tmp_path) == []


def test_output_folder_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_pretrained(tiny_model("llama", 2), None, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_report_nan_is_written_as_null(tmp_path):
    out = save_pretrained(tiny_model("llama", 2), None, tmp_path / "out",
                          report={"ppl": float("nan"), "x": [float("inf"), 1.5]})
    text = (out / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ppl": None, "x": [None, 1.5]}


def test_non_finite_weights_are_never_saved(tmp_path):
    import torch
    model = tiny_model("llama", 2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(GradmapError, match="down_proj.weight holds NaN or infinite values"):
        save_pretrained(model, None, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_huge_ridge_and_string_booleans_are_refused():
    from gradmap.experiments.methods import parse_method
    with pytest.raises(GradmapError, match=r"ridge values must be numbers in \[0, 1e\+06\]"):
        parse_method("block-influence+replaceme(ridge=1e999,safeguards=False)")
    with pytest.raises(GradmapError, match="safeguards must be True or False"):
        parse_method("block-influence+replaceme(safeguards='False')")


def test_extra_file_cannot_replace_a_checkpoint_file(tmp_path):
    with pytest.raises(GradmapError, match="'model.safetensors' would replace a file of the checkpoint"):
        save_pretrained(tiny_model("llama", 2), None, tmp_path / "out",
                        extra_files={"model.safetensors": b"junk"})
    assert os.listdir(tmp_path) == []


def test_gguf_writer_uses_the_checkpoint_writers_safeguards(tmp_path, monkeypatch):
    from gradmap.core import gguf_write
    out = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.gradmap-tmp-{_dead_pid()}-0badc0de"  # from a killed export
    stale.write_bytes(b"\0" * 100)
    real = gguf_write.GGUFWriter

    def racing_writer(path, arch):  # another export lands the file while this one writes
        out.write_bytes(b"theirs")
        return real(path, arch)
    monkeypatch.setattr(gguf_write, "GGUFWriter", racing_writer)
    with pytest.raises(GradmapError, match="written by another process meanwhile"):
        gguf_write.write_gguf(out, "llama", lambda w: None)
    assert out.read_bytes() == b"theirs" and sorted(os.listdir(tmp_path)) == ["m.gguf"]

    def read_only(path, arch):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(gguf_write, "GGUFWriter", read_only)
    with pytest.raises(GradmapError, match=r"writing .*m2.gguf' failed \(Permission denied\)"):
        gguf_write.write_gguf(tmp_path / "m2.gguf", "llama", lambda w: None)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
    monkeypatch.setattr(gguf_write, "GGUFWriter", real)
    gguf_write.write_gguf(tmp_path / "new" / "m3.gguf", "llama", lambda w: None)  # folder created
    assert (tmp_path / "new" / "m3.gguf").stat().st_size > 0
