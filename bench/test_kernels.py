"""Kernel and solve benchmarks: Triton/C++ implementations against their torch baselines.

    pytest bench/test_kernels.py --benchmark-only -s          # measure (prints rates and ratios)
    pytest bench/test_kernels.py --benchmark-disable          # CI smoke test: small sizes, run once

GPU (CUDA only, skipped otherwise), Llama-3-8B-like shapes: d = 4096, a calibration
stream of 128 x 2048 tokens processed in chunks of 16,384 tokens (timed per chunk),
gradients of a 32-layer 8B-shaped model in bf16 (~7.0e9 elements, 14 GB):
- layer_grad_reductions vs torch._foreach_norm (p=1 and p=2) + index_add;
- gate_reduction vs the fp32 torch expression (g.float() * u.float()).sum(-1);
- moments XᵀX / XᵀY vs cuBLAS bf16 torch.matmul (fp32 accumulate) and the fp32 torch reference;
- projection_solve (fused CUDA preparation + batched Cholesky) vs torch.linalg.cholesky +
  cholesky_solve, d = 4096, batch 1 and 4, fp64.
CPU: projection_solve through gradmap._C vs the torch reference, d = 576 (SmolLM2), batch 1 and 4
(GRADMAP_BENCH_THREADS=1 pins torch to one thread: steadier on a shared machine).

Rates: TB/s = minimum bytes read+written / median time; TFLOP/s for XᵀX counts 2·T·d² (a
full XᵀX), so the upper-triangle kernel's figure is an "effective" rate.

Every benchmark also asserts its result against an fp64 reference (issue 18 item 10), tightly
enough to see one missing chunk or tile: the gradient reductions of all-ones gradients are
exact integers in fp32 (every partial sum is a multiple of 2¹² below 2³⁶), so they must match
the element counts exactly; random gradients must match to 2e-5 (a missing 32k-element chunk
of a 14336 x 4096 gradient is 1.5e-4 of its layer's sum).
"""
from __future__ import annotations

import os

import pytest
import torch
from .harness import measure

import gradmap.ops as ops
from gradmap.ops import Moments, backend, extension as _ext

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: GPU kernel benchmarks need one "
                                                 "(CPU figures come from the projection_solve CPU benchmark)")
_medians: dict[tuple[str, str], float] = {}


def _report(benchmark, group: str, impl: str, baseline_impl: str) -> None:
    """Print this row's rates and its speed-up over the group's baseline (when measured)."""
    if not benchmark.enabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _medians[group, impl] = median
    rates = {k: benchmark.extra_info[k] for k in ("TB_per_s", "TFLOP_per_s") if k in benchmark.extra_info}
    base = _medians.get((group, baseline_impl))
    ratio = f", {base / median:.2f}x vs {baseline_impl}" if base and impl != baseline_impl else ""
    print(f"\n[{group}] {impl}: {median * 1e3:.3f} ms {rates}{ratio}")


def _big(benchmark) -> bool:
    return benchmark.enabled


def _kernels():
    module = backend.load_kernels()
    if module is None:
        pytest.skip(f"Triton kernels unavailable: {backend.backends()['triton']}")
    return module


def _assert_rel(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rtol: float, what: str) -> None:
    """|out − ref| ≤ rtol·magnitude elementwise (ref, magnitude in fp64), with where it fails."""
    err = (out.double() - ref).abs()
    bad = ~(err <= rtol * magnitude)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst "
                           f"{(err / (rtol * magnitude)).max().item():.3g} x the bound")


# ----------------------------------------------------------------------------- GPU: gradient reductions

LLAMA8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),  # q, k, v, o
                 (14336, 4096), (14336, 4096), (4096, 14336), (4096,), (4096,)]  # gate, up, down, norms


@pytest.fixture(scope="module")
def model_grads(request):
    big = not request.config.getoption("benchmark_disable", False)
    n_layers = 32 if big else 2
    shapes = LLAMA8B_LAYER if big else [(s[0] // 64,) + tuple(x // 64 for x in s[1:]) for s in LLAMA8B_LAYER]
    grads, layer_ids = [], []
    for layer in range(n_layers):
        for shape in shapes:
            grads.append(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
            layer_ids.append(layer)
    yield grads, layer_ids, n_layers
    del grads
    torch.cuda.empty_cache()


@needs_cuda
@pytest.mark.parametrize("impl", ["foreach_norm", "triton"])
def test_gpu_layer_grad_reductions(benchmark, model_grads, impl):
    grads, layer_ids, n_layers = model_grads
    lid = torch.tensor(layer_ids, device="cuda")

    def foreach():
        l1 = torch.stack(torch._foreach_norm(grads, 1)).float()
        l2 = torch.stack(torch._foreach_norm(grads, 2)).float().square()
        z = torch.zeros(n_layers, device="cuda")
        return z.index_add(0, lid, l1), z.index_add(0, lid, l2)

    layer_grad_reductions = _kernels().layer_grad_reductions
    fn = foreach if impl == "foreach_norm" else (lambda: layer_grad_reductions(grads, layer_ids, n_layers))
    n_bytes = sum(g.numel() * g.element_size() for g in grads)
    out = measure(benchmark, fn, group="gpu_layer_grad_reductions", device="cuda", bytes_moved=n_bytes,
                  baseline=impl == "foreach_norm", impl=impl, elements=sum(g.numel() for g in grads),
                  tensors=len(grads), rounds=5, warmup_rounds=1)
    ref_abs = torch.zeros(n_layers, dtype=torch.float64, device="cuda")
    ref_sq = torch.zeros(n_layers, dtype=torch.float64, device="cuda")
    for g, layer in zip(grads, layer_ids):
        ref_abs[layer] += g.double().abs().sum()
        ref_sq[layer] += g.double().square().sum()
    # foreach norms come back in bf16 (~3 significant digits): only the kernel is held to 2e-5
    rtol = 2e-5 if impl == "triton" else 1e-2
    _assert_rel(out[0], ref_abs, ref_abs, rtol, f"{impl} Σ|g|")
    _assert_rel(out[1], ref_sq, ref_sq, rtol, f"{impl} Σg²")
    if impl == "triton":  # all-ones gradients: the sums are exact integers, a lost chunk shows exactly
        ones = [torch.ones_like(g) for g in grads]
        counts = torch.zeros(n_layers, dtype=torch.float64, device="cuda")
        for g, layer in zip(ones, layer_ids):
            counts[layer] += g.numel()
        got_abs, got_sq = layer_grad_reductions(ones, layer_ids, n_layers)
        assert torch.equal(got_abs.double(), counts) and torch.equal(got_sq.double(), counts)
        del ones
    _report(benchmark, "gpu_layer_grad_reductions", impl, "foreach_norm")


# ----------------------------------------------------------------------------- GPU: gate reduction

@needs_cuda
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gpu_gate_reduction(benchmark, impl):
    tokens, d = (16384, 4096) if _big(benchmark) else (64, 256)
    g = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    gate_reduction = _kernels().gate_reduction
    fn = (lambda: ops.gate_reduction_reference(g, u)) if impl == "torch" else (lambda: gate_reduction(g, u))
    out = measure(benchmark, fn, group="gpu_gate_reduction", device="cuda",
                  bytes_moved=2 * g.numel() * 2 + 4 * tokens, baseline=impl == "torch", impl=impl,
                  tokens=tokens, d=d)
    gd, ud = g.double(), u.double()
    _assert_rel(out, (gd * ud).sum(-1), (gd * ud).abs().sum(-1), 1e-5, f"{impl} ⟨g,u⟩")
    _report(benchmark, "gpu_gate_reduction", impl, "torch")


# ----------------------------------------------------------------------------- GPU: streaming moments

@needs_cuda
@pytest.mark.parametrize("what", ["xtx", "xty"])
@pytest.mark.parametrize("impl", ["cublas_bf16", "torch_reference_fp32", "triton"])
def test_gpu_moments(benchmark, what, impl):
    tokens, d = (16384, 4096) if _big(benchmark) else (128, 256)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16) if what == "xty" else None
    m = Moments(d, d_y=d if y is not None else None, device="cuda", want_xtx=what == "xtx")
    acc = m.xtx if what == "xtx" else m.xty
    rhs = x if y is None else y
    accumulate_moments = _kernels().accumulate_moments
    if impl == "cublas_bf16":
        fn = lambda: acc.add_(torch.matmul(x.T, rhs))  # noqa: E731  bf16 GEMM, fp32 accumulate inside
    elif impl == "torch_reference_fp32":
        fn = lambda: ops.accumulate_moments_reference(m, x, y)  # noqa: E731
    else:
        fn = lambda: accumulate_moments(m, x, y)  # noqa: E731
    measure(benchmark, fn, group=f"gpu_moments_{what}", device="cuda", flops=2.0 * tokens * d * d,
            bytes_moved=(x.numel() + (0 if y is None else y.numel())) * 2 + 2 * acc.numel() * 4,
            baseline=impl == "cublas_bf16", impl=impl, tokens=tokens, d=d)
    acc.zero_()  # one more call from zero, checked against fp64
    fn()
    xd, rd = x.double(), rhs.double()
    rtol = 8e-3 if impl == "cublas_bf16" else 1e-5  # the bf16 GEMM rounds its output to bf16
    _assert_rel(acc, xd.T @ rd, xd.abs().T @ rd.abs(), rtol, f"{impl} {what}")
    if what == "xtx" and impl == "triton":
        assert torch.equal(acc, acc.T), "XᵀX lost exact symmetry"
    _report(benchmark, f"gpu_moments_{what}", impl, "cublas_bf16")


# ----------------------------------------------------------------------------- projection solve

def _spd(n: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, 2 * d, d, device=device, generator=g, dtype=torch.float32)
    a = x.transpose(1, 2) @ x  # fp32 statistics, as the moments produce them
    b = a + 0.1 * torch.randn(n, d, d, device=device, generator=g)
    return a, b


@needs_cuda
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("impl", ["torch", "extension"])
def test_gpu_projection_solve(benchmark, impl, batch):
    ext = _ext.extension()
    if impl == "extension" and (ext is None or not ext.cuda_built()):
        pytest.skip(f"gradmap._C without CUDA: {_ext.extension_status()}")
    d = 4096 if _big(benchmark) else 128
    a, b = _spd(batch, d, "cuda")
    if impl == "torch":
        def fn():
            a64, b64 = a.double(), b.double()
            a64 = 0.5 * (a64 + a64.transpose(-1, -2))
            lam = 0.01 * a64.diagonal(dim1=-2, dim2=-1).sum(-1) / d
            eye = torch.eye(d, dtype=torch.float64, device="cuda")
            chol = torch.linalg.cholesky(a64 + lam[:, None, None] * eye)
            return torch.cholesky_solve(b64 + lam[:, None, None] * eye, chol)
    else:
        fn = lambda: ext.projection_solve(a, b, 0.01, True)[0]  # noqa: E731
    flops = batch * (d ** 3 / 3 + 2 * d ** 3)  # Cholesky + two triangular solves with d right-hand sides
    p = measure(benchmark, fn, group=f"gpu_projection_solve_b{batch}", device="cuda", flops=flops,
                baseline=impl == "torch", impl=impl, d=d, batch=batch, rounds=5, warmup_rounds=1)
    p_ref, _ = ops.projection_solve_reference(a, b, 0.01)
    assert ((p - p_ref).abs().max() / p_ref.abs().max()).item() < 1e-10, impl
    _report(benchmark, f"gpu_projection_solve_b{batch}", impl, "torch")


@pytest.fixture
def cpu_threads():
    """GRADMAP_BENCH_THREADS=N pins torch's CPU threads for a benchmark (restored afterwards)."""
    before = torch.get_num_threads()
    wanted = os.environ.get("GRADMAP_BENCH_THREADS")
    if wanted:
        torch.set_num_threads(int(wanted))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("impl", ["torch_reference", "extension"])
def test_cpu_projection_solve(benchmark, impl, batch, cpu_threads):
    ext = _ext.extension()
    if impl == "extension" and ext is None:
        pytest.skip(f"extension not built: {_ext.extension_status()}")
    d = 576 if _big(benchmark) else 48
    a, b = _spd(batch, d, "cpu")
    if impl == "torch_reference":
        fn = lambda: ops.projection_solve_reference(a, b, 0.01)  # noqa: E731
    else:
        fn = lambda: ext.projection_solve(a, b, 0.01, True)  # noqa: E731
    p, status = measure(benchmark, fn, group=f"cpu_projection_solve_b{batch}", device="cpu",
                        flops=batch * (d ** 3 / 3 + 2 * d ** 3), baseline=impl == "torch_reference",
                        impl=impl, d=d, batch=batch, threads=cpu_threads, rounds=10, warmup_rounds=2)
    p_ref, _ = ops.projection_solve_reference(a, b, 0.01)
    assert ((p - p_ref).abs().max() / p_ref.abs().max()) < 1e-10 and status.tolist() == [0] * batch
    _report(benchmark, f"cpu_projection_solve_b{batch}", impl, "torch_reference")
