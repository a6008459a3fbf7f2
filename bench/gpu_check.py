"""The checks behind `bash .ci/gpu` (issue 18): every kernel and the extension solve against fp64
references, in strict mode, then the measurements of bench/gpu_perf.py; writes gpu_report.json and
gpu_report.md into --out and exits 1 if any check failed.

    python bench/gpu_check.py --out DIR              # on a GPU (what .ci/gpu runs)
    python bench/gpu_check.py --out DIR --dry-run    # CPU, tiny shapes, TRITON_INTERPRET=1
    python bench/gpu_check.py --out DIR --small      # small GPU cases only (under compute-sanitizer)

Run with GRADMAP_STRICT_KERNELS=1 (no silent fallback: a kernel that cannot run fails its check)
and GRADMAP_KERNEL_POISON=1 (buffers the kernels allocate start as NaN). Inputs are fresh random
tensors; accumulators start from random state. The dry run routes CPU tensors to the kernels
(backend.KERNEL_DEVICE_TYPES), so the same code paths run under the interpreter.
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
import traceback

import torch

RTOL = 1e-3  # of Σ|terms|: fp32 accumulation over up to 262144 terms; a lost tile or chunk is O(1)
TWO31 = 2 ** 31


class Report:
    """Checks and measurements, each with its outcome, seconds and details."""

    def __init__(self, dry: bool, device: str):
        self.dry, self.device, self.t0 = dry, device, time.time()
        self.checks: list[dict] = []
        self.measurements: list[dict] = []
        self.info: dict = {}

    def check(self, name: str, fn, *args) -> None:
        start = time.time()
        entry = {"name": name}
        try:
            entry["details"] = fn(*args) or {}
            entry["outcome"] = "passed"
        except Exception as exc:  # a failed check is reported, the others still run
            entry["outcome"] = "failed"
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.time() - start, 3)
        self.checks.append(entry)
        print(f"[{entry['outcome']}] {name} ({entry['seconds']} s) {entry.get('error', '')}", flush=True)
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if c["outcome"] == "failed"]


def rand(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def assert_within(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rtol: float, what: str) -> dict:
    """|out − ref| ≤ rtol·magnitude elementwise (NaN fails); returns the worst ratio to the bound."""
    err = (out.double() - ref.double()).abs()
    bound = rtol * magnitude.double() + 1e-30
    bad = ~(err <= bound)
    worst = (err / bound).nan_to_num(float("inf")).max().item() if err.numel() else 0.0
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off, worst {worst:.3g} x bound; "
                             f"first at {bad.nonzero()[:3].tolist()}")
    return {"worst_err_over_bound": worst}


# ----------------------------------------------------------------------------- cases

def moments_case(kernels, ops, device, T, d, d_y, dtype, layout, direct, seed):
    """One accumulate_moments update (dispatch, or the launcher when `direct`) vs fp64."""
    base = rand(T, 2 * d if layout == "strided" else d, dtype=dtype, device=device, seed=seed)
    x = {"contiguous": base, "strided": base[:, ::2], "column_major": None}[layout]
    if layout == "column_major":
        x = rand(d, T, dtype=dtype, device=device, seed=seed).T
    y = rand(T, d_y, dtype=dtype, device=device, seed=seed + 1) if d_y else None
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


def offsets_past_2_31(kernels, ops, device, d, t_full, dtype):
    """Column-major x whose column stride times d passes 2³¹ elements (int64 offsets, item 9)."""
    base = rand(d, t_full, dtype=dtype, device=device, seed=5)  # d x t_full elements
    x = base[:, :64].T  # [64, d], strides (1, t_full)
    span = (d - 1) * x.stride(1)
    m = ops.Moments(d, want_xtx=True, device=device)
    kernels.accumulate_moments(m, x)
    xd = x.double()
    out = assert_within(m.xtx, xd.T @ xd, xd.abs().T @ xd.abs(), RTOL, "xtx (2³¹ view)")
    m2 = ops.Moments(d, want_xtx=False, device=device)
    kernels.accumulate_moments(m2, x)
    assert_within(m2.sq_x, xd.square().sum(0), xd.square().sum(0), RTOL, "Σx² (2³¹ view)")
    return {**out, "max_offset_elements": span, "crosses_2_31": span >= TWO31}


def c_offsets_past_2_31(kernels, ops, device, d, d_y, dtype):
    """XᵀY with DA·DB past 2³¹ accumulator elements."""
    x, y = rand(16, d, dtype=dtype, device=device, seed=6), rand(16, d_y, dtype=dtype, device=device, seed=7)
    m = ops.Moments(d, d_y, want_xtx=False, device=device)
    kernels.accumulate_moments(m, x, y)
    ref = x.float().T @ y.float()  # 16 exact products per element: fp32 is within 1e-6 here
    out = assert_within(m.xty, ref, x.float().abs().T @ y.float().abs(), RTOL, "xty (2³¹ accumulator)")
    return {**out, "accumulator_elements": d * d_y, "crosses_2_31": d * d_y >= TWO31}


def gate_case(kernels, ops, device, shape, dtype, direct, seed, row_stride=False):
    g = rand(*shape[:-1], shape[-1] + (7 if row_stride else 0), dtype=dtype, device=device, seed=seed)
    g = g[..., :shape[-1]]
    u = rand(*shape, dtype=dtype, device=device, seed=seed + 1)
    out = (kernels.gate_reduction if direct else ops.gate_reduction)(g, u)
    gd, ud = g.double(), u.double()
    return assert_within(out, (gd * ud).sum(-1), (gd * ud).abs().sum(-1), RTOL, f"⟨g,u⟩ {shape}")


def grads_case(kernels, ops, device, shapes, n_layers, dtypes, direct, ones=False):
    grads, lids = [], []
    for layer in range(n_layers):
        for i, shape in enumerate(shapes):
            dtype = dtypes[(layer + i) % len(dtypes)]
            t = (torch.ones(shape, device=device, dtype=dtype) if ones
                 else rand(*shape, dtype=dtype, device=device, seed=layer * 100 + i))
            grads.append(t)
            lids.append(layer)
    if not ones:  # an unaligned view, a transposed one, tiny tensors
        grads += [rand(1001, dtype=dtypes[0], device=device, seed=1)[3:],
                  rand(13, 7, dtype=dtypes[-1], device=device, seed=2).T,
                  rand(1, dtype=dtypes[0], device=device, seed=3)]
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


def solve_case(ops, extension, device, n, d, dry):
    ext = extension.extension()
    if ext is None or (device == "cuda" and not ext.cuda_built()):
        if dry:
            return {"skipped": f"extension not built: {extension.extension_status()}"}
        raise AssertionError(f"gradmap._C with CUDA is not available: {extension.extension_status()}")
    x = rand(n, 2 * d, d, device=device, seed=d)
    a = x.transpose(1, 2) @ x
    b = a + 0.1 * rand(n, d, d, device=device, seed=d + 1)
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


# ----------------------------------------------------------------------------- plan

def correctness(report: Report, small: bool) -> None:
    import gradmap.ops as ops
    from gradmap.ops import backend, extension
    dry, device = report.dry, report.device
    kernels = backend.load_kernels()
    report.info["backends"] = backends = backend.backends()
    report.check("triton kernels load", lambda: {"status": backends["triton"]} if kernels is not None
                 else (_ for _ in ()).throw(AssertionError(backends["triton"])))
    if kernels is None:
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
    if tiny:
        report.check("moments column-major offsets (2³¹ on GPU)", offsets_past_2_31, kernels, ops, device, 24, 80,
                     torch.bfloat16)
    else:
        report.check("moments column-major offsets past 2³¹", offsets_past_2_31, kernels, ops, device, 8192,
                     262144, torch.bfloat16)
        report.check("moments XᵀY accumulator past 2³¹", c_offsets_past_2_31, kernels, ops, device, 8192,
                     262144, torch.bfloat16)
    shapes = [(1, 1), (5, 37), (3, 7, 45)] + ([] if tiny else [(16384, 4096), (2047, 4097), (2, 2048, 8192)])
    for shape in shapes:
        for dtype in half:
            report.check(f"gate dispatch {dtype} {shape}", gate_case, kernels, ops, device, shape, dtype, False, 3)
        report.check(f"gate launcher fp32 {shape}", gate_case, kernels, ops, device, shape, torch.float32, True, 4)
    report.check("gate row-strided bf16", gate_case, kernels, ops, device, (9, 41) if tiny else (4096, 4096),
                 torch.bfloat16, False, 5, True)
    llama = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
             (4096, 14336), (4096,), (4096,)]
    shapes = [(s[0] // 64,) + tuple(x // 64 for x in s[1:]) for s in llama] if tiny else llama
    n_layers = 3 if tiny else 2
    report.check("grad reductions dispatch bf16+fp16", grads_case, kernels, ops, device, shapes, n_layers, half,
                 False)
    report.check("grad reductions launcher fp32+bf16", grads_case, kernels, ops, device, shapes, n_layers,
                 [torch.float32, torch.bfloat16], True)
    report.check("grad reductions all-ones exact", grads_case, kernels, ops, device, shapes, n_layers,
                 [torch.bfloat16], False, True)
    for n, d in ([(3, 16)] if tiny else [(4, 576), (1, 2048), (1, 4096)]):
        report.check(f"projection solve n={n} d={d}", solve_case, ops, extension, device, n, d, dry)
    report.check("strict mode raises on fp64", strict_raises, ops, device)


def sanitizer(report: Report, out: str) -> None:
    """compute-sanitizer memcheck over the small cases, when the tool works on this machine."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        report.info["sanitizer"] = "compute-sanitizer not found"
        return
    probe = subprocess.run([tool, "--tool", "memcheck", sys.executable, "-c",
                            "import torch; print(torch.ones(8, device='cuda').sum().item())"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0 or "8.0" not in probe.stdout:
        report.info["sanitizer"] = f"does not work here (exit {probe.returncode}): {probe.stderr[-300:]}"
        return
    report.info["sanitizer"] = "ran"

    def run():
        sub = os.path.join(out, "sanitizer")
        proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "97", sys.executable,
                               os.path.abspath(__file__), "--small", "--out", sub],
                              capture_output=True, text=True, timeout=420)
        tail = (proc.stdout + proc.stderr)[-3000:]
        assert proc.returncode == 0, f"exit {proc.returncode}: {tail}"
        return {"errors": 0, "tail": tail[-500:]}
    report.check("compute-sanitizer memcheck (small cases)", run)


def write(report: Report, out: str) -> None:
    report.info.update(seconds=round(time.time() - report.t0, 1), dry_run=report.dry,
                       failed=report.failed(), python=platform.python_version())
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump({"info": report.info, "checks": report.checks, "measurements": report.measurements}, f,
                  indent=1, default=str)
    lines = [f"# gradmap GPU check{' (dry run: CPU, interpreter, tiny shapes)' if report.dry else ''}", "",
             f"- device: {report.info.get('device')}", f"- versions: {report.info.get('versions')}",
             f"- sanitizer: {report.info.get('sanitizer', 'not run')}",
             f"- checks: {len(report.checks) - len(report.failed())}/{len(report.checks)} passed in "
             f"{report.info['seconds']} s", "", "| check | outcome | s |", "| --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['outcome']}{': ' + c['error'][:120] if 'error' in c else ''} | {c['seconds']} |"
              for c in report.checks]
    if report.measurements:
        lines += ["", "| measurement | value | detail |", "| --- | --- | --- |"]
        lines += [f"| {m['name']} | {m.get('value', '')} | {m.get('detail', '')} |" for m in report.measurements]
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--small", action="store_true", help="small cases, no measurements (sanitizer run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    import gradmap
    from gradmap.ops import backend
    if args.dry_run:
        backend.KERNEL_DEVICE_TYPES = ("cpu",)  # CPU tensors take the kernel paths, under the interpreter
    report = Report(args.dry_run, device)
    versions = {"torch": torch.__version__, "gradmap": gradmap.__version__, "gradmap_from": gradmap.__file__}
    for name in ("triton", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:
            versions[name] = f"missing ({exc})"
    report.info.update(versions=versions, strict=backend.strict_kernels(),
                       device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)")
    correctness(report, args.small)
    if not args.small:
        if not args.dry_run:
            sanitizer(report, args.out)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_perf
        gpu_perf.run(report)
    write(report, args.out)
    print(f"gpu check: {len(report.failed())} failed of {len(report.checks)}; report in {args.out}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
