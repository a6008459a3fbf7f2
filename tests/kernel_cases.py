"""Triton kernels vs their plain-torch references, on CPU under the Triton interpreter.

Not collected by the normal run (the name does not match test_*.py):
tests/test_kernels.py runs this module in a subprocess with TRITON_INTERPRET=1
(it must be set before the kernels are defined) and GRADMAP_KERNEL_POISON=1
(every buffer a kernel allocates starts as NaN, so an unwritten element fails).
In-place accumulators start from random non-zero state for the same reason.

Tolerances are relative to the magnitude of the summed terms (Σ|terms|), the
scale of fp32 summation error: fp32 inputs 1e-5, bf16/fp16 inputs 1e-3, with
the reference computed from the same half-precision inputs upcast to fp32.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

from gradmap.core.errors import GradmapError  # noqa: E402
from gradmap.ops import (Moments, accumulate_moments_reference, backend, gate_reduction_reference,  # noqa: E402
                         layer_grad_reductions_reference)

KERNELS = backend.load_kernels()  # this checkout's kernels/, even without pip install -e .
assert KERNELS is not None, backend.backends()["triton"]
accumulate_moments = KERNELS.accumulate_moments
gate_reduction = KERNELS.gate_reduction
layer_grad_reductions = KERNELS.layer_grad_reductions

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rtol: float, what: str):
    """|out − ref| ≤ rtol·magnitude elementwise; report where and how many elements differ."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}, expected float32"
    err = (out.double() - ref.double()).abs()
    bound = rtol * magnitude.double() + 1e-30
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (err / bound).nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off (worst err/bound "
                             f"{worst:.3g}); first at {idx}: out={out[bad][:5].tolist()} "
                             f"ref={ref[bad][:5].tolist()}")


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------- gradient reductions

def _grad_set(dtype_of, seed=0):
    """Many tiny tensors (1..7 elements), one large, one unaligned view, one transposed."""
    grads, lids = [], []
    for i in range(30):
        grads.append(randn(1 + i % 7, dtype=dtype_of(i), seed=seed + i))
        lids.append(i % 4)
    grads.append(randn(2999, dtype=dtype_of(99), seed=seed + 99))
    lids.append(2)
    grads.append(randn(1001, dtype=dtype_of(100), seed=seed + 100)[3:])  # not 16-byte aligned
    lids.append(5)
    grads.append(randn(13, 7, dtype=dtype_of(101), seed=seed + 101).T)  # non-contiguous
    lids.append(0)
    return grads, lids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [None, (64, 2)], ids=["default", "small_chunks"])
def test_grad_reductions(dtype, geometry):
    grads, lids = _grad_set(lambda i: dtype)
    block, iters = geometry or (None, None)
    n_layers = 7  # layers 4 and 6 own no tensor: their sums must come out as exact zeros
    out_abs, out_sq = layer_grad_reductions(grads, lids, n_layers, block=block, iters=iters)
    ref_abs, ref_sq = layer_grad_reductions_reference(grads, lids, n_layers)
    assert_close_to(out_abs, ref_abs, ref_abs, RTOL[dtype], "Σ|g|")
    assert_close_to(out_sq, ref_sq, ref_sq, RTOL[dtype], "Σg²")
    assert out_abs[4] == 0 and out_abs[6] == 0


def test_grad_reductions_mixed_dtypes_one_call():
    grads, lids = _grad_set(lambda i: DTYPES[i % 3], seed=7)
    out_abs, out_sq = layer_grad_reductions(grads, lids, 6, block=16, iters=2)
    ref_abs, ref_sq = layer_grad_reductions_reference(grads, lids, 6)
    assert_close_to(out_abs, ref_abs, ref_abs, 1e-3, "Σ|g| mixed")
    assert_close_to(out_sq, ref_sq, ref_sq, 1e-3, "Σg² mixed")


def test_grad_reductions_single_element_and_repeat_is_deterministic():
    grads = [randn(1, seed=3), randn(5000, seed=4)]
    first = layer_grad_reductions(grads, [0, 0], 1)
    second = layer_grad_reductions(grads, [0, 0], 1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref = layer_grad_reductions_reference(grads, [0, 0], 1)
    assert_close_to(first[0], ref[0], ref[0], 1e-5, "Σ|g|")


# ----------------------------------------------------------------------------- gate reduction

GATE_SHAPES = [(1, 1), (1, 37), (5, 1), (3, 7, 45), (67, 33), (2, 1, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gate_reduction(dtype, shape):
    g, u = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    out = gate_reduction(g, u)
    ref = gate_reduction_reference(g, u)
    mag = (g.float().abs() * u.float().abs()).sum(-1)
    assert_close_to(out, ref, mag, RTOL[dtype], f"⟨g,u⟩ {dtype} {shape}")


def test_gate_reduction_mixed_dtypes_and_row_strides():
    wide = randn(9, 50, seed=5)
    g = wide[:, 3:44]  # row stride 50, last dim contiguous: read in place
    u = randn(9, 41, dtype=torch.bfloat16, seed=6)
    out = gate_reduction(g, u)
    ref = gate_reduction_reference(g, u)
    assert_close_to(out, ref, (g.abs() * u.float().abs()).sum(-1), 1e-5, "strided ⟨g,u⟩")
    gt = randn(41, 9, seed=8).T  # column-major: copied to rows
    assert_close_to(gate_reduction(gt, u), gate_reduction_reference(gt, u),
                    (gt.abs() * u.float().abs()).sum(-1), 1e-5, "transposed ⟨g,u⟩")


# ----------------------------------------------------------------------------- streaming moments

MOMENT_SHAPES = [(1, 1, 1), (1, 20, None), (37, 40, 19), (5, 17, 33), (20, 3, None), (33, 1, 2)]


def _random_state(m: Moments, seed: int) -> None:
    """Non-zero (symmetric) starting state: an accumulator the kernel forgets to update stays wrong."""
    g = torch.Generator().manual_seed(seed)
    m.sum_x.copy_(torch.randn(m.d, generator=g))
    m.sq_x.copy_(torch.rand(m.d, generator=g))
    if m.xtx is not None:
        s = torch.randn(m.d, m.d, generator=g)
        m.xtx.copy_(s + s.T)
    if m.xty is not None:
        m.xty.copy_(torch.randn(m.d, m.d_y, generator=g))
    m.count = 3


def _magnitudes(m0: Moments, xs, ys):
    """Σ|terms| per element of each accumulator (prior state included)."""
    xa = torch.cat([x.reshape(-1, m0.d).float().abs() for x in xs])
    mag = {"sum_x": m0.sum_x.abs() + xa.sum(0), "sq_x": m0.sq_x.abs() + xa.square().sum(0)}
    if m0.xtx is not None:
        mag["xtx"] = m0.xtx.abs() + xa.T @ xa
    if m0.xty is not None:
        ya = torch.cat([y.reshape(-1, m0.d_y).float().abs() for y in ys])
        mag["xty"] = m0.xty.abs() + xa.T @ ya
    return mag


def _clone(m: Moments) -> Moments:
    c = Moments(m.d, m.d_y, want_xtx=m.xtx is not None)
    for name in ("sum_x", "sq_x", "xtx", "xty"):
        if getattr(m, name) is not None:
            getattr(c, name).copy_(getattr(m, name))
    c.count = m.count
    return c


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("want_xtx", [True, False], ids=["xtx", "no_xtx"])
@pytest.mark.parametrize("shape", MOMENT_SHAPES, ids=lambda s: "T{}_d{}_dy{}".format(*s))
def test_moments(dtype, want_xtx, shape):
    T, d, d_y = shape
    m = Moments(d, d_y, want_xtx=want_xtx)
    _random_state(m, seed=T + d)
    m_ref, m0 = _clone(m), _clone(m)
    # two micro-batches, the second 3-D like [batch, seq, d] activations
    xs = [randn(T, d, dtype=dtype, seed=10), randn(2, T, d, dtype=dtype, seed=11)]
    ys = ([randn(T, d_y, dtype=dtype, seed=12), randn(2, T, d_y, dtype=dtype, seed=13)] if d_y
          else [None, None])
    for x, y in zip(xs, ys):
        accumulate_moments(m, x, y)
        accumulate_moments_reference(m_ref, x, y)
    mag = _magnitudes(m0, xs, ys)
    for name in mag:
        assert_close_to(getattr(m, name), getattr(m_ref, name), mag[name], RTOL[dtype],
                        f"{name} {dtype} {shape}")
    assert m.count == m_ref.count == 3 + 3 * T
    if want_xtx:
        assert torch.equal(m.xtx, m.xtx.T), "XᵀX accumulator lost exact symmetry"


def test_moments_xty_with_mixed_input_dtypes():
    m, m_ref = Moments(21, 18), Moments(21, 18)
    x, y = randn(19, 21, dtype=torch.bfloat16, seed=20), randn(19, 18, seed=21)
    accumulate_moments(m, x, y)
    accumulate_moments_reference(m_ref, x, y)
    xa, ya = x.float().abs(), y.abs()
    assert_close_to(m.xty, m_ref.xty, xa.T @ ya, 1e-5, "xty mixed")
    assert_close_to(m.xtx, m_ref.xtx, xa.T @ xa, 1e-5, "xtx bf16")


@pytest.mark.parametrize("T,d", [(3, 20), (37, 20), (200, 33), (130, 1)], ids=lambda v: str(v))
def test_moments_column_stats_row_splits(T, d):
    """The column kernel alone: one split (in place) and several (partial sums added in split order)."""
    moments_launcher = KERNELS.moments
    grid = moments_launcher.column_stats_grid(T, d, torch.device("cpu"))
    assert (grid["splits"] > 1) == (T > grid["BLOCK_T"]), grid  # both paths are exercised
    assert (grid["splits"] - 1) * grid["rows_per_split"] < T <= grid["splits"] * grid["rows_per_split"]
    x = randn(2 * T, d, dtype=torch.bfloat16, seed=T)[::2]  # row stride 2d
    m = Moments(d, want_xtx=False)
    _random_state(m, seed=d)
    m_ref, m0 = _clone(m), _clone(m)
    moments_launcher.column_stats_update(m.sum_x, m.sq_x, x)
    accumulate_moments_reference(m_ref, x)
    mag = _magnitudes(m0, [x], [None])
    for name in ("sum_x", "sq_x"):
        assert_close_to(getattr(m, name), getattr(m_ref, name), mag[name], RTOL[torch.bfloat16], name)
    again = _clone(m0)
    moments_launcher.column_stats_update(again.sum_x, again.sq_x, x)
    assert torch.equal(again.sum_x, m.sum_x) and torch.equal(again.sq_x, m.sq_x), "not deterministic"


@pytest.mark.parametrize("promote", [0, 1, 3, 100], ids=lambda p: f"promote{p}")
def test_moments_gram_promote_chunks(promote):
    """Every chunking of the rows into fresh accumulators (0 = one) sums the same XᵀX, Σx, Σx²."""
    x = randn(77, 40, dtype=torch.bfloat16, seed=30)  # 77 rows: a partial last tile in every chunking
    c, s, q = torch.zeros(40, 40), torch.zeros(40), torch.zeros(40)
    KERNELS.moments.gram_update(c, x, None, s, q, promote=promote)
    xd = x.double()
    assert_close_to(c, xd.T @ xd, xd.abs().T @ xd.abs(), 1e-5, f"XᵀX promote={promote}")
    assert_close_to(s, xd.sum(0), xd.abs().sum(0), 1e-5, f"Σx promote={promote}")
    assert_close_to(q, xd.square().sum(0), xd.square().sum(0), 1e-5, f"Σx² promote={promote}")
    with pytest.raises(GradmapError, match="promote must be an int >= 0"):
        KERNELS.moments.gram_update(c, x, promote=-1)


# ----------------------------------------------------------------------------- launcher checks

def test_launchers_reject_bad_input():
    x = randn(4, 6)
    with pytest.raises(GradmapError, match="features"):
        accumulate_moments(Moments(5), x)
    with pytest.raises(GradmapError, match="XᵀY"):
        accumulate_moments(Moments(6, 3), x)
    with pytest.raises(GradmapError, match="tokens"):
        accumulate_moments(Moments(6, 3), x, randn(5, 3))
    with pytest.raises(GradmapError, match="dtype"):
        accumulate_moments(Moments(6), x.double())
    with pytest.raises(GradmapError, match="same shape"):
        gate_reduction(x, randn(4, 5))
    with pytest.raises(GradmapError, match="layer ids"):
        layer_grad_reductions([x], [3], 2)
    with pytest.raises(GradmapError, match="one layer id per"):
        layer_grad_reductions([x, x], [0], 2)
    with pytest.raises(GradmapError, match="fp32"):
        m = Moments(6)
        m.xtx = m.xtx.double()
        accumulate_moments(m, x)


# ----------------------------------------------------------------------------- end to end

# The kernel's fp32 XᵀX differs from torch's by summation order only (~2e-7 relative, inside
# its 1e-5 contract). A ridge of 0.05 left this site's solve with cond ≈ 140, which amplified
# that to ~4e-6 in the folded weights; at 0.5 the solve passes the kernels' accuracy through,
# so the weights can be held to the original 1e-6 bound and a wrong tile still shows.
RIDGE = 0.5


@pytest.mark.parametrize("variant", ["token_projection", "param_none"])
def test_end_to_end_fast_prune_through_kernels(variant, monkeypatch):
    """fast_prune with every Triton kernel routed in (CPU tensors, interpreter) vs forced reference."""
    from gradmap.prune.compensation import get_compensator
    from gradmap.prune.driver import fast_prune
    from tiny import random_ids, tiny_model
    used = set()
    choose = backend.choose

    def routed(op, *inputs, device=None):
        module = choose(op, *inputs, device=device)
        if module is not None:
            used.add(op)
        return module

    # CPU tensors count as GPU tensors, and fp32 goes to the kernels too (tiny models are fp32)
    monkeypatch.setattr(backend, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(backend, "KERNEL_DTYPES", (torch.float32, torch.bfloat16, torch.float16))
    monkeypatch.setattr(backend, "TORCH_DTYPES", ())
    monkeypatch.setattr(backend, "choose", routed)
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    if variant == "token_projection":
        options = dict(metric="gradmap", gradient="token",
                       compensation=get_compensator("projection", safeguards=False, ridge=RIDGE))
        expected_ops = {"gate_reduction", "accumulate_moments"}
    else:
        options = dict(metric="gradmap", gradient="param", compensation="none")
        expected_ops = {"layer_grad_reductions"}
    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("GRADMAP_FORCE_REFERENCE", forced)
        model = tiny_model("llama", n_layers=4, seed=0)
        result = fast_prune(model, random_ids(4, 12, seed=0), 1, schedule="one-shot", **options)
        runs[forced] = (result, {k: v.clone() for k, v in model.state_dict().items()})
    assert used == expected_ops
    (res_k, w_k), (res_r, w_r) = runs["0"], runs["1"]
    assert res_k.removed_layers == res_r.removed_layers
    for layer, score in res_r.scores[0].items():
        assert abs(res_k.scores[0][layer] - score) <= 1e-5 * abs(score), layer
    assert w_k.keys() == w_r.keys()
    for key in w_r:
        torch.testing.assert_close(w_k[key], w_r[key], rtol=1e-5, atol=1e-6 * float(w_r[key].abs().max()),
                                   msg=lambda m: f"{key}: {m}")


def test_end_to_end_bf16_default_pipeline_reaches_these_kernels(monkeypatch):
    """What production runs: the default `fast_prune` on a bf16 model, in strict mode, through the
    dispatch layer's recording hook. The compensators feed the MLP output M in bf16, so MᵀM
    reaches the Gram kernel; Mᵀr (r fp32) stays on torch and no bf16 XᵀY is formed (the
    XᵀY kernel has no production caller)."""
    from gradmap.ops import extension
    from gradmap.prune.driver import fast_prune
    from tiny import random_ids, tiny_model
    monkeypatch.setattr(backend, "KERNEL_DEVICE_TYPES", ("cpu",))  # CPU tensors take the kernel paths
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    model = tiny_model("llama", n_layers=5, seed=0, dtype=torch.bfloat16)
    with backend.record_kernels() as launched:
        result = fast_prune(model, random_ids(8, 12, seed=0), 1, progress=False)
    assert len(result.options["auto"]["candidates"]) == 2  # both default candidates ran
    # GradMAP's default gradient is "token" (gate_reduction); layer_grad_reductions serves gradient="param"
    expected = {"column_stats_update", "gate_reduction", "gram_update (XᵀX)"}
    if extension.extension() is not None:
        expected.add("gradmap._C.projection_solve")
    assert set(launched) == expected, sorted(set(launched))
