"""The one table of gradmap's kernels: op -> kernel, plain-torch reference, the production shapes
(Llama-3-8B: d = 4096, 32 layers, one 2048-token row per micro-batch, as `default_batch_size`
picks at that size) and the strongest torch baselines. Both timing front ends iterate over
`TABLE`: the pytest-benchmark suite (bench/test_kernels.py) and `.ci/gpu`'s P3 stage
(bench/gpu_perf.py), so they time the same calls against the same baselines.

Every implementation of a row is checked against an fp64 computation of the same formula
(`Workload.verify`), tightly enough to see one lost tile or chunk.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["KernelCase", "Workload", "Unavailable", "TABLE", "LLAMA8B_LAYER", "assert_within", "randn"]

# one Llama-3-8B decoder layer's weight (gradient) shapes: q, k, v, o, gate, up, down, two norms
LLAMA8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                 (4096, 14336), (4096,), (4096,)]


class Unavailable(Exception):
    """An implementation that cannot run here (extension not built, ...): skipped, with why."""


@dataclass
class Workload:
    """One row's inputs at one shape: a call per implementation and how to check each."""

    shape: str
    calls: dict[str, Callable[[], Any]]
    verify: Callable[[str], dict]  # impl -> details; one fresh call, raises when the result is wrong
    bytes_moved: float | None = None  # the least a perfect implementation reads + writes
    flops: float | None = None
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KernelCase:
    """A row of the table (see the module docstring)."""

    name: str
    op: str  # the gradmap.ops dispatch that routes to the kernel
    kernel: str  # the launcher in kernels/ (or gradmap._C)
    reference: str  # the plain-torch reference in gradmap.ops: fallback and oracle
    production: str  # where production calls it, at which shape
    impls: tuple[str, ...]  # gradmap's implementation first
    baseline: str  # the strongest torch implementation: ratios are taken against it
    shapes: dict[str, tuple]  # device -> production shapes
    small: dict[str, tuple]  # device -> tiny shapes (CI smoke runs, the dry run)
    build: Callable[[str, tuple], Workload]


def assert_within(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rtol: float, what: str) -> dict:
    """|out − ref| ≤ rtol·magnitude elementwise (NaN fails); returns the worst ratio to the bound."""
    err = (out.double() - ref.double()).abs()
    bound = rtol * magnitude.double() + 1e-30
    bad = ~(err <= bound)
    worst = (err / bound).nan_to_num(float("inf")).max().item() if err.numel() else 0.0
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off, worst {worst:.3g} x bound; "
                             f"first at {bad.nonzero()[:3].tolist()}")
    return {"worst_err_over_bound": round(worst, 4)}


def _kernels():
    from gradmap.ops import backend
    module = backend.load_kernels()
    if module is None:
        raise Unavailable(f"Triton kernels: {backend.backends()['triton']}")
    return module


def randn(*shape, device="cpu", dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    """Seeded normal values on `device`, drawn in fp32 and cast to `dtype`."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------- rows

def _grads(device: str, shape: tuple) -> Workload:
    n_layers, scale = shape
    shapes = [tuple(max(1, s // scale) for s in t) for t in LLAMA8B_LAYER]
    grads = [torch.randn(s, device=device, dtype=torch.bfloat16) for _ in range(n_layers) for s in shapes]
    lids = [i // len(shapes) for i in range(len(grads))]
    lid = torch.tensor(lids, device=device)
    k = _kernels()
    from gradmap.ops import layer_grad_reductions_reference

    def foreach():  # two multi-tensor norm launches and a scatter: torch's best for this
        l1 = torch.stack(torch._foreach_norm(grads, 1)).float()
        l2 = torch.stack(torch._foreach_norm(grads, 2)).float().square()
        z = torch.zeros(n_layers, device=device)
        return z.index_add(0, lid, l1), z.index_add(0, lid, l2)
    calls = {"triton": lambda: k.layer_grad_reductions(grads, lids, n_layers), "foreach_norm": foreach,
             "reference": lambda: layer_grad_reductions_reference(grads, lids, n_layers)}

    def verify(impl: str) -> dict:
        ref_abs = torch.zeros(n_layers, dtype=torch.float64, device=device)
        ref_sq = torch.zeros_like(ref_abs)
        for g, layer in zip(grads, lids):
            ref_abs[layer] += g.double().abs().sum()
            ref_sq[layer] += g.double().square().sum()
        out_abs, out_sq = calls[impl]()
        rtol = 1e-2 if impl == "foreach_norm" else 2e-5  # foreach norms come back in bf16
        return {"abs": assert_within(out_abs, ref_abs, ref_abs, rtol, f"{impl} Σ|g|"),
                "sq": assert_within(out_sq, ref_sq, ref_sq, rtol, f"{impl} Σg²")}
    n_bytes = sum(g.numel() * g.element_size() for g in grads)
    return Workload(f"{n_layers} layers x {len(shapes)} bf16 gradients ({n_bytes / 2 ** 30:.2f} GiB)", calls,
                    verify, bytes_moved=n_bytes)


def _gate(device: str, shape: tuple) -> Workload:
    tokens, d = shape
    g, u = randn(tokens, d, device=device, seed=1), randn(tokens, d, device=device, seed=2)
    k = _kernels()
    from gradmap.ops import gate_reduction_reference
    calls = {"triton": lambda: k.gate_reduction(g, u),
             "torch_bmm_bf16": lambda: torch.bmm(g[:, None, :], u[:, :, None]).view(tokens),  # cuBLAS, bf16 out
             "reference": lambda: gate_reduction_reference(g, u)}

    def verify(impl: str) -> dict:
        gd, ud = g.double(), u.double()
        rtol = 1e-2 if impl == "torch_bmm_bf16" else 1e-5
        return assert_within(calls[impl](), (gd * ud).sum(-1), (gd * ud).abs().sum(-1), rtol, f"{impl} ⟨g,u⟩")
    return Workload(f"[{tokens}, {d}] bf16", calls, verify, bytes_moved=2 * g.numel() * 2 + 4 * tokens)


def _column_stats(device: str, shape: tuple) -> Workload:
    tokens, d = shape
    x = randn(tokens, d, device=device, seed=3)
    k = _kernels()
    from gradmap.ops import Moments, accumulate_moments_reference
    m = Moments(d, want_xtx=False, device=device)

    def torch_sums():  # no fp32 copy of x: a reduction with an fp32 accumulator, then a norm
        m.sum_x += torch.sum(x, 0, dtype=torch.float32)
        m.sq_x += torch.linalg.vector_norm(x, 2, 0, dtype=torch.float32).square()
    calls = {"triton": lambda: k.moments.column_stats_update(m.sum_x, m.sq_x, x), "torch_sum_fp32": torch_sums,
             "reference": lambda: accumulate_moments_reference(m, x)}

    def verify(impl: str) -> dict:
        m.sum_x.zero_()
        m.sq_x.zero_()
        calls[impl]()
        xd = x.double()
        return {"sum": assert_within(m.sum_x, xd.sum(0), xd.abs().sum(0), 1e-5, f"{impl} Σx"),
                "sq": assert_within(m.sq_x, xd.square().sum(0), xd.square().sum(0), 1e-5, f"{impl} Σx²")}
    grid = k.moments.column_stats_grid(tokens, d, x.device)
    detail = {"programs": grid["col_blocks"] * grid["splits"], "multiprocessors": grid["multiprocessors"],
              "grid": f"{grid['col_blocks']} column blocks x {grid['splits']} row splits"}
    return Workload(f"[{tokens}, {d}] bf16", calls, verify, bytes_moved=x.numel() * 2 + 2 * 4 * d, detail=detail)


def _gram(device: str, shape: tuple) -> Workload:
    tokens, d = shape
    x = randn(tokens, d, device=device, seed=4)
    k = _kernels()
    from gradmap.ops import Moments, accumulate_moments_reference
    m = Moments(d, device=device)
    calls = {"triton": lambda: k.moments.gram_update(m.xtx, x, None, m.sum_x, m.sq_x),
             "cublas_bf16": lambda: m.xtx.add_(x.T @ x),  # bf16 GEMM, fp32 accumulate, bf16 output
             "reference": lambda: accumulate_moments_reference(m, x)}  # fp32 copies, cuBLAS with TF32 off

    def verify(impl: str) -> dict:
        m.xtx.zero_()
        calls[impl]()
        xd = x.double()
        rtol = 8e-3 if impl == "cublas_bf16" else 1e-5  # the bf16 GEMM rounds its output to bf16
        out = assert_within(m.xtx, xd.T @ xd, xd.abs().T @ xd.abs(), rtol, f"{impl} XᵀX")
        if impl == "triton" and not torch.equal(m.xtx, m.xtx.T):
            raise AssertionError("XᵀX lost exact symmetry")
        return out
    return Workload(f"[{tokens}, {d}] bf16", calls, verify, bytes_moved=x.numel() * 2 + 2 * m.xtx.numel() * 4,
                    flops=2.0 * tokens * d * d)


def _solve(device: str, shape: tuple) -> Workload:
    batch, d = shape
    from gradmap.ops import extension, projection_solve_reference
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 2 * d, d, device=device, generator=g)
    a = x.transpose(1, 2) @ x  # fp32 statistics, as the moments produce them
    b = a + 0.1 * torch.randn(batch, d, d, device=device, generator=g)
    del x
    ext = extension.extension()

    def extension_solve():
        if ext is None or (device == "cuda" and not ext.cuda_built()):
            raise Unavailable(f"gradmap._C: {extension.extension_status()}")
        return ext.projection_solve(a, b, 0.01, True)
    calls = {"extension": extension_solve, "reference": lambda: projection_solve_reference(a, b, 0.01)}

    def verify(impl: str) -> dict:
        p, status = calls[impl]()
        p_ref, s_ref = projection_solve_reference(a, b, 0.01)
        rel = ((p - p_ref).abs().max() / p_ref.abs().max()).item()
        if not (rel < 1e-10 and torch.equal(status.cpu(), s_ref.cpu())):
            raise AssertionError(f"{impl}: relative difference {rel:.3g}, status {status.tolist()}")
        return {"relative_difference": rel}
    return Workload(f"batch {batch}, d={d}, fp64", calls, verify, flops=batch * (d ** 3 / 3 + 2 * d ** 3))


TABLE: tuple[KernelCase, ...] = (
    KernelCase("layer_grad_reductions", "gradmap.ops.layer_grad_reductions", "kernels/grad_reductions.py",
               "layer_grad_reductions_reference",
               "GradMAP (gradient='param'): after each backward, all layers' bf16 gradients at once",
               ("triton", "foreach_norm", "reference"), "foreach_norm",
               shapes={"cuda": ((32, 1),)}, small={"cuda": ((2, 64),), "cpu": ((2, 64),)}, build=_grads),
    KernelCase("gate_reduction", "gradmap.ops.gate_reduction", "kernels/gate_reduction.py",
               "gate_reduction_reference",
               "GradMAP (gradient='token'): every layer, every micro-batch [tokens, d]",
               ("triton", "torch_bmm_bf16", "reference"), "reference",
               shapes={"cuda": ((2048, 4096), (16384, 4096))}, small={"cuda": ((64, 256),), "cpu": ((37, 40),)},
               build=_gate),
    KernelCase("column_stats_update", "gradmap.ops.accumulate_moments (no XᵀX)", "kernels/moments.py",
               "accumulate_moments_reference",
               "magnitude sums of the scoring pass and of magnitude compensation, layer means, Σr²",
               ("triton", "torch_sum_fp32", "reference"), "torch_sum_fp32",
               shapes={"cuda": ((2048, 4096), (16384, 4096))}, small={"cuda": ((64, 256),), "cpu": ((37, 40),)},
               build=_column_stats),
    KernelCase("gram_update XᵀX", "gradmap.ops.accumulate_moments (XᵀX)", "kernels/moments.py",
               "accumulate_moments_reference",
               "projection / ReplaceMe sites: MᵀM of the bf16 MLP output, every micro-batch",
               ("triton", "cublas_bf16", "reference"), "cublas_bf16",
               shapes={"cuda": ((2048, 4096), (16384, 4096))}, small={"cuda": ((128, 256),), "cpu": ((37, 40),)},
               build=_gram),
    KernelCase("projection_solve", "gradmap.ops.projection_solve", "csrc/ (gradmap._C)",
               "projection_solve_reference", "projection / ReplaceMe: one fp64 ridge solve per site",
               ("extension", "reference"), "reference",
               shapes={"cuda": ((1, 4096), (4, 4096)), "cpu": ((1, 576), (4, 576))},
               small={"cuda": ((2, 128),), "cpu": ((2, 48),)}, build=_solve),
)
