"""The checks behind `bash .ci/gpu` (issues 18, 27): every kernel and the extension solve against
fp64 references in strict mode, then the P3 kernel table and the P4 pipelines (bench/gpu_perf.py),
within one time budget; every result is written to --out as it finishes (bench/gpu_report.py).

    python bench/gpu_check.py --out DIR                    # on a GPU (what .ci/gpu runs)
    python bench/gpu_check.py --out DIR --dry-run          # CPU, tiny shapes, TRITON_INTERPRET=1
    python bench/gpu_check.py --out DIR --small            # small GPU cases only (under compute-sanitizer)

--budget S (default $GRADMAP_GPU_BUDGET_S or 480) counts from --started-at (epoch seconds;
`.ci/gpu` passes its own start, so the install counts). --sanitizer / --no-sanitizer (default
$GRADMAP_GPU_SANITIZER, else off): compute-sanitizer memcheck over the small cases.
Run with GRADMAP_STRICT_KERNELS=1 (no silent fallback: a kernel that cannot run fails its
check) and GRADMAP_KERNEL_POISON=1 (buffers the kernels allocate start as NaN). The dry run
routes CPU tensors to the kernels (backend.KERNEL_DEVICE_TYPES), so the same code paths run
under the interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_report import Report, Skip  # noqa: E402
from kernel_table import assert_within, randn  # noqa: E402

RTOL = 1e-3  # of Σ|terms|: fp32 accumulation over up to 262144 terms; a lost tile or chunk is O(1)
TWO31 = 2 ** 31
DRY_LIMIT = 2 ** 11  # the dry run's stand-in for 2³¹: same geometry, a size the CPU can hold


# ----------------------------------------------------------------------------- cases

def moments_case(kernels, ops, device, T, d, d_y, dtype, layout, direct, seed):
    """One accumulate_moments update (dispatch, or the launcher when `direct`) vs fp64."""
    base = randn(T, 2 * d if layout == "strided" else d, dtype=dtype, device=device, seed=seed)
    x = {"contiguous": base, "strided": base[:, ::2], "column_major": None}[layout]
    if layout == "column_major":
        x = randn(d, T, dtype=dtype, device=device, seed=seed).T
    y = randn(T, d_y, dtype=dtype, device=device, seed=seed + 1) if d_y else None
    m = ops.Moments(d, d_y, device=device)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    s = torch.randn(d, d, generator=g, device=device)
    m.xtx.copy_(s + s.T)
    m.sum_x.normal_(generator=g)
    if m.xty is not None:
        m.xty.normal_(generator=g)
    m0 = {k: getattr(m, k).double() for k in ("sum_x", "sq_x", "xtx", "xty") if getattr(m, k) is not None}
    (kernels.accumulate_moments if direct else ops.accumulate_moments)(m, x, y)
    xd, out = x.double(), {}
    out["xtx"] = assert_within(m.xtx, m0["xtx"] + xd.T @ xd, m0["xtx"].abs() + xd.abs().T @ xd.abs(), RTOL, "xtx")
    out["sum_x"] = assert_within(m.sum_x, m0["sum_x"] + xd.sum(0), m0["sum_x"].abs() + xd.abs().sum(0), RTOL, "Σx")
    out["sq_x"] = assert_within(m.sq_x, m0["sq_x"] + xd.square().sum(0), m0["sq_x"] + xd.square().sum(0), RTOL,
                                "Σx²")
    if y is not None:
        yd = y.double()
        out["xty"] = assert_within(m.xty, m0["xty"] + xd.T @ yd, m0["xty"].abs() + xd.abs().T @ yd.abs(), RTOL,
                                   "xty")
    assert torch.equal(m.xtx, m.xtx.T), "XᵀX lost exact symmetry"
    assert m.count == T
    return out


def offsets_past(kernels, ops, device, d, limit, dtype):
    """Column-major x [64, d] whose largest element offset (d − 1)·stride passes `limit` (2³¹ on
    a GPU: int64 offsets in the Gram and column kernels)."""
    t_full = -(-limit // (d - 1)) + 64  # column stride: (d − 1)·t_full > limit
    x = randn(d, t_full, dtype=dtype, device=device, seed=5)[:, :64].T  # [64, d], strides (1, t_full)
    span = (d - 1) * x.stride(1)
    if span < limit:
        raise AssertionError(f"largest offset {span:,} does not pass {limit:,}")
    m = ops.Moments(d, want_xtx=True, device=device)
    kernels.accumulate_moments(m, x)
    xd = x.double()
    out = assert_within(m.xtx, xd.T @ xd, xd.abs().T @ xd.abs(), RTOL, "xtx (offsets view)")
    m2 = ops.Moments(d, want_xtx=False, device=device)
    kernels.accumulate_moments(m2, x)
    assert_within(m2.sq_x, xd.square().sum(0), xd.square().sum(0), RTOL, "Σx² (offsets view)")
    return {**out, "largest_offset": span, "limit": limit}


def accumulator_past(kernels, ops, device, d, limit, dtype):
    """XᵀY with an accumulator of d·d_y > `limit` elements (its last offset passes it), compared
    in row blocks so the fp64 check never holds a second copy of it."""
    d_y = limit // d + 16
    x, y = randn(16, d, dtype=dtype, device=device, seed=6), randn(16, d_y, dtype=dtype, device=device, seed=7)
    m = ops.Moments(d, d_y, want_xtx=False, device=device)
    kernels.accumulate_moments(m, x, y)
    xf, yf = x.float(), y.float()
    worst = 0.0
    for r in range(0, d, 512):  # 16 exact products per element: fp32 is within 1e-6 here
        ref = xf[:, r:r + 512].T @ yf
        got = assert_within(m.xty[r:r + 512], ref, xf[:, r:r + 512].abs().T @ yf.abs(), RTOL, "xty (large)")
        worst = max(worst, got["worst_err_over_bound"])
    last = d * d_y - 1
    if last < limit:
        raise AssertionError(f"last accumulator offset {last:,} does not pass {limit:,}")
    return {"worst_err_over_bound": worst, "last_offset": last, "limit": limit}


def gate_case(kernels, ops, device, shape, dtype, direct, seed, row_stride=False):
    g = randn(*shape[:-1], shape[-1] + (7 if row_stride else 0), dtype=dtype, device=device, seed=seed)
    g = g[..., :shape[-1]]
    u = randn(*shape, dtype=dtype, device=device, seed=seed + 1)
    out = (kernels.gate_reduction if direct else ops.gate_reduction)(g, u)
    gd, ud = g.double(), u.double()
    return assert_within(out, (gd * ud).sum(-1), (gd * ud).abs().sum(-1), RTOL, f"⟨g,u⟩ {shape}")


def grads_case(kernels, ops, device, shapes, n_layers, dtypes, direct, ones=False):
    grads, lids = [], []
    for layer in range(n_layers):
        for i, shape in enumerate(shapes):
            dtype = dtypes[(layer + i) % len(dtypes)]
            grads.append(torch.ones(shape, device=device, dtype=dtype) if ones
                         else randn(*shape, dtype=dtype, device=device, seed=layer * 100 + i))
            lids.append(layer)
    if not ones:  # an unaligned view, a transposed one, tiny tensors
        grads += [randn(1001, dtype=dtypes[0], device=device, seed=1)[3:],
                  randn(13, 7, dtype=dtypes[-1], device=device, seed=2).T,
                  randn(1, dtype=dtypes[0], device=device, seed=3)]
        lids += [0, n_layers - 1, 0]
    fn = kernels.layer_grad_reductions if direct else ops.layer_grad_reductions
    out_abs, out_sq = fn(grads, lids, n_layers)
    ref_abs = torch.zeros(n_layers, dtype=torch.float64, device=device)
    ref_sq = torch.zeros(n_layers, dtype=torch.float64, device=device)
    for t, layer in zip(grads, lids):
        ref_abs[layer] += t.double().abs().sum()
        ref_sq[layer] += t.double().square().sum()
    if ones:  # integer sums: every partial is a multiple of 2¹² below 2³⁶, exact in fp32
        assert torch.equal(out_abs.double(), ref_abs) and torch.equal(out_sq.double(), ref_sq), \
            f"element counts {out_abs.tolist()} != {ref_abs.tolist()}"
        return {"elements": int(ref_abs.sum().item())}
    return {"abs": assert_within(out_abs, ref_abs, ref_abs, 2e-5, "Σ|g|"),
            "sq": assert_within(out_sq, ref_sq, ref_sq, 2e-5, "Σg²")}


def solve_case(ops, extension, device, n, d):
    ext = extension.extension()
    if ext is None or (device == "cuda" and not ext.cuda_built()):
        if device == "cpu":
            raise Skip(f"extension not built: {extension.extension_status()}")
        raise AssertionError(f"gradmap._C with CUDA is not available: {extension.extension_status()}")
    x = randn(n, 2 * d, d, dtype=torch.float32, device=device, seed=d)
    a = x.transpose(1, 2) @ x
    b = a + 0.1 * randn(n, d, d, dtype=torch.float32, device=device, seed=d + 1)
    p, status = ops.projection_solve(a, b, 0.01)  # strict: an extension failure raises
    p_ref, s_ref = ops.projection_solve_reference(a, b, 0.01)
    rel = ((p - p_ref).abs().max() / p_ref.abs().max()).item()
    assert rel < 1e-10 and torch.equal(status, s_ref), f"relative difference {rel:.3g}"
    return {"relative_difference": rel}


def strict_raises(ops, device):
    x = torch.ones(4, 3, dtype=torch.float64, device=device)
    try:
        ops.gate_reduction(x, x)
    except ops.StrictKernelError as exc:
        return {"message": str(exc)[:200]}
    raise AssertionError("fp64 on the kernel device did not raise in strict mode")


def offload_strict(device, dry):
    """Strict mode with offload="layer": weights on the host, statistics on the compute device."""
    from gpu_perf import llama

    from gradmap.ops import backend
    from gradmap.prune.driver import fast_prune
    model = llama(True, "cpu", seed=1)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with backend.record_kernels() as launched:
        result = fast_prune(model, calib, 1, metric="block-influence", compensation="magnitude",
                            schedule="iterative", offload="layer", compute_device=device, progress=False)
    from_scoring = result.compensation_report["magnitude"].get("statistics_from_scoring_pass")
    assert from_scoring == result.removed_layers, result.compensation_report["magnitude"]
    return {"removed": result.removed_layers, "kernels": sorted(set(launched))}


# ----------------------------------------------------------------------------- stages

def correctness(report: Report, small: bool) -> None:
    import gradmap.ops as ops
    from gradmap.ops import backend, extension
    dry, device = report.dry, report.device
    kernels = backend.load_kernels()
    if kernels is None:
        report.check("triton kernels load", lambda: (_ for _ in ()).throw(
            AssertionError(backend.backends()["triton"])))
        return
    tiny = dry or small
    half = [torch.bfloat16, torch.float16]
    ds = [20, 33] if tiny else [576, 2048, 4096, 8192]
    T = 37 if tiny else 16384
    for d in ds:
        for dtype in half:
            report.check(f"moments dispatch {dtype} T={T} d={d} xty", moments_case, kernels, ops, device, T, d,
                         d, dtype, "contiguous", False, d)
        report.check(f"moments launcher fp32 T={T} d={d}", moments_case, kernels, ops, device, T, d, None,
                     torch.float32, "contiguous", True, d + 1)
    edges = [(1, 17), (19, 16), (33, 31)] if tiny else [(2047, 577), (1, 4097), (129, 2049), (262144, 4096)]
    for t, d in edges:
        report.check(f"moments edge bf16 T={t} d={d}", moments_case, kernels, ops, device, t, d, None,
                     torch.bfloat16, "contiguous", False, t)
    for layout in ("strided", "column_major"):
        for dtype in (torch.bfloat16, torch.float32):
            report.check(f"moments {layout} {dtype}", moments_case, kernels, ops, device, T, ds[1], ds[0],
                         dtype, layout, True, 11)
    if tiny:  # the same geometry at a size the machine holds: 2³¹ is not crossed, and the names say so
        report.check("moments column-major offsets past 2¹¹ (stand-in for 2³¹)", offsets_past, kernels, ops,
                     device, 24, DRY_LIMIT, torch.bfloat16)
        report.check("moments XᵀY accumulator past 2¹¹ (stand-in for 2³¹)", accumulator_past, kernels, ops,
                     device, 24, DRY_LIMIT, torch.bfloat16)
    else:
        report.check("moments column-major offsets past 2³¹", offsets_past, kernels, ops, device, 8192, TWO31,
                     torch.bfloat16)
        report.check("moments XᵀY accumulator past 2³¹", accumulator_past, kernels, ops, device, 8192, TWO31,
                     torch.bfloat16)
    shapes = [(1, 1), (5, 37), (3, 7, 45)] + ([] if tiny else [(16384, 4096), (2047, 4097), (2, 2048, 8192)])
    for shape in shapes:
        for dtype in half:
            report.check(f"gate dispatch {dtype} {shape}", gate_case, kernels, ops, device, shape, dtype, False, 3)
        report.check(f"gate launcher fp32 {shape}", gate_case, kernels, ops, device, shape, torch.float32, True, 4)
    report.check("gate row-strided bf16", gate_case, kernels, ops, device, (9, 41) if tiny else (4096, 4096),
                 torch.bfloat16, False, 5, True)
    from kernel_table import LLAMA8B_LAYER
    shapes = [tuple(x // 64 for x in s) for s in LLAMA8B_LAYER] if tiny else LLAMA8B_LAYER
    n_layers = 3 if tiny else 2
    report.check("grad reductions dispatch bf16+fp16", grads_case, kernels, ops, device, shapes, n_layers, half,
                 False)
    report.check("grad reductions launcher fp32+bf16", grads_case, kernels, ops, device, shapes, n_layers,
                 [torch.float32, torch.bfloat16], True)
    report.check("grad reductions all-ones exact", grads_case, kernels, ops, device, shapes, n_layers,
                 [torch.bfloat16], False, True)
    for n, d in ([(3, 16)] if tiny else [(4, 576), (1, 2048), (1, 4096)]):
        report.check(f"projection solve n={n} d={d}", solve_case, ops, extension, device, n, d)
    report.check("strict mode raises on fp64", strict_raises, ops, device)
    if not small:
        report.check("strict mode with offload='layer'", offload_strict, device, dry)


def sanitizer(report: Report, out: str, probe_timeout: float = 120.0) -> None:
    """compute-sanitizer memcheck over the small cases, when the tool works here; a probe that
    fails or times out is a note, not an abort."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        report.record("check", "compute-sanitizer memcheck", outcome="skipped", why="compute-sanitizer not found")
        return
    try:
        probe = subprocess.run([tool, "--tool", "memcheck", sys.executable, "-c",
                                "import torch; print(torch.ones(8, device='cuda').sum().item())"],
                               capture_output=True, text=True, timeout=min(probe_timeout, max(1.0, report.left())))
    except subprocess.TimeoutExpired:
        report.record("check", "compute-sanitizer memcheck", outcome="skipped",
                      why=f"the probe did not finish in {probe_timeout:.0f} s")
        return
    if probe.returncode != 0 or "8.0" not in probe.stdout:
        report.record("check", "compute-sanitizer memcheck", outcome="skipped",
                      why=f"the tool does not work here (exit {probe.returncode}): {probe.stderr[-300:]}")
        return

    def run():
        sub = os.path.join(out, "sanitizer")
        os.makedirs(sub, exist_ok=True)
        try:
            proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "97", sys.executable,
                                   os.path.abspath(__file__), "--small", "--out", sub,
                                   "--budget", str(max(1, int(report.deadline - time.time())))],
                                  capture_output=True, text=True, timeout=max(1.0, report.deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise Skip("memcheck did not finish before the stage deadline") from None
        tail = (proc.stdout + proc.stderr)[-3000:]
        assert proc.returncode == 0, f"exit {proc.returncode}: {tail}"
        return {"errors": 0, "tail": tail[-500:]}
    report.check("compute-sanitizer memcheck (small cases)", run)


def environment(report: Report) -> None:
    """Versions, the device, and `backends()` (printed before any check)."""
    import gradmap
    from gradmap.ops import backend, extension
    versions = {"torch": torch.__version__, "gradmap": gradmap.__version__, "gradmap_from": gradmap.__file__,
                "python": platform.python_version()}
    for name in ("triton", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:
            versions[name] = f"missing ({exc})"
    device = torch.cuda.get_device_name() if report.device == "cuda" else "cpu (dry run)"
    report.info.update(versions=versions, device=device, strict=backend.strict_kernels())
    backends = backend.backends()
    report.info["backends"] = backends
    print("backends: " + json.dumps(backends, indent=1), flush=True)
    ext = extension.extension()
    built = ext is not None and (report.device == "cpu" or ext.cuda_built())
    report.measurement("backends", "; ".join(f"{k}: {v}" for k, v in backends.items()), backends=backends)
    report.measurement("CUDA extension" if report.device == "cuda" else "extension",
                       "built" if built else f"not built: {extension.extension_status()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--small", action="store_true", help="small cases, no measurements (sanitizer run)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GRADMAP_GPU_BUDGET_S", "480")))
    ap.add_argument("--started-at", type=float, default=None, help="epoch seconds the budget counts from")
    ap.add_argument("--sanitizer", action=argparse.BooleanOptionalAction,
                    default=os.environ.get("GRADMAP_GPU_SANITIZER", "0") not in ("", "0"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    from gradmap.ops import backend
    if args.dry_run:
        backend.KERNEL_DEVICE_TYPES = ("cpu",)  # CPU tensors take the kernel paths, under the interpreter
    report = Report(args.out, args.dry_run, device, args.budget, args.started_at)
    report.start_watchdog()
    import gpu_perf
    plan = [("environment", 0.02, lambda: environment(report)),
            ("correctness", 0.33, lambda: correctness(report, args.small))]
    if not args.small:
        plan += [("P3 kernel table", 0.25, lambda: gpu_perf.p3(report)),
                 ("P4 pipelines", 0.40, lambda: gpu_perf.p4(report))]
        if args.sanitizer and not args.dry_run:
            plan.append(("sanitizer", 0.25, lambda: sanitizer(report, args.out)))
        else:
            why = ("off (the quick run; --sanitizer or GRADMAP_GPU_SANITIZER=1 turns it on)" if not args.sanitizer
                   else "no GPU in the dry run")
            plan.append(("sanitizer", 0.01, lambda: report.record("check", "compute-sanitizer memcheck",
                                                                   outcome="skipped", why=why)))
    for i, (name, share, run) in enumerate(plan):
        with report.stage(name, share, sum(s for _, s, _ in plan[i + 1:])) as started:
            if started:
                run()
    report.finish()
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
