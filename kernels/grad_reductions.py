"""Per-layer Σ|g| and Σg² (fp32) over many gradient tensors, multi-tensor style.

Reference: ``gradmap.ops.layer_grad_reductions_reference`` (this must equal it:
fp32 inputs to 1e-5 relative, bf16/fp16 inputs to 1e-3 against the same inputs
upcast to fp32).

Design. Every gradient is cut into chunks of ``BLOCK * ITERS`` elements. A table
lists, per chunk, its tensor (offset, length) and its output slot; one launch
per *dtype group* (tensors of one dtype and one alignment class) reads all
chunks of that group, so no tensor is cast or copied.

Addressing (issue 18 items 4 and 5). The group's first tensor is passed as a real
pointer argument (`base_ptr`, so Triton knows its dtype and, for an aligned
group, its 16-byte alignment from the usual argument specialisation); every
tensor's address is stored as its distance from that base in units of VEC
elements (VEC = 16 bytes / element size for aligned groups, else 1) and
multiplied back by the constexpr VEC in the kernel, so the compiler derives the
alignment itself: no integer-to-pointer cast and no `multiple_of` on a loaded
value. The host checks the table before any launch (`_check_table`): every
tensor is contiguous, on the launch device, of the group's dtype, alive for the
launch, and its offset converts exactly; an address error would otherwise be an
illegal-address fault that kills the CUDA context (no fallback possible).
`.ci/gpu` also runs this kernel under compute-sanitizer memcheck.

Loaded values used as loop bounds or branch conditions (the Triton 3.6
interpreter needs numpy < 2.3 for them; compiled they are scalar registers):
``if start + BLOCK * ITERS <= n`` (n loaded) and the segment loop
``for s in range(lo, hi, BLOCK)`` (lo, hi loaded). Each chunk writes its two fp32 partial sums to its own
slot. Slots are numbered in (layer, tensor, chunk) order, so each layer owns a
contiguous slot range; a second tiny kernel sums each range in a fixed order.
No atomics: results are deterministic run to run. A whole 32-layer 8B model
(~7e9 elements, ~230 tensors) needs two launches per dtype present plus one.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gradmap.core.errors import GradmapError

from .utils import cdiv, check_inputs, empty, interpreting, on_device

__all__ = ["layer_grad_reductions"]


@triton.jit
def _chunk_partials_kernel(base_ptr, offset_ptr, numel_ptr, chunk_tensor_ptr, chunk_index_ptr, chunk_slot_ptr,
                           part_abs_ptr, part_sq_ptr,
                           VEC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    # distance from base_ptr in VEC-element units: the product is a multiple of VEC by construction
    base = base_ptr + tl.load(offset_ptr + t).to(tl.int64) * VEC
    n = tl.load(numel_ptr + t)
    start = tl.load(chunk_index_ptr + c).to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    if start + BLOCK * ITERS <= n:
        # full chunk: unmasked loads so they can be vectorised
        for i in range(ITERS):
            x = tl.load(base + (start + i * BLOCK) + offs).to(tl.float32)
            acc_abs += tl.abs(x)
            acc_sq += x * x
    else:
        for i in range(ITERS):
            idx = start + i * BLOCK + offs
            x = tl.load(base + idx, mask=idx < n, other=0.0).to(tl.float32)
            acc_abs += tl.abs(x)
            acc_sq += x * x
    slot = tl.load(chunk_slot_ptr + c)
    tl.store(part_abs_ptr + slot, tl.sum(acc_abs, axis=0))
    tl.store(part_sq_ptr + slot, tl.sum(acc_sq, axis=0))


@triton.jit
def _segment_sum_kernel(part_abs_ptr, part_sq_ptr, seg_start_ptr, out_abs_ptr, out_sq_ptr,
                        BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    lo = tl.load(seg_start_ptr + layer)
    hi = tl.load(seg_start_ptr + layer + 1)
    offs = tl.arange(0, BLOCK)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        idx = s + offs
        m = idx < hi
        acc_abs += tl.load(part_abs_ptr + idx, mask=m, other=0.0)
        acc_sq += tl.load(part_sq_ptr + idx, mask=m, other=0.0)
    tl.store(out_abs_ptr + layer, tl.sum(acc_abs, axis=0))
    tl.store(out_sq_ptr + layer, tl.sum(acc_sq, axis=0))


def _default_block() -> tuple[int, int]:
    # GPU: 4 warps x 32 threads x 8 elements per BLOCK, 32 blocks per chunk (64 KiB of bf16)
    return (256, 4) if interpreting() else (1024, 32)


@functools.lru_cache(maxsize=4)
def _plan(signature: tuple, n_layers: int, chunk: int, device: str):
    """Chunk tables for tensors described by (addr, numel, dtype, layer, itemsize) tuples, cached.

    Returns ([(group tensor indices, vec, n_chunks, tables)], n_slots, seg_start).
    """
    order = sorted(range(len(signature)), key=lambda i: signature[i][3])  # stable: layer, then input order
    groups: dict[tuple, dict[str, list]] = {}
    seg_counts = [0] * n_layers
    slot = 0
    for i in order:
        addr, numel, dtype, layer, itemsize = signature[i]
        aligned = addr % 16 == 0 and itemsize <= 16
        group = groups.setdefault((dtype, aligned), {"index": [], "numel": [], "k": [], "base": [],
                                                     "vec": 16 // itemsize if aligned else 1})
        k = cdiv(numel, chunk)
        group["index"].append(i)
        group["numel"].append(numel)
        group["k"].append(k)
        group["base"].append(slot)
        slot += k
        seg_counts[layer] += k
    launches = []
    for g in groups.values():
        base_addr, itemsize, vec = signature[g["index"][0]][0], signature[g["index"][0]][4], g["vec"]
        offsets = []
        for i in g["index"]:
            delta = signature[i][0] - base_addr
            if delta % (itemsize * vec):  # never: same-dtype tensors are itemsize-aligned
                raise RuntimeError(f"layer_grad_reductions: tensor {i} is not {itemsize * vec}-byte aligned "
                                   "relative to its group")
            offsets.append(delta // (itemsize * vec))
        k = torch.tensor(g["k"], dtype=torch.int64)
        first = torch.cumsum(k, 0) - k
        chunk_tensor = torch.repeat_interleave(torch.arange(len(k), dtype=torch.int32), k)
        within = torch.arange(int(k.sum())) - torch.repeat_interleave(first, k)
        chunk_slot = torch.repeat_interleave(torch.tensor(g["base"], dtype=torch.int64), k) + within
        tables = [torch.tensor(offsets, dtype=torch.int64), torch.tensor(g["numel"], dtype=torch.int64),
                  chunk_tensor, within.to(torch.int32), chunk_slot.to(torch.int32)]
        launches.append((tuple(g["index"]), vec, int(k.sum()), [x.to(device) for x in tables]))
    seg_start = torch.zeros(n_layers + 1, dtype=torch.int64)
    seg_start[1:] = torch.cumsum(torch.tensor(seg_counts, dtype=torch.int64), 0)
    return launches, slot, seg_start.to(device)


def _check_table(flat: list[torch.Tensor], device: torch.device) -> None:
    """The invariants the raw-offset kernel relies on, checked on the host before any launch."""
    for i, g in enumerate(flat):
        if not g.is_contiguous() or g.device != device:
            raise RuntimeError(f"layer_grad_reductions: tensor {i} is not contiguous on {device}")
        if g.data_ptr() % g.element_size():
            raise RuntimeError(f"layer_grad_reductions: tensor {i} is not aligned to its element size")


def layer_grad_reductions(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int,
                          block: int | None = None, iters: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (Σ|g|, Σg²) in fp32 for `grads[i]` owned by layer `layer_ids[i]`.

    Returns two fp32 tensors of shape [n_layers] on the gradients' device
    (zeros for layers that own no elements). `block`/`iters` override the
    chunk geometry (tests use small ones to exercise chunk boundaries).
    """
    if len(grads) != len(layer_ids):
        raise GradmapError(f"layer_grad_reductions: {len(grads)} gradients but {len(layer_ids)} layer ids; "
                           "pass one layer id per gradient tensor")
    if n_layers < 1:
        raise GradmapError(f"layer_grad_reductions: n_layers must be >= 1, got {n_layers}")
    bad = [lid for lid in layer_ids if not 0 <= int(lid) < n_layers]
    if bad:
        raise GradmapError(f"layer_grad_reductions: layer ids {bad[:5]} are outside [0, {n_layers}); "
                           "number layers by their current position")
    device = check_inputs("layer_grad_reductions", **{f"grads[{i}]": g for i, g in enumerate(grads)})
    d_block, d_iters = _default_block()
    block, iters = block or d_block, iters or d_iters
    if block & (block - 1):
        raise GradmapError(f"layer_grad_reductions: block must be a power of two, got {block}")
    # contiguous copies (rare: grads are contiguous) must outlive the launches
    flat = [g if g.is_contiguous() else g.contiguous() for g in grads]
    keep = [i for i, g in enumerate(flat) if g.numel() > 0]
    flat = [flat[i] for i in keep]
    _check_table(flat, device)
    signature = tuple((g.data_ptr(), g.numel(), g.dtype, int(layer_ids[i]), g.element_size())
                      for g, i in zip(flat, keep))
    launches, n_slots, seg_start = _plan(signature, n_layers, block * iters, str(device))
    part_abs = empty((max(n_slots, 1),), device)
    part_sq = empty((max(n_slots, 1),), device)
    out_abs = empty((n_layers,), device)
    out_sq = empty((n_layers,), device)
    with on_device(device):
        for index, vec, n_chunks, tables in launches:
            _chunk_partials_kernel[(n_chunks,)](flat[index[0]], *tables, part_abs, part_sq, VEC=vec,
                                                BLOCK=block, ITERS=iters, num_warps=4)
        _segment_sum_kernel[(n_layers,)](part_abs, part_sq, seg_start, out_abs, out_sq,
                                         BLOCK=256 if interpreting() else 1024)
    del flat
    return out_abs, out_sq
