"""The GPU check's record (bench/gpu_report.py, issue 27): results reach the disk as they finish,
deadlines skip what does not fit, skipped is never passed, the watchdog keeps the budget, and a
sanitizer probe that hangs is a note. No GPU needed: these are the parts a GPU run cannot debug."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from gpu_report import Report, Skip  # noqa: E402


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "gpu_results.jsonl").read_text().splitlines()]


def _fail():
    raise AssertionError("wrong")


def _skip():
    raise Skip("extension not built")


def test_each_result_is_on_disk_as_soon_as_it_finishes(tmp_path):
    report = Report(str(tmp_path), dry=True, device="cpu", budget_s=300)
    report.check("a", lambda: {"x": 1})
    assert [r["outcome"] for r in _lines(tmp_path)] == ["passed"]  # before any report is written
    report.check("b", _fail)
    report.check("c", _skip)
    report.measurement("m", "1 ms")
    assert [(r["name"], r.get("outcome")) for r in _lines(tmp_path)] == [
        ("a", "passed"), ("b", "failed"), ("c", "skipped"), ("m", None)]
    line = report.finish()
    assert line.startswith("gpu check: 1 passed, 1 failed (b), 1 skipped (c)"), line
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["summary"] == line and len(saved["records"]) == 4
    assert "| c | skipped |" in (tmp_path / "gpu_report.md").read_text()


def test_deadlines_skip_what_does_not_fit(tmp_path):
    report = Report(str(tmp_path), dry=True, device="cpu", budget_s=100)
    with report.stage("first", 0.5, 0.5) as started:
        assert started and 30 < report.deadline - time.time() <= 45  # half of the 90 s left
        report.check("too long", lambda: None, need_s=500)
        report.deadline = time.time() - 1  # the stage ran out
        report.check("late", lambda: None)
    (tmp_path / "x").mkdir()
    spent = Report(str(tmp_path / "x"), dry=True, device="cpu", budget_s=5, started_at=time.time() - 60)
    with spent.stage("second", 1.0, 0.0) as started:
        assert not started
    outcomes = {r["name"]: (r.get("outcome"), r.get("why", "")) for r in _lines(tmp_path)}
    assert outcomes["too long"][0] == "skipped" and "needs about 500 s" in outcomes["too long"][1]
    assert outcomes["late"] == ("skipped", "past the deadline of stage first")
    assert _lines(tmp_path / "x")[0]["outcome"] == "skipped"


def test_the_watchdog_writes_the_reports_and_ends_the_run_at_the_budget(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'bench')!r})
        from gpu_report import Report
        r = Report({str(tmp_path)!r}, dry=True, device="cpu", budget_s=20, started_at=time.time() - 19,
                   reserve_s=0)
        r.start_watchdog()
        r.check("quick", lambda: None)
        with r.stage("long", 1.0, 0.0):
            r.check("hangs", lambda: time.sleep(60))
    """)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and time.time() - t0 < 30, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu check: 1 passed, 1 failed") and "exhausted" in last, proc.stdout
    names = [r["name"] for r in _lines(tmp_path)]
    assert names[0] == "quick" and "exhausted during long: hangs" in names[-1]
    assert (tmp_path / "gpu_report.md").exists()


def test_summarize_rebuilds_the_reports_after_a_kill(tmp_path):
    report = Report(str(tmp_path), dry=True, device="cpu", budget_s=300)
    report.check("a", lambda: None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--summarize", str(tmp_path),
                           "--why", "killed by timeout"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("gpu check: 1 passed, 1 failed (killed by timeout)")


def test_a_sanitizer_probe_that_hangs_is_a_note(tmp_path, monkeypatch):
    import gpu_check
    tool = tmp_path / "compute-sanitizer"
    tool.write_text("#!/bin/sh\nsleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = Report(str(tmp_path), dry=True, device="cpu", budget_s=300)
    t0 = time.time()
    gpu_check.sanitizer(report, str(tmp_path), probe_timeout=0.5)
    assert time.time() - t0 < 10
    (record,) = _lines(tmp_path)
    assert record["outcome"] == "skipped" and "did not finish" in record["why"]


@pytest.mark.parametrize("script", ["run", "gpu"])
def test_ci_runs_the_dry_run_and_the_quick_run_has_no_sanitizer(script):
    text = (ROOT / ".ci" / script).read_text()
    if script == "run":
        assert "bash .ci/gpu --dry-run" in text
    else:
        assert "SANITIZER=${GRADMAP_GPU_SANITIZER:-0}" in text and "--no-sanitizer" in text
        assert "pip install -v" in text and "-q" not in text.split("pip install")[1].split("\n")[0]
