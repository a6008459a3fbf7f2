"""gradmap.ops: the references, dispatch, GRADMAP_FORCE_REFERENCE, and soft failure.

The fallback tests use no GPU: they route CPU tensors to the "kernel device"
(backend.KERNEL_DEVICE_TYPES), stand in fake kernels that compute the reference
or raise, and fake device tags (backend.device_key) for several GPUs.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import gradmap.ops as ops
from gradmap.core.errors import GradmapError
from gradmap.ops import Moments, StrictKernelError, backend, extension as _ext


def _spd(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * d, d, generator=g, dtype=dtype)
    return x.transpose(1, 2) @ x, torch.randn(n, d, d, generator=g, dtype=dtype)


@pytest.fixture
def no_extension(monkeypatch):
    """Simulate an install where gradmap._C was not built."""
    monkeypatch.setattr(_ext, "_state", {"module": None, "status": "simulated: gradmap._C not built"})


@pytest.fixture(autouse=True)
def fresh_backend(monkeypatch):
    """No abandoned kernels, issued warnings or strict/forced mode leak between tests."""
    monkeypatch.delenv("GRADMAP_FORCE_REFERENCE", raising=False)
    monkeypatch.delenv("GRADMAP_STRICT_KERNELS", raising=False)
    backend.reset()
    yield
    backend.reset()


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

def test_backends_reports_every_op():
    info = ops.backends()
    for op in ("accumulate_moments", "layer_grad_reductions", "gate_reduction", "projection_solve"):
        assert info[op].startswith("cpu="), info
        assert "cuda=" in info[op]
    assert info["force_reference"] == "0" and info["strict"] == "0"
    assert info["extension"] == _ext.extension_status()
    expected_cpu_solve = "c++" if _ext.extension() is not None else "torch"
    assert info["projection_solve"].startswith(f"cpu={expected_cpu_solve}")


def test_force_reference_is_read_at_call_time(monkeypatch):
    import gradmap.ops.solve as solve
    calls = []
    real = solve.projection_solve_reference

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(solve, "projection_solve_reference", spy)
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


def test_every_public_function_works_without_the_extension(no_extension):
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
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")  # CPU → torch is by design, not a fallback
    monkeypatch.setattr(backend, "load_kernels", lambda: pytest.fail("Triton loaded for CPU tensors"))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        ops.gate_reduction(torch.ones(2, 3, dtype=dtype), torch.ones(2, 3, dtype=dtype))
        ops.layer_grad_reductions([torch.ones(3, dtype=dtype)], [0], 1)
        ops.accumulate_moments(Moments(3), torch.ones(2, 3, dtype=dtype))


# ----------------------------------------------------------------------------- fallbacks (no GPU needed)

class FakeKernels:
    """Stands in for gradmap.kernels: computes the reference, or raises like a failed compile/launch."""

    def __init__(self, fail: set[str] = frozenset()):
        self.fail, self.calls, self.groups = set(fail), [], []
        outer = self

        class _Moments:
            @staticmethod
            def gram_update(c, a, b=None, sum_a=None, sq_a=None):
                name = "xtx" if b is None else "xty"
                outer._enter(name)
                c += a.float().T @ (a if b is None else b).float()
                if sum_a is not None:
                    sum_a += a.float().sum(0)
                    sq_a += a.float().square().sum(0)

            @staticmethod
            def column_stats_update(sum_x, sq_x, x):
                outer._enter("stats")
                sum_x += x.float().sum(0)
                sq_x += x.float().square().sum(0)

        self.moments = _Moments()

    def _enter(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"simulated PTX compilation failure in {name}")

    def gate_reduction(self, g, u):
        self._enter("gate")
        return ops.gate_reduction_reference(g, u)

    def layer_grad_reductions(self, grads, layer_ids, n_layers):
        self.groups.append(tuple(str(backend.device_key(g)) for g in grads))
        self._enter("grads")
        return ops.layer_grad_reductions_reference(grads, layer_ids, n_layers)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors count as GPU tensors; returns a function installing fake kernels."""
    monkeypatch.setattr(backend, "KERNEL_DEVICE_TYPES", ("cpu",))

    def install(fail=()):
        fake = FakeKernels(set(fail))
        monkeypatch.setattr(backend, "load_kernels", lambda: fake)
        return fake
    return install


@pytest.fixture
def device_tags(monkeypatch):
    """Tag tensors with fake devices ("cuda:0", "cuda:1"): tag(t, i) returns t."""
    tagged: list[tuple[torch.Tensor, str]] = []  # holds the tensors, so no id is reused

    def key(t):
        return next((tag for other, tag in tagged if other is t), "cuda:0")
    monkeypatch.setattr(backend, "device_key", key)

    def tag(t, index):
        tagged.append((t, f"cuda:{index}"))
        return t
    return tag


def _warnings(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("gradmap.ops")]


def _moments_pair(d=4, d_y=3):
    return Moments(d, d_y), Moments(d, d_y)


def _assert_same_moments(m, ref):
    for name in ("sum_x", "sq_x", "xtx", "xty"):  # each part applied exactly once
        torch.testing.assert_close(getattr(m, name), getattr(ref, name), rtol=1e-6, atol=1e-6, msg=name)
    assert m.count == ref.count


def test_half_precision_goes_to_kernels_and_fp32_to_torch(fake_gpu, monkeypatch, caplog):
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")  # neither is a fallback
    fake = fake_gpu()
    x, y = torch.randn(5, 4).bfloat16(), torch.randn(5, 3).bfloat16()
    m, ref = _moments_pair()
    ops.accumulate_moments(m, x, y)
    ops.accumulate_moments_reference(ref, x, y)
    _assert_same_moments(m, ref)
    assert fake.calls == ["xtx", "xty"]
    fake.calls.clear()
    m, ref = _moments_pair()
    ops.accumulate_moments(m, x.float(), y.float())  # fp32: torch with TF32 off, no kernel
    ops.gate_reduction(x.float(), x.float())
    ops.layer_grad_reductions([x.float()], [0], 1)
    ops.accumulate_moments(Moments(4, 3), x, y.float())  # mixed: XᵀX on the kernel, XᵀY on torch
    assert fake.calls == ["xtx"] and not _warnings(caplog)


@pytest.mark.parametrize("op", ["moments", "gate", "grads"])
def test_unsupported_dtype_falls_back_with_one_warning_or_raises_when_strict(op, fake_gpu, monkeypatch,
                                                                                 caplog):
    fake = fake_gpu()
    x = torch.randn(6, 4, dtype=torch.float64)
    if op == "moments":
        def call():
            m, ref = Moments(4), Moments(4)
            ops.accumulate_moments(m, x)
            ops.accumulate_moments_reference(ref, x)
            torch.testing.assert_close(m.xtx, ref.xtx, rtol=0, atol=0)
    elif op == "gate":
        def call():
            assert torch.equal(ops.gate_reduction(x, x), ops.gate_reduction_reference(x, x))
    else:
        def call():
            grads = [x, torch.randn(3).bfloat16()]
            out = ops.layer_grad_reductions(grads, [0, 1], 2)
            ref = ops.layer_grad_reductions_reference(grads, [0, 1], 2)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    with caplog.at_level("WARNING", logger="gradmap.ops"):
        call()
        call()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "torch.float64" in warned[0].getMessage(), [r.getMessage() for r in warned]
    assert fake.calls == ([] if op != "grads" else ["grads"] * 2)
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    with pytest.raises(StrictKernelError, match="float64"):
        call()


def test_gradients_on_several_devices_are_grouped_per_device(fake_gpu, device_tags, monkeypatch, caplog):
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")  # grouping is no fallback
    fake = fake_gpu()
    grads = [device_tags(torch.randn(7).bfloat16(), i // 2) for i in range(5)]  # cuda:0 x2, cuda:1 x2, cuda:2
    grads.append(device_tags(torch.randn(4), 1))  # an fp32 gradient on cuda:1: torch
    lids = [0, 1, 1, 2, 3, 2]
    out = ops.layer_grad_reductions(grads, lids, 4)
    ref = ops.layer_grad_reductions_reference(grads, lids, 4)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert fake.groups == [("cuda:0",) * 2, ("cuda:1",) * 2, ("cuda:2",)]
    assert not _warnings(caplog)


@pytest.mark.parametrize("op", ["moments", "gate"])
def test_mixed_devices_fall_back_with_one_warning_or_raise_when_strict(op, fake_gpu, device_tags,
                                                                         monkeypatch, caplog):
    fake = fake_gpu()
    if op == "moments":
        def call():
            m, ref = _moments_pair()
            x = device_tags(torch.randn(5, 4).half(), 1)  # the accumulators are on cuda:0
            y = device_tags(torch.randn(5, 3).half(), 1)
            ops.accumulate_moments(m, x, y)
            ops.accumulate_moments_reference(ref, x, y)
            _assert_same_moments(m, ref)
    else:
        def call():
            g, u = torch.randn(3, 8).half(), device_tags(torch.randn(3, 8).half(), 1)
            assert torch.equal(ops.gate_reduction(g, u), ops.gate_reduction_reference(g, u))
    with caplog.at_level("WARNING", logger="gradmap.ops"):
        call()
        call()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "several devices" in warned[0].getMessage()
    assert fake.calls == []
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    with pytest.raises(StrictKernelError, match="several devices"):
        call()


@pytest.mark.parametrize("failing", ["xtx", "xty", "stats", "gate", "grads"])
def test_kernel_failure_finishes_with_the_reference_once(failing, fake_gpu, monkeypatch, caplog):
    fake = fake_gpu(fail={failing})
    x, y = torch.randn(5, 4).bfloat16(), torch.randn(5, 3).bfloat16()

    def call():
        if failing in ("xtx", "xty", "stats"):
            m, ref = (Moments(4, 3), Moments(4, 3)) if failing != "stats" else (Moments(4, want_xtx=False),
                                                                             Moments(4, want_xtx=False))
            yy = y if failing != "stats" else None
            ops.accumulate_moments(m, x, yy)
            ops.accumulate_moments_reference(ref, x, yy)
            for name in ("sum_x", "sq_x", "xtx", "xty"):
                if getattr(ref, name) is not None:
                    torch.testing.assert_close(getattr(m, name), getattr(ref, name), rtol=1e-6, atol=1e-6)
            assert m.count == ref.count == 5
        elif failing == "gate":
            assert torch.equal(ops.gate_reduction(x, x), ops.gate_reduction_reference(x, x))
        else:
            out = ops.layer_grad_reductions([x, y], [0, 1], 2)
            torch.testing.assert_close(out, ops.layer_grad_reductions_reference([x, y], [0, 1], 2))

    with caplog.at_level("WARNING", logger="gradmap.ops"):
        call()
        call()
    warned = _warnings(caplog)
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "simulated PTX" in warned[0].getMessage() and "failed" in warned[0].getMessage()
    kernel_names = {"xtx": "gram_update (XᵀX)", "xty": "gram_update (XᵀY)", "stats": "column_stats_update",
                    "gate": "gate_reduction", "grads": "layer_grad_reductions"}
    assert kernel_names[failing] in warned[0].getMessage()
    assert fake.calls.count(failing) == 1, fake.calls  # abandoned after the failure: the second call did not retry it
    op = {"gate": "gate_reduction", "grads": "layer_grad_reductions"}.get(failing, "accumulate_moments")
    assert "kernel failed" in ops.backends()[op]
    backend.reset()
    fake_gpu(fail={failing})
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    with pytest.raises(StrictKernelError, match="simulated PTX"):
        call()


def test_input_errors_are_raised_not_hidden(fake_gpu):
    fake_gpu()
    with pytest.raises(GradmapError, match="features"):
        ops.accumulate_moments(Moments(5), torch.randn(3, 4).bfloat16())
    with pytest.raises(GradmapError, match="layer ids"):
        ops.layer_grad_reductions([torch.ones(2).bfloat16()], [3], 2)


def test_missing_triton_on_a_gpu_falls_back_once_or_raises(monkeypatch, caplog):
    monkeypatch.setattr(backend, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(backend, "load_kernels", lambda: None)
    g = torch.randn(2, 5).bfloat16()
    with caplog.at_level("WARNING", logger="gradmap.ops"):
        ops.gate_reduction(g, g)
        ops.gate_reduction(g, g)
    assert len(_warnings(caplog)) == 1 and "Triton kernels" in _warnings(caplog)[0].getMessage()
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    with pytest.raises(StrictKernelError):
        ops.gate_reduction(g, g)


class _BrokenExtension:
    def __init__(self):
        self.calls = 0

    def projection_solve(self, a, b, ridge, fp64):
        self.calls += 1
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    @staticmethod
    def cuda_built():
        return True


def test_extension_solve_failure_falls_back_once_or_raises(monkeypatch, caplog):
    broken = _BrokenExtension()
    monkeypatch.setattr(_ext, "_state", {"module": broken, "status": "simulated broken gradmap._C"})
    a, b = _spd(2, 5)
    ref, ref_status = ops.projection_solve_reference(a, b, 0.05)
    with caplog.at_level("WARNING", logger="gradmap.ops"):
        for _ in range(2):
            p, status = ops.projection_solve(a, b, 0.05)
            assert torch.equal(p, ref) and torch.equal(status, ref_status)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "gradmap._C" in warned[0].getMessage() and "no kernel image" in \
        warned[0].getMessage()
    assert broken.calls == 1
    assert "extension failed" in ops.backends()["projection_solve"]
    backend.reset()
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    with pytest.raises(StrictKernelError, match="no kernel image"):
        ops.projection_solve(a, b, 0.05)


def test_exact_fp32_turns_tf32_off_and_restores_it():
    matmul = torch.backends.cuda.matmul
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with backend.exact_fp32(None, fake_cuda):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with backend.exact_fp32(torch.ones(1)):  # CPU: untouched
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_plain_checkout_finds_its_own_triton_kernels(tmp_path):
    """PYTHONPATH=<checkout> alone (no pip install -e .): the checkout's kernels/ is used."""
    pytest.importorskip("triton", reason="triton is not installed")
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import gradmap.ops.backend as b, sys\n"
            "m = b.load_kernels()\n"
            "assert m is not None, b.backends()['triton']\n"
            "print(m.__file__); print(sys.modules['gradmap.kernels'].utils.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADMAP_FORCE_REFERENCE")}
    env["PYTHONPATH"] = checkout
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = proc.stdout.split()
    assert files == [os.path.join(checkout, "kernels", "__init__.py"),
                     os.path.join(checkout, "kernels", "utils.py")], proc.stdout

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
