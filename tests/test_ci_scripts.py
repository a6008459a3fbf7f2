"""The .ci scripts a newcomer runs first (issue 29): the demo builds no llama.cpp, set-up skips an
unchanged rebuild, no phase is silent for long, and the tests read $GRADMAP_DATA_DIR."""
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci"


def _bash(script: str, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_heartbeat_speaks_every_interval_and_keeps_the_exit_status():
    res = _bash(f". {CI}/lib.sh; heartbeat 'build x' bash -c 'sleep 2.6; exit 3'; echo rc=$?",
                HEARTBEAT_S="1")
    assert res.stdout.strip() == "rc=3"
    assert res.stderr.count("build x: still running") >= 2, res.stderr


def test_build_stamp_follows_the_build_inputs_only(tmp_path):
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")

    def stamp(**env) -> str:
        res = _bash(f". {CI}/lib.sh; build_stamp", cwd=tmp_path, PYTHON_BIN="false", **env)
        assert res.returncode == 0 and len(res.stdout.strip()) == 64, res.stderr
        return res.stdout.strip()

    first = stamp()
    (tmp_path / "README.md").write_text("not a build input")
    assert stamp() == first
    assert stamp(GRADMAP_BUILD_EXT="0") != first
    src = next(p for p in sorted((tmp_path / "csrc").iterdir()) if p.is_file())
    src.write_text(src.read_text() + "\n// changed\n")
    assert stamp() != first


def test_the_demo_builds_no_llama_cpp_and_run_still_does():
    for script in ("setup", "demo"):
        assert "llama-cpp-python" not in (CI / script).read_text(), script
    run = (CI / "run").read_text()
    assert run.index("bash .ci/gguf-runtime") < run.index("python -m pytest")
    assert 'pip install -q "llama-cpp-python' in (CI / "gguf-runtime").read_text()


def test_a_long_test_prints_a_line_while_it_runs(tmp_path):
    """The repository conftest's heartbeat reaches the terminal through pytest's capture."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(1.6)\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                          "no:cacheprovider", "test_slow.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "GRADMAP_TEST_HEARTBEAT_S": "0.5"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[still running test_slow.py::test_sleeps:" in res.stderr


def test_tests_read_gradmap_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADMAP_DATA_DIR", str(tmp_path))
    namespace = runpy.run_path(str(ROOT / "tests" / "conftest.py"))
    assert namespace["DATA"] == str(tmp_path)


def test_run_calls_the_readme_test_command():
    import re

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(python -m pytest [^\n]*)\n```", readme).group(1)
    assert f'{command} "$@"' in (CI / "run").read_text()
