"""Triton kernels vs plain-torch references, run on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are defined, and other tests
may already have imported triton in this process, so the cases (tests/
kernel_cases.py) run once in a subprocess with the variable set; each kernel
group below then asserts on its own cases from that run's JUnit report.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "kernel_cases.py")
GROUPS = ["grad_reductions", "gate_reduction", "moments", "launchers", "end_to_end"]


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed")
    report = tmp_path_factory.mktemp("kernels") / "junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", GRADMAP_KERNEL_POISON="1")
    env.pop("GRADMAP_FORCE_REFERENCE", None)
    cmd = [sys.executable, "-m", "pytest", CASES, "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", "-o", "junit_family=xunit2"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=900)
    output = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode not in (0, 1) or not report.exists():
        pytest.fail(f"interpreter run did not complete (exit {proc.returncode}):\n{output}")
    cases = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else problem.tag
        message = "" if problem is None else (problem.get("message") or "")[:1500]
        cases[case.get("name")] = (outcome, message)
    return cases, output


@pytest.mark.parametrize("group", GROUPS)
def test_kernel_matches_reference_under_interpreter(interpreter_run, group):
    cases, output = interpreter_run
    mine = {name: res for name, res in cases.items() if name.startswith(f"test_{group}")}
    assert mine, f"no interpreter cases for {group} ran:\n{output}"
    bad = {name: res for name, res in mine.items() if res[0] != "passed"}
    assert not bad, "\n".join(f"{name}: {outcome}: {msg}" for name, (outcome, msg) in bad.items())


def test_every_interpreter_case_belongs_to_a_group(interpreter_run):
    cases, _ = interpreter_run
    orphans = [n for n in cases if not any(n.startswith(f"test_{g}") for g in GROUPS)]
    assert not orphans, f"cases outside the reported groups: {orphans}"


def test_launchers_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    import torch

    from gradmap.core.errors import GradmapError
    from gradmap.ops import backend
    check_inputs = backend.load_kernels().utils.check_inputs
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GradmapError, match="needs CUDA tensors"):
        check_inputs("gate_reduction", g=torch.zeros(2, 3), u=torch.zeros(2, 3))
    with pytest.raises(GradmapError, match="dtype"):
        check_inputs("gate_reduction", g=torch.zeros(2, dtype=torch.int64))
