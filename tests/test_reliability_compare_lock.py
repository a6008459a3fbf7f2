"""Two `gradmap compare` runs to one --out at once: exactly one proceeds, the other is refused."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tiny import tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A child running the real CLI; its "load" touches <sync>/<tag> and waits for <sync>/release, so
# both runs are inside compare at the same time, then aborts (nothing heavy runs).
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import gradmap.core.models
    from gradmap.core.errors import GradmapError
    from gradmap.cli.app import main
    sync, tag = sys.argv[1:3]
    def wait_in_load(*a, **k):
        open(os.path.join(sync, tag), "w").close()
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(sync, "release")) and time.time() < deadline:
            time.sleep(0.05)
        raise GradmapError("released")
    gradmap.core.models.load_model = wait_in_load
    sys.exit(main(sys.argv[3:]))
""")


def test_two_compare_runs_to_one_out_exactly_one_proceeds(tmp_path):
    tiny_model("llama", 4).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(TRAIN_TEXT * 8))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(TESTS)))
    out = tmp_path / "results"
    # --overwrite on both: the results-folder checks pass for each, so only the lock can refuse
    argv = ["compare", "--model", str(tmp_path / "model"), "--n-prune", "1", "--tasks", "none",
            "--calib", str(tmp_path / "calib.txt"), "--seq-len", "16", "--ppl-seq-len", "32",
            "--out", str(out), "--overwrite", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {tag: subprocess.Popen([sys.executable, str(script), str(tmp_path), tag, *argv],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env)
             for tag in "ab"}
    try:
        deadline = time.time() + 180
        while any(not (tmp_path / t).exists() and p.poll() is None for t, p in procs.items()):
            assert time.time() < deadline, "neither child got into compare nor exited"
            time.sleep(0.1)
        started = [t for t in procs if (tmp_path / t).exists()]
        assert len(started) == 1, f"{len(started)} runs proceeded into one --out"
        refused = procs["b" if started == ["a"] else "a"]
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 2
        assert err.strip().splitlines() == [
            f"gradmap compare: error: another gradmap run is writing to {str(out)!r}; wait for it "
            "to finish or choose another --out"], err
    finally:
        (tmp_path / "release").touch()
        for p in procs.values():
            if p.returncode is None:
                p.communicate(timeout=60)
    # the run that proceeded owns the folder: its own result (aborted on release) is what is there
    assert procs[started[0]].returncode == 2
    assert '"status": "aborted: GradmapError: released"' in (out / "results.json").read_text()
