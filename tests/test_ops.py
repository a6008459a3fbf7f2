"""gradmap.ops: dispatch, GRADMAP_FORCE_REFERENCE, soft failure, and the references themselves."""
import os
import subprocess
import sys

import pytest
import torch

from gradmap.ops import extension as _ext, dispatch as ops
from gradmap.core.errors import GradmapError
from gradmap.ops.dispatch import Moments


def _spd(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * d, d, generator=g, dtype=dtype)
    return x.transpose(1, 2) @ x, torch.randn(n, d, d, generator=g, dtype=dtype)


@pytest.fixture
def no_extension(monkeypatch):
    """Simulate an install where gradmap._C was not built."""
    monkeypatch.setattr(_ext, "_state", {"module": None, "status": "simulated: gradmap._C not built"})


@pytest.fixture
def fresh_failures(monkeypatch):
    monkeypatch.setattr(ops, "_failed", {})


# ----------------------------------------------------------------------------- references (the oracle)

def test_moments_reference_streams_like_one_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 10, 7, generator=g), torch.randn(3, 10, 5, generator=g)
    m = Moments(7, 5)
    for i in range(3):
        ops.accumulate_moments_reference(m, x[i], y[i])
    xf, yf = x.reshape(-1, 7).double(), y.reshape(-1, 5).double()
    torch.testing.assert_close(m.sum_x.double(), xf.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.sq_x.double(), xf.square().sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.xtx.double(), xf.T @ xf, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m.xty.double(), xf.T @ yf, rtol=1e-6, atol=1e-5)
    assert m.count == 30
    torch.testing.assert_close(m.mean.double(), xf.mean(0), rtol=1e-6, atol=1e-6)


def test_moments_reference_rejects_missing_y_without_touching_state():
    m = Moments(4, 2)
    with pytest.raises(GradmapError, match="XᵀY"):
        ops.accumulate_moments_reference(m, torch.ones(3, 4))
    assert m.count == 0 and not m.sum_x.any() and not m.xtx.any()


def test_grad_and_gate_references():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]]), torch.tensor([-0.5], dtype=torch.bfloat16)]
    a, s = ops.layer_grad_reductions_reference(grads, [0, 2, 0], 3)
    assert a.tolist() == [3.5, 0.0, 3.0] and s.tolist() == [5.25, 0.0, 9.0]
    g = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    u = torch.tensor([[[0.5, 0.5], [1.0, 4.0]]])
    assert ops.gate_reduction_reference(g, u).tolist() == [[1.5, -1.0]]


def test_solve_reference_matches_linalg_solve_and_counts_fallbacks():
    a, b = _spd(3, 6)
    a[1] = -a[1]  # negative definite: Cholesky fails, eigen fallback solves exactly
    p, status = ops.projection_solve_reference(a, b, 0.0)
    assert status.tolist() == [0, 1, 0]
    ref = torch.linalg.solve(a, b)
    assert ((p - ref).abs().max() / ref.abs().max()) < 1e-10


# ----------------------------------------------------------------------------- dispatch

def test_backends_reports_every_op(monkeypatch):
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    info = ops.backends()
    for op in ("accumulate_moments", "layer_grad_reductions", "gate_reduction", "projection_solve"):
        assert info[op].startswith("cpu="), info
        assert "cuda=" in info[op]
    assert info["force_reference"] == "0"
    assert info["extension"] == _ext.extension_status()
    expected_cpu_solve = "c++" if _ext.extension() is not None else "torch"
    assert info["projection_solve"].startswith(f"cpu={expected_cpu_solve}")


def test_force_reference_is_read_at_call_time(monkeypatch):
    calls = []
    real = ops.projection_solve_reference

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(ops, "projection_solve_reference", spy)
    a, b = _spd(2, 5)
    monkeypatch.setenv("GRADMAP_FORCE_REFERENCE", "1")
    assert ops.force_reference()
    assert set(ops.backends()[op] for op in ("gate_reduction", "projection_solve")) == \
        {"torch (GRADMAP_FORCE_REFERENCE=1)"}
    ops.projection_solve(a, b, 0.1)
    assert calls == [1]
    monkeypatch.setenv("GRADMAP_FORCE_REFERENCE", "0")
    assert not ops.force_reference()
    ops.projection_solve(a, b, 0.1)
    assert calls == ([1] if _ext.extension() is not None else [1, 1])


def test_every_public_function_works_without_the_extension(no_extension, monkeypatch):
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    assert _ext.extension() is None
    info = ops.backends()
    assert info["projection_solve"] == "cpu=torch, cuda=torch"
    assert "simulated" in info["extension"]
    a, b = _spd(2, 4)
    p, status = ops.projection_solve(a, b, 0.01)
    ref, ref_status = ops.projection_solve_reference(a, b, 0.01)
    assert torch.equal(p, ref) and torch.equal(status, ref_status)
    m = Moments(4, 3)
    ops.accumulate_moments(m, torch.ones(2, 4), torch.ones(2, 3))
    assert m.count == 2 and m.xtx.sum() == 32
    abs_sum, sq_sum = ops.layer_grad_reductions([torch.full((3,), -2.0)], [1], 2)
    assert abs_sum.tolist() == [0.0, 6.0] and sq_sum.tolist() == [0.0, 12.0]
    assert ops.gate_reduction(torch.ones(2, 3), torch.full((2, 3), 2.0)).tolist() == [6.0, 6.0]


def test_cpu_tensors_never_reach_triton(monkeypatch):
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(ops, "_load_kernels", lambda: pytest.fail("Triton loaded for CPU tensors"))
    ops.gate_reduction(torch.ones(2, 3), torch.ones(2, 3))
    ops.layer_grad_reductions([torch.ones(3)], [0], 1)
    ops.accumulate_moments(Moments(3), torch.ones(2, 3))


class _BrokenKernels:
    """Stands in for gradmap.kernels when a kernel fails to compile or launch on a GPU."""

    @staticmethod
    def accumulate_moments(m, x, y=None, done=None):
        # the XᵀX launch succeeded (statistics applied), then the XᵀY launch failed
        ops._moments_parts_reference(m, x, y, ("stats", "xtx"))
        done += ["stats", "xtx"]
        raise RuntimeError("simulated PTX compilation failure")

    @staticmethod
    def gate_reduction(g, u):
        raise RuntimeError("simulated launch failure")

    @staticmethod
    def layer_grad_reductions(grads, layer_ids, n_layers):
        raise GradmapError("bad input is reported, not hidden")


def test_kernel_failure_finishes_with_the_reference_once(monkeypatch, fresh_failures, caplog):
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(ops, "_triton_for", lambda op, *t: None if op in ops._failed else _BrokenKernels)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    m, m_ref = Moments(4, 3), Moments(4, 3)
    with caplog.at_level("WARNING", logger="gradmap.ops"):
        ops.accumulate_moments(m, x, y)
    ops.accumulate_moments_reference(m_ref, x, y)
    for name in ("sum_x", "sq_x", "xtx", "xty"):  # each part applied exactly once
        assert torch.equal(getattr(m, name), getattr(m_ref, name)), name
    assert m.count == m_ref.count == 5
    assert "accumulate_moments" in caplog.text and "simulated PTX" in caplog.text
    g, u = torch.randn(2, 6), torch.randn(2, 6)
    assert torch.equal(ops.gate_reduction(g, u), ops.gate_reduction_reference(g, u))
    assert set(ops._failed) == {"accumulate_moments", "gate_reduction"}
    with pytest.raises(GradmapError, match="not hidden"):
        ops.layer_grad_reductions([torch.ones(2)], [0], 1)
    assert "layer_grad_reductions" not in ops._failed
    info = ops.backends()
    assert "kernel failed: RuntimeError: simulated launch failure" in info["gate_reduction"]


def test_solve_dispatch_validates_input():
    a, b = _spd(2, 4)
    with pytest.raises(GradmapError, match="same shape"):
        ops.projection_solve(a, b[:, :3], 0.1)
    with pytest.raises(GradmapError, match="dtype"):
        ops.projection_solve(a, b, 0.1, dtype=torch.float16)
    bad = a.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(GradmapError, match="NaN"):
        ops.projection_solve(bad, b, 0.1)


def test_importing_gradmap_does_not_initialise_cuda_or_import_kernels():
    code = ("import sys, torch, gradmap, gradmap.ops as ops\n"
            "assert 'gradmap.kernels' not in sys.modules, 'kernels imported at import time'\n"
            "assert 'gradmap._C' not in sys.modules, 'extension loaded at import time'\n"
            "ops.backends()\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n")
    env = dict(os.environ)
    env.pop("GRADMAP_FORCE_REFERENCE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- end to end

def test_fast_prune_same_with_backends_and_forced_reference(monkeypatch):
    """Backends on (on CPU: the C++ solve) vs GRADMAP_FORCE_REFERENCE=1: same layers, same weights."""
    from gradmap.prune.compensation import get_compensator
    from gradmap.prune.driver import fast_prune
    from tiny import random_ids, tiny_model
    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("GRADMAP_FORCE_REFERENCE", forced)
        model = tiny_model("llama", n_layers=5, seed=0)
        comp = get_compensator("projection", safeguards=False, ridge=0.05)
        result = fast_prune(model, random_ids(6, 12, seed=0), 1, metric="gradmap", compensation=comp,
                            schedule="one-shot")
        assert any(site["folded"] for site in result.compensation_report["projection"]["sites"])
        runs[forced] = (result.removed_layers, {k: v.clone() for k, v in model.state_dict().items()})
    assert runs["0"][0] == runs["1"][0]
    w_on, w_ref = runs["0"][1], runs["1"][1]
    assert w_on.keys() == w_ref.keys()
    for key in w_ref:  # fp64 solves agree to ~1e-15, far below fp32 weight resolution
        torch.testing.assert_close(w_on[key], w_ref[key], rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")
