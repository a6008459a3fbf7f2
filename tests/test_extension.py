"""The C++ extension's CPU projection solve vs torch (fp64), its fallbacks, and its build."""
import os
import shutil

import pytest
import torch

import gradmap.ops as ops
from gradmap.ops import extension as _ext
from gradmap.core.errors import GradmapError

BUILD_EXPECTED = os.environ.get("GRADMAP_BUILD_EXT", "1") != "0" and shutil.which("c++") is not None


def _ext_or_skip():
    ext = _ext.extension()
    if ext is None:
        pytest.skip(f"extension not available: {_ext.extension_status()}")
    return ext


def _rel(p, ref):
    return ((p - ref).abs().max() / ref.abs().max()).item()


def _system(n, d, seed=0, rank=None, dtype=torch.float64):
    """A = XᵀX (rank `rank` when given, else full) and B, batched [n, d, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or 3 * d, d, generator=g, dtype=dtype)
    return x.transpose(1, 2) @ x, torch.randn(n, d, d, generator=g, dtype=dtype)


def _expected(a, b, ridge):
    """torch.linalg.solve on the same regularised system."""
    d = a.shape[-1]
    a = 0.5 * (a + a.transpose(-1, -2))
    lam = ridge * a.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=a.dtype)
    return torch.linalg.solve(a + lam[..., None, None] * eye, b + lam[..., None, None] * eye)


def test_extension_is_importable_when_a_compiler_exists():
    if not BUILD_EXPECTED:
        pytest.skip("GRADMAP_BUILD_EXT=0 or no C++ compiler: the extension is not expected")
    ext = _ext.extension()
    assert ext is not None, (f"gradmap._C is not available ({_ext.extension_status()}); build it with "
                             "pip install --no-build-isolation -e . (or set GRADMAP_BUILD_EXT=0)")
    assert callable(ext.projection_solve) and isinstance(ext.cuda_built(), bool)


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("d", [1, 5, 37])
def test_cpu_solve_matches_linalg_solve(n, d):
    ext = _ext_or_skip()
    a, b = _system(n, d, seed=d + n)
    asym = a + 0.01 * torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(1))
    p, status = ext.projection_solve(asym, b, 0.01, True)
    assert p.dtype == torch.float64 and p.shape == (n, d, d)
    assert status.dtype == torch.int32 and status.tolist() == [0] * n
    assert _rel(p, _expected(asym, b, 0.01)) < 1e-10
    p_ref, s_ref = ops.projection_solve_reference(asym, b, 0.01)
    assert _rel(p, p_ref) < 1e-10 and torch.equal(status, s_ref)


def test_unbatched_and_fp32_inputs():
    ext = _ext_or_skip()
    a, b = _system(1, 9, seed=3)
    p, status = ext.projection_solve(a[0].float(), b[0].float(), 0.1, True)
    assert p.shape == (9, 9) and status.dim() == 0 and int(status) == 0
    assert _rel(p, _expected(a[0].float().double(), b[0].float().double(), 0.1)) < 1e-10


def test_fp32_solve_option():
    ext = _ext_or_skip()
    a, b = _system(3, 16, seed=4)
    p32, status = ext.projection_solve(a, b, 0.05, False)
    assert p32.dtype == torch.float32 and status.tolist() == [0, 0, 0]
    assert _rel(p32.double(), _expected(a, b, 0.05)) < 1e-4


def test_singular_statistics_with_ridge_stay_on_cholesky():
    ext = _ext_or_skip()
    a, b = _system(4, 12, seed=5, rank=3)  # rank 3 of 12: singular without the ridge
    p, status = ext.projection_solve(a, b, 0.1, True)
    assert status.tolist() == [0, 0, 0, 0]
    assert _rel(p, _expected(a, b, 0.1)) < 1e-10


def test_exactly_singular_without_ridge_falls_back_to_pseudo_inverse():
    ext = _ext_or_skip()
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    a = (q * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)) @ q.T
    b = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    p, status = ext.projection_solve(a[None], b[None], 0.0, True)
    assert status.tolist() == [1]
    expected = torch.linalg.pinv(0.5 * (a + a.T), hermitian=True) @ b
    assert _rel(p[0], expected) < 1e-10
    p_ref, s_ref = ops.projection_solve_reference(a[None], b[None], 0.0)
    assert _rel(p, p_ref) < 1e-10 and s_ref.tolist() == [1]


def test_indefinite_items_fall_back_and_are_counted():
    ext = _ext_or_skip()
    a, b = _system(5, 10, seed=8)
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=g))
    a[1] = (q * torch.linspace(-2.0, 3.0, 10, dtype=torch.float64).add(0.05)) @ q.T  # indefinite, invertible
    a[3] = -a[3]  # negative definite
    p, status = ext.projection_solve(a, b, 0.0, True)
    assert status.tolist() == [0, 1, 0, 1, 0]
    for i in range(5):
        assert _rel(p[i], _expected(a[i], b[i], 0.0)) < 1e-10, i
    p_ref, s_ref = ops.projection_solve_reference(a, b, 0.0)
    assert _rel(p, p_ref) < 1e-10 and torch.equal(status, s_ref)


def test_ops_dispatch_uses_extension_and_matches_reference(monkeypatch):
    _ext_or_skip()
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    a, b = _system(3, 20, seed=10)
    p, status = ops.projection_solve(a.float(), b.float(), 0.02)
    p_ref, s_ref = ops.projection_solve_reference(a.float(), b.float(), 0.02)
    assert _rel(p, p_ref) < 1e-10 and torch.equal(status, s_ref)
    assert ops.backends()["projection_solve"].startswith("cpu=c++")


def test_extension_rejects_bad_shapes_clearly():
    ext = _ext_or_skip()
    a, b = _system(2, 4)
    with pytest.raises(RuntimeError, match="B must have A's shape"):
        ext.projection_solve(a, b[:1], 0.1, True)
    with pytest.raises(RuntimeError, match="square"):
        ext.projection_solve(a[:, :3], a[:, :3], 0.1, True)
    with pytest.raises(GradmapError, match="same shape"):
        ops.projection_solve(a, b[:1], 0.1)


@pytest.mark.skipif(os.environ.get("GRADMAP_TEST_JIT") != "1",
                    reason="JIT-compiles csrc/ (~1-4 min on 2 cores); set GRADMAP_TEST_JIT=1 to run")
def test_jit_build_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADMAP_EXT_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "_state", {})
    module = _ext.jit_build()
    assert module is not None, _ext.extension_status()
    assert "JIT" in _ext.extension_status()
    a, b = _system(2, 8, seed=11)
    p, status = module.projection_solve(a, b, 0.1, True)
    assert _rel(p, _expected(a, b, 0.1)) < 1e-10 and status.tolist() == [0, 0]
