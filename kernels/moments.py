"""Streaming moments: in-place fp32 update of Σx, Σx² (per column), XᵀX and XᵀY.

Reference: ``gradmap.ops.accumulate_moments_reference`` (fp32 inputs to 1e-5
relative, bf16/fp16 to 1e-3 against the same inputs upcast to fp32).

Design.
- XᵀX: only the upper-triangle tiles (i ≤ j) are computed. An off-diagonal tile
  is added to C[i, j] and its transpose written to C[j, i]; a diagonal tile is
  symmetrised as (T + Tᵀ)/2 before it is added. The accumulator is therefore
  exactly symmetric after every update (no separate mirror step, callers may
  read it at any time) and each tile pair is computed once: ~half the FLOPs of
  a full XᵀX.
- Σx² is the diagonal of the diagonal tiles (free); Σx is summed by the
  diagonal-tile programs from the X tiles they already load, so X is streamed
  once for all statistics. Without XᵀX a bandwidth-bound column kernel does both.
- XᵀY uses the same tile kernel over the full (d, d_y) tile grid.
- Products of bf16/fp16 values are exact in fp32 and the dot accumulates in
  fp32; fp32 inputs use IEEE (not TF32) dots to meet the fp32 tolerance.
- Accumulation bias (issue 27's first H200 run): with one MMA accumulator over
  all T rows, XᵀX's diagonal (T positive squares) came out low by a relative
  5.9e-5 at T = 16384 and 1.28e-3 at T = 262144, linear in T: a bias, which fits
  tensor-core accumulation that does not round to nearest (a same-sign sum
  drifts); only the diagonal failed the checks. Each PROMOTE x BLOCK_K rows now go into a fresh
  accumulator that is added to the total with ordinary fp32 adds, bounding the
  drift by the chunk, not by T (PROMOTE from bench/gram_precision.py).

GPU notes (issue 18; measured on an H200 in issue 27, bench/RESULTS.md "GPU: first run"):
- Dispatch sends only bf16/fp16 here (`gradmap.ops.backend`). fp32 dots are FMA
  (input_precision="ieee", no tensor cores) and would lose to cuBLAS, so fp32
  stays on torch with TF32 off (item 6); the fp32 config below is kept for direct
  callers and the interpreter tests.
- T is not specialised (`do_not_specialize`): an odd last micro-batch (T % 16 != 0
  or T == 1) reuses the compiled kernel instead of compiling a variant (item 8).
- Every pointer offset that can pass 2³¹ is formed in int64: rows x stride_t,
  columns x stride_d (a column-major view of 128 x 2048 x 8192 elements has
  stride_d = 2³¹), the C offsets (DA·DB ≥ 2³¹) and cols x stride_d (item 9).
- `if diag` on a loaded tile index inside the K loop is a uniform per-program
  branch (scf.if); the pipeliner may keep it outside the async copies or not
  pipeline the loop, which costs speed, never correctness; `.ci/gpu` checks the
  diagonal tiles (and their `tl.trans(acc)` epilogue) at production shapes (item 5).
- Shared memory: 128x128x64 bf16 tiles x 3 stages plus the transposed epilogue
  need ~160 KiB; devices with less opt-in shared memory per block (L4, A10,
  RTX 4090: ~100 KiB; A100: 163 KiB) get 64x64x64 tiles instead of a compile
  failure and a fallback (item 5).
- Occupancy (item 7): the Gram kernel launches one program per upper-triangle
  tile (d = 576: 15 tiles at 128²) without split-K, which would need atomics
  (non-deterministic) or a second reduction pass; at d = 576 the whole update is
  ~11 GFLOP per 16k-token chunk, so it stays as is until measured. The column
  kernel (no XᵀX, bandwidth-bound) splits the rows as well as the columns, about
  eight programs per multiprocessor (issue 27: d = 4096 gave 128 programs, fewer
  than an H100/H200's 132 SMs, one 4-warp program each).
- Loaded values used as loop bounds or branch conditions: ``ti``/``tj`` (loaded
  tile coordinates) drive ``if diag`` and ``if ti != tj``. Triton 3.6's
  interpreter turns such a value into a one-element array and numpy >= 2.3
  refuses its ``__index__``/``__bool__`` (hence numpy < 2.3 in `.ci/compat`);
  compiled, they are ordinary scalar registers.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gradmap.core.errors import GradmapError

from .utils import cdiv, check_inputs, device_table, empty, interpreting, on_device, upcast_dots

__all__ = ["accumulate_moments", "gram_update", "column_stats_update", "column_stats_grid"]


@triton.jit
def _gram_step(a_ptr, b_ptr, k0, T, offs_k, offs_m64, offs_n64, m_mask, n_mask,
               stride_at, stride_ad, stride_bt, stride_bd, acc, col_sum, diag,
               STATS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[k0:k0+BLOCK_K]ᵀ B[k0:k0+BLOCK_K] (rows past T masked); Σa too on diagonal tiles."""
    rows = (k0 + offs_k).to(tl.int64)
    k_mask = rows < T
    a = tl.load(a_ptr + rows[:, None] * stride_at + offs_m64[None, :] * stride_ad,
                mask=k_mask[:, None] & m_mask[None, :], other=0.0)
    b = tl.load(b_ptr + rows[:, None] * stride_bt + offs_n64[None, :] * stride_bd,
                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    if STATS:
        if diag:
            col_sum += tl.sum(a.to(tl.float32), axis=0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(tl.trans(a), b, acc, input_precision=PRECISION), col_sum


@triton.jit(do_not_specialize=["T"])
def _tile_gram_kernel(a_ptr, b_ptr, c_ptr, sum_ptr, sq_ptr, tile_i_ptr, tile_j_ptr,
                      T, DA, DB, stride_at, stride_ad, stride_bt, stride_bd, stride_cm, stride_cn,
                      SYMMETRIC: tl.constexpr, STATS: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, PROMOTE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    ti = tl.load(tile_i_ptr + pid)
    tj = tl.load(tile_j_ptr + pid)
    offs_m = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m64 = offs_m.to(tl.int64)  # int64 before any stride product: offsets may pass 2³¹
    offs_n64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < DA
    n_mask = offs_n < DB
    diag = ti == tj
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROMOTE == 0:
        # one accumulator over all T rows: fp32 IEEE dots (FMA, round-to-nearest), and the bias
        # measurement for bf16/fp16 (bench/gram_precision.py)
        for k0 in range(0, T, BLOCK_K):
            acc, col_sum = _gram_step(a_ptr, b_ptr, k0, T, offs_k, offs_m64, offs_n64, m_mask, n_mask,
                                      stride_at, stride_ad, stride_bt, stride_bd, acc, col_sum, diag,
                                      STATS, UPCAST, PRECISION)
    else:
        # a fresh tensor-core accumulator per PROMOTE x BLOCK_K rows, added to `acc` with
        # round-to-nearest fp32 adds: Hopper's MMA accumulation is biased (see Design)
        for c0 in range(0, T, BLOCK_K * PROMOTE):
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(c0, c0 + BLOCK_K * PROMOTE, BLOCK_K):
                part, col_sum = _gram_step(a_ptr, b_ptr, k0, T, offs_k, offs_m64, offs_n64, m_mask, n_mask,
                                           stride_at, stride_ad, stride_bt, stride_bd, part, col_sum, diag,
                                           STATS, UPCAST, PRECISION)
            acc += part
    c_mask = m_mask[:, None] & n_mask[None, :]
    c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
    if SYMMETRIC:
        if diag:
            acc = (acc + tl.trans(acc)) * 0.5
    c = tl.load(c_ptrs, mask=c_mask, other=0.0) + acc
    tl.store(c_ptrs, c, mask=c_mask)
    if SYMMETRIC:
        if ti != tj:
            # mirror: element (n, m) of C receives c[m, n]
            tl.store(c_ptr + offs_n64[None, :] * stride_cm + offs_m64[:, None] * stride_cn, c, mask=c_mask)
    if STATS:
        if diag:
            eye = offs_m[:, None] == offs_n[None, :]
            sq = tl.sum(tl.where(eye, acc, 0.0), axis=1)
            old_sum = tl.load(sum_ptr + offs_m, mask=m_mask, other=0.0)
            old_sq = tl.load(sq_ptr + offs_m, mask=m_mask, other=0.0)
            tl.store(sum_ptr + offs_m, old_sum + col_sum, mask=m_mask)
            tl.store(sq_ptr + offs_m, old_sq + sq, mask=m_mask)


@triton.jit(do_not_specialize=["T", "rows_per_split"])
def _column_stats_kernel(x_ptr, sum_ptr, sq_ptr, T, D, stride_t, stride_d, rows_per_split, stride_out,
                         ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (column block, row split): Σx and Σx² of its rows, added in place (ACCUMULATE, one
    # split) or written to row `split` of the [splits, D] partial sums (each element once)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    c_mask = cols < D
    cols64 = cols.to(tl.int64)
    start = split.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, T)
    offs_t = tl.arange(0, BLOCK_T)
    acc_sum = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, rows_per_split, BLOCK_T):
        rows = start + t0 + offs_t
        x = tl.load(x_ptr + rows[:, None] * stride_t + cols64[None, :] * stride_d,
                    mask=(rows < end)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc_sum += x
        acc_sq += x * x
    s = tl.sum(acc_sum, axis=0)
    q = tl.sum(acc_sq, axis=0)
    out = split.to(tl.int64) * stride_out + cols64
    if ACCUMULATE:
        s += tl.load(sum_ptr + out, mask=c_mask, other=0.0)
        q += tl.load(sq_ptr + out, mask=c_mask, other=0.0)
    tl.store(sum_ptr + out, s, mask=c_mask)
    tl.store(sq_ptr + out, q, mask=c_mask)


BIG_TILE_SMEM = 200 * 1024  # opt-in shared memory per block the 128x128x64 x 3-stage bf16 tiles need


@functools.lru_cache(maxsize=16)
def _shared_memory(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 0)


def _gram_config(dtype: torch.dtype, device: torch.device) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, PROMOTE=2, num_warps=1)  # T > 32 crosses a chunk
    if dtype == torch.float32:
        # IEEE fp32 dots run on CUDA cores: smaller tiles keep the accumulator in registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, PROMOTE=0, num_warps=4, num_stages=3)
    if _shared_memory(device) < BIG_TILE_SMEM:  # L4, A10, RTX 4090, A100: ~64 KiB config
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PROMOTE=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, PROMOTE=8, num_warps=8, num_stages=3)


def _tiles(n_i: int, n_j: int, upper: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile coordinates, row-major; only j >= i when `upper` (cached per device)."""
    pairs = [(i, j) for i in range(n_i) for j in range(i if upper else 0, n_j)]
    return (device_table(tuple(p[0] for p in pairs), torch.int32, device),
            device_table(tuple(p[1] for p in pairs), torch.int32, device))


def _check_acc(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape or t.device != device:
        raise GradmapError(f"accumulate_moments: accumulator {name} must be fp32 {shape} on {device}, got "
                           f"{t.dtype} {tuple(t.shape)} on {t.device}; build it with gradmap.ops.Moments")


def gram_update(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None,
                sum_a: torch.Tensor | None = None, sq_a: torch.Tensor | None = None,
                promote: int | None = None) -> None:
    """C += AᵀB in place (fp32); with b=None, C += AᵀA keeping C symmetric.

    With b=None, `sum_a`/`sq_a` (both or neither) also receive Σa and Σa² per
    column. a [T, DA], b [T, DB], c fp32 [DA, DB]. `promote`: rows per fresh accumulator, in
    units of the tile's BLOCK_K (0 = one accumulator over all T rows; None = the tuned default, see
    Design); for measuring the accumulation bias (bench/gram_precision.py).
    """
    device = check_inputs("gram_update", a=a, b=b)
    if a.dim() != 2 or (b is not None and (b.dim() != 2 or b.shape[0] != a.shape[0])):
        raise GradmapError(f"gram_update: need a [T, d] and b [T, d_b] with the same T, got "
                           f"{tuple(a.shape)} and {None if b is None else tuple(b.shape)}")
    symmetric = b is None
    b_ = a if symmetric else b
    T, DA, DB = a.shape[0], a.shape[1], b_.shape[1]
    _check_acc("C", c, (DA, DB), device)
    stats = sum_a is not None
    if stats != (sq_a is not None) or (stats and not symmetric):
        raise GradmapError("gram_update: pass both sum_a and sq_a, and only for the symmetric AᵀA update")
    if stats:
        _check_acc("sum_x", sum_a, (DA,), device)
        _check_acc("sq_x", sq_a, (DA,), device)
    if T == 0 or DA == 0 or DB == 0:
        return
    if a.dtype != b_.dtype:
        raise GradmapError(f"gram_update: a is {a.dtype} but b is {b_.dtype}; cast one so both match")
    if promote is not None and (not isinstance(promote, int) or promote < 0):
        raise GradmapError(f"gram_update: promote must be an int >= 0 (0 = one accumulator), got {promote!r}")
    cfg = _gram_config(a.dtype, device)
    if promote is not None:
        cfg["PROMOTE"] = promote
    n_i, n_j = cdiv(DA, cfg["BLOCK_M"]), cdiv(DB, cfg["BLOCK_N"])
    ti, tj = _tiles(n_i, n_j, symmetric, device)
    dummy = c  # never touched when STATS is False
    with on_device(device):
        _tile_gram_kernel[(ti.numel(),)](
            a, b_, c, sum_a if stats else dummy, sq_a if stats else dummy, ti, tj,
            T, DA, DB, a.stride(0), a.stride(1), b_.stride(0), b_.stride(1), c.stride(0), c.stride(1),
            SYMMETRIC=symmetric, STATS=stats, UPCAST=upcast_dots(a.dtype),
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def column_stats_grid(T: int, D: int, device: torch.device) -> dict:
    """Launch geometry of `column_stats_update`: column blocks x row splits, about eight programs
    per multiprocessor (d = 4096 alone gives only 64 column blocks for 132 SMs), each split a
    multiple of BLOCK_T rows; the interpreter counts one multiprocessor."""
    if interpreting():
        block_t, block_d, warps, sms = 16, 16, 1, 1
    else:
        block_t, block_d, warps, sms = 32, 64, 4, _multiprocessors(device)
    col_blocks = cdiv(D, block_d)
    wanted = cdiv(8 * sms, col_blocks)
    rows = cdiv(cdiv(T, wanted), block_t) * block_t
    return dict(col_blocks=col_blocks, splits=cdiv(T, rows), rows_per_split=rows, multiprocessors=sms,
                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)


def column_stats_update(sum_x: torch.Tensor, sq_x: torch.Tensor, x: torch.Tensor) -> None:
    """Σx and Σx² per column of x [T, d], added in place to fp32 sum_x and sq_x [d].

    Row splits (see `column_stats_grid`) write fp32 partial sums, added in split order: the
    result does not depend on scheduling.
    """
    device = check_inputs("column_stats_update", x=x)
    if x.dim() != 2:
        raise GradmapError(f"column_stats_update: x must be [T, d], got {tuple(x.shape)}")
    _check_acc("sum_x", sum_x, (x.shape[1],), device)
    _check_acc("sq_x", sq_x, (x.shape[1],), device)
    T, D = x.shape
    if T == 0 or D == 0:
        return
    g = column_stats_grid(T, D, device)
    split = g["splits"] > 1
    psum, psq = (empty((g["splits"], D), device), empty((g["splits"], D), device)) if split else (sum_x, sq_x)
    with on_device(device):
        _column_stats_kernel[(g["col_blocks"], g["splits"])](
            x, psum, psq, T, D, x.stride(0), x.stride(1), g["rows_per_split"], psum.stride(0) if split else 0,
            ACCUMULATE=not split, BLOCK_T=g["BLOCK_T"], BLOCK_D=g["BLOCK_D"], num_warps=g["num_warps"])
    if split:
        sum_x += psum.sum(0)
        sq_x += psq.sum(0)


def accumulate_moments(m, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Update `gradmap.ops.Moments` m in place with x [..., d] (and y [..., d_y]); fp32 accumulation.

    Every part through the kernels, whatever the dtypes (tests and benchmarks; `gradmap.ops`
    dispatches part by part). m.count is updated last.
    """
    check_inputs("accumulate_moments", x=x, y=y)
    if x.shape[-1] != m.d:
        raise GradmapError(f"accumulate_moments: x has {x.shape[-1]} features but the moments track "
                           f"d={m.d}; pass the activations these moments were built for")
    x2 = x.reshape(-1, m.d)
    y2 = None
    if m.xty is not None:
        if y is None:
            raise GradmapError("these moments track XᵀY; pass y with the same tokens as x")
        if y.shape[-1] != m.d_y or y.numel() // max(m.d_y, 1) != x2.shape[0]:
            raise GradmapError(f"accumulate_moments: y {tuple(y.shape)} must hold {x2.shape[0]} tokens of "
                               f"d_y={m.d_y} features, like x")
        y2 = y.reshape(-1, m.d_y)
    if m.xtx is not None:
        gram_update(m.xtx, x2, None, m.sum_x, m.sq_x)
    else:
        column_stats_update(m.sum_x, m.sq_x, x2)
    if y2 is not None:
        if y2.dtype != x2.dtype:
            # mixed input dtypes: fp32 holds every bf16/fp16 value exactly
            gram_update(m.xty, x2.float(), y2.float())
        else:
            gram_update(m.xty, x2, y2)
    m.count += x2.shape[0]
