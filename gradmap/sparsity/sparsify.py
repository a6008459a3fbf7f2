"""Unstructured pruning of every linear layer in the decoder blocks, with layer-wise allocation.

Inside a layer (Wanda: Sun et al., 2023, arXiv:2306.11695): each weight gets a score and the
lowest-scoring weights of each OUTPUT ROW are zeroed,

    wanda:      A_ij = |W_ij| · ‖X_j‖₂      (X_j: j-th input feature over all calibration tokens)
    magnitude:  A_ij = |W_ij|

A layer at sparsity s zeroes k = round(s · rows · cols) weights: ⌊k / rows⌋ per row, one more in
the first k mod rows rows, so layer and overall sparsities hit their targets to one weight.
Embeddings and the LM head are never pruned.

Across blocks (`allocation`):
    uniform  every block at S.
    owl      Yin et al., 2024: outlier ratios D_ℓ of the DENSE model (one dense pass), mapped to a
             2λ-wide band with mean exactly S (`gradmap.sparsity.owl`), then sequential pruning.
    mrp      a reconstruction (see `gradmap.sparsity.mrp`): sequential pruning at S − Δ, then a loop that
             raises the most redundant block by δ until the overall sparsity is S.

Sequential calibration (`gradmap.runtime.sequential`): block ℓ's activation norms are measured on inputs
produced by the already-pruned blocks 0..ℓ-1, one block's inputs in memory at a time.
Design choice for MRP: the loop runs WITHOUT new forwards, on the per-block norms stored during
the sequential pass at S − Δ; raising a block re-scores only that block (|W|·norm of its current
weights: pruned weights score 0, so masks only grow). Block ℓ's norms therefore come from
predecessors pruned at S − Δ, not at their final sparsity.

Options (keyword `**options` of `sparsify`), with defaults:
    outlier_m=5.0    M, outlier threshold (OWL and MRP)
    owl_lambda=0.08  λ, OWL band half-width
    mrp_delta=0.1    Δ, MRP start is S − Δ
    mrp_step=0.01    δ, MRP step
    mrp_cap=0.2      cap, MRP keeps every block within [S − cap, S + cap] (clipped to [0, 1])
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.sparsity.mrp import DEFAULT_CAP, DEFAULT_DELTA, DEFAULT_STEP, mrp_allocate
from gradmap.ops import Moments, accumulate_moments
from gradmap.sparsity.owl import DEFAULT_LAMBDA, DEFAULT_M, outlier_ratio, owl_allocation
from gradmap.runtime import placement
from gradmap.runtime.memory import limit_heap_fragmentation
from gradmap.runtime.sequential import Block, check_calibration, sequential_blocks

__all__ = ["sparsify", "SparsifyResult", "ALLOCATIONS", "SCORES", "OPTION_DEFAULTS", "wanda_scores",
           "magnitude_scores", "prune_rows_", "activation_norms", "check_options"]

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "mrp")
SCORES = ("wanda", "magnitude")
OPTION_DEFAULTS: dict[str, float] = {"outlier_m": DEFAULT_M, "owl_lambda": DEFAULT_LAMBDA,
                                     "mrp_delta": DEFAULT_DELTA, "mrp_step": DEFAULT_STEP,
                                     "mrp_cap": DEFAULT_CAP}


@dataclass
class SparsifyResult:
    """What `sparsify` did. Block lists are indexed by current position; `layer_ids` maps to ORIGINAL ids."""

    allocation: str
    score: str
    target_sparsity: float
    overall_sparsity: float = 0.0            # zeros / weights over all pruned linear layers
    model_sparsity: float = 0.0              # zeros / all parameters (embeddings and norms included)
    layer_ids: list[int] = field(default_factory=list)
    block_targets: list[float] = field(default_factory=list)    # allocated sparsity per block
    block_sparsity: list[float] = field(default_factory=list)   # achieved sparsity per block
    block_params: list[int] = field(default_factory=list)       # prunable weights per block
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # "layers.<orig>.<module>" -> achieved
    outlier_ratios: list[float] | None = None     # OWL: D of the dense model; MRP: D at the end
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # MRP steps (gradmap.sparsity.mrp.MRPStep)
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Wanda score |W_ij| · ‖X_j‖₂ (fp32); `norm`: per-input-column L2 norm over calibration tokens."""
    return weight.detach().float().abs() * norm.to(weight.device, torch.float32)[None, :]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score |W_ij| (fp32)."""
    return weight.detach().float().abs()


@torch.no_grad()
def prune_rows_(weight: torch.Tensor, scores: torch.Tensor, k: int) -> int:
    """Zero the k lowest-scoring entries of `weight`, compared within each output row; return its zeros.

    Row r ends with ⌊k/rows⌋ + (r < k mod rows) zeros. Entries that are already zero count
    towards that and are never revived, so re-pruning a pruned layer to a higher k (its zeros
    score 0, the lowest) only looks at the few entries it adds: a top-k of size Δk per row.
    """
    rows, cols = scores.shape
    base, extra = divmod(int(k), rows)
    want = torch.full((rows,), base, dtype=torch.long, device=weight.device)
    want[:extra] += 1
    zero = weight == 0
    need = (want - zero.sum(1)).clamp_(min=0)
    n_new = int(need.max())
    if n_new > 0:
        live = scores.to(weight.device).masked_fill(zero, float("inf"))
        idx = live.topk(n_new, dim=1, largest=False, sorted=True).indices
        take = torch.arange(n_new, device=weight.device)[None, :] < need[:, None]
        weight.masked_fill_(torch.zeros_like(zero).scatter_(1, idx, take), 0)
    return int(zero.sum()) + int(need.sum())


@torch.no_grad()
def activation_norms(block: Block, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every linear layer's input over the block's calibration tokens (one block forward).

    Streams Σx² per column through `gradmap.ops.accumulate_moments` (fp32, no XᵀX).
    Distributed: Σx² is summed over ranks (one collective per block) before the square root.
    """
    moments: dict[str, Moments] = {}

    def hook(name: str):
        def pre(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            if name not in moments:
                moments[name] = Moments(d=module.in_features, device=x.device, want_xtx=False)
            accumulate_moments(moments[name], x.reshape(-1, module.in_features))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        block.forward()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if n not in moments]
    if missing:
        raise GradmapError(f"linear layers {missing} of block {block.original_id} never ran during the "
                           "calibration forward; sparsify supports only layers the block always uses")
    distributed.all_reduce_moments_([moments[n] for n in linears])
    return {n: m.sq_x.sqrt() for n, m in moments.items()}


def _scores(lin: nn.Linear, score: str, norm: torch.Tensor | None) -> torch.Tensor:
    return wanda_scores(lin.weight, norm) if score == "wanda" else magnitude_scores(lin.weight)


def _prune_block(linears: dict[str, nn.Linear], sparsity: float, score: str,
                 norms: dict[str, torch.Tensor] | None) -> int:
    """Prune every linear of a block to `sparsity`; return the block's zero count."""
    zeros = 0
    for name, lin in linears.items():
        w = lin.weight
        scores = _scores(lin, score, norms[name] if norms else None)
        zeros += prune_rows_(w, scores, round(sparsity * w.numel()))
    return zeros


def _redundancy(linears: dict[str, nn.Linear], norms: dict[str, torch.Tensor], m: float) -> float:
    """MRP redundancy R = 1 − D over the block's remaining non-zero Wanda scores."""
    return 1.0 - outlier_ratio([wanda_scores(l.weight, norms[n]) for n, l in linears.items()], m,
                               nonzero_only=True)


def check_options(sparsity: Any, allocation: Any, score: Any, batch_size: Any = 8,
                  options: dict[str, Any] | None = None) -> dict[str, float]:
    """Validate everything that does not need the model; return the options with defaults filled in."""
    options = options or {}
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise GradmapError(f"sparsity must be a number strictly between 0 and 1 (fraction of weights "
                           f"zeroed), got {sparsity!r}; e.g. sparsity=0.5")
    if allocation not in ALLOCATIONS:
        raise GradmapError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if score not in SCORES:
        raise GradmapError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer, got {batch_size!r}")
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise GradmapError(f"unknown option(s) {unknown}; valid options: {', '.join(OPTION_DEFAULTS)}")
    opts = {**OPTION_DEFAULTS, **options}
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GradmapError(f"option {key} must be a number, got {value!r}")
    for key, ok, rule in (("outlier_m", opts["outlier_m"] > 0, "> 0"),
                          ("owl_lambda", 0 <= opts["owl_lambda"] <= 0.5, "in [0, 0.5]"),
                          ("mrp_delta", 0 <= opts["mrp_delta"] < 1, "in [0, 1)"),
                          ("mrp_step", 0 < opts["mrp_step"] <= 1, "in (0, 1]"),
                          ("mrp_cap", 0 <= opts["mrp_cap"] <= 1, "in [0, 1]")):
        if not ok:
            raise GradmapError(f"option {key}={opts[key]!r} must be {rule}")
    if allocation == "mrp" and opts["mrp_delta"] > opts["mrp_cap"]:
        raise GradmapError(
            f"mrp_delta={opts['mrp_delta']} starts every block at S - delta = "
            f"{sparsity - opts['mrp_delta']:.4f}, "
            f"below the lower cap S - mrp_cap = {sparsity - opts['mrp_cap']:.4f}: no allocation within the "
            "caps starts there; make mrp_delta <= mrp_cap (or raise mrp_cap)")
    return opts


def _validate(model: nn.Module, calib: Any, sparsity: Any, allocation: Any, score: Any,
              batch_size: Any, options: dict[str, Any]) -> dict[str, float]:
    get_adapter(model)  # raises UnsupportedModelError naming the supported families
    opts = check_options(sparsity, allocation, score, batch_size, options)
    placement.check_weights_editable(model, "sparsify")  # device_map: offloaded weights cannot be edited
    if score == "wanda" or allocation != "uniform":
        if calib is None:
            raise GradmapError(f"score={score!r} with allocation={allocation!r} needs calibration data; "
                               "pass calib=gradmap.core.calibration.calibration_data(tokenizer, ...)")
        check_calibration(calib, getattr(model.config, "vocab_size", None))
    return opts


def sparsify(model: nn.Module, calib: torch.Tensor | None, sparsity: float = 0.7,
             allocation: str = "mrp", score: str = "wanda", *, batch_size: int = 8,
             progress: bool = True, offload: str | None = None,
             compute_device: str | torch.device | None = None, **options: float) -> SparsifyResult:
    """Zero a fraction `sparsity` of the decoder blocks' linear weights in place (Wanda-style).

    `calib`: LongTensor [n_samples, seq_len] of token ids (may be None only for uniform +
    magnitude). `allocation` in {"uniform", "owl", "mrp"}, `score` in {"wanda", "magnitude"};
    `options` and the algorithms are described in the module docstring. The parameter-weighted
    overall sparsity over the pruned layers equals `sparsity` up to rounding (< 0.1%). On bad
    input a GradmapError is raised before the model is changed.

    Data-parallel under `torchrun`: pass the same GLOBAL `calib` on every rank; each rank runs
    its contiguous share of the rows and the activation statistics are summed over ranks, so
    every rank prunes the same weights.

    `offload="layer"` (`gradmap.runtime.placement`): the weights stay on the host; each block is
    copied to `compute_device` (default CUDA when available), its norms measured and its
    weights pruned there, and the pruned weights are written back to the host weights.
    """
    if offload not in placement.OFFLOAD_MODES:
        raise GradmapError(f"offload={offload!r} is not valid; choose one of {placement.OFFLOAD_MODES}")
    opts = _validate(model, calib, sparsity, allocation, score, batch_size, options)
    limit_heap_fragmentation()
    with placement.layer_offload(model, compute_device) if offload else nullcontext():
        return _sparsify(model, calib, sparsity, allocation, score, batch_size, progress, opts)


def _on_block(model: nn.Module, position: int, write_back: bool = True):
    """Under layer streaming: block `position` on the compute device (edits written back); else nothing."""
    offload = placement.offload_of(model)
    if offload is None:
        return nullcontext()
    return placement.on_device([get_adapter(model).layers[position]], offload.compute_device, write_back)


def _sparsify(model: nn.Module, calib: torch.Tensor | None, sparsity: float, allocation: str, score: str,
              batch_size: int, progress: bool, opts: dict[str, float]) -> SparsifyResult:
    progress = progress and distributed.is_main()
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    n = adapter.num_layers
    blocks = [adapter.linear_modules(p) for p in range(n)]
    n_params = [sum(l.weight.numel() for l in b.values()) for b in blocks]
    result = SparsifyResult(allocation=allocation, score=score, target_sparsity=float(sparsity),
                            layer_ids=adapter.original_ids, block_params=n_params,
                            options={**opts, "batch_size": batch_size,
                                     "calibration_shape": list(calib.shape) if calib is not None else None})
    if calib is not None:
        calib = distributed.shard_rows(calib)  # the only place rows are split: every pass is full-set
    timings = {"allocation_pass": 0.0, "pruning_pass": 0.0, "mrp_loop": 0.0}

    t = time.perf_counter()
    if allocation == "owl":
        ratios = []
        for block in sequential_blocks(model, calib, batch_size, progress, desc="OWL outlier ratios"):
            norms = activation_norms(block, blocks[block.position])
            ratios.append(outlier_ratio([wanda_scores(l.weight, norms[k])
                                         for k, l in blocks[block.position].items()], opts["outlier_m"]))
        targets = owl_allocation(ratios, sparsity, opts["owl_lambda"])  # raises before any change
        result.outlier_ratios = ratios
    elif allocation == "mrp":
        targets = [max(sparsity - opts["mrp_delta"], 0.0)] * n
    else:
        targets = [float(sparsity)] * n
    timings["allocation_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    zeros = [0] * n
    stored_norms: list[dict[str, torch.Tensor] | None] = [None] * n
    if score == "wanda" or allocation == "mrp":
        for block in sequential_blocks(model, calib, batch_size, progress, desc=f"{score} pruning"):
            p = block.position
            norms = activation_norms(block, blocks[p])
            zeros[p] = _prune_block(blocks[p], targets[p], score, norms)
            if allocation == "mrp":
                stored_norms[p] = norms
    else:  # magnitude needs no activations
        for p in range(n):
            with _on_block(model, p):
                zeros[p] = _prune_block(blocks[p], targets[p], score, None)
    timings["pruning_pass"] = time.perf_counter() - t

    if allocation == "mrp":
        t = time.perf_counter()
        m = opts["outlier_m"]

        def prune_block(p: int, s: float) -> int:
            with _on_block(model, p):
                return _prune_block(blocks[p], s, score, stored_norms[p])

        def redundancy(p: int) -> float:
            with _on_block(model, p, write_back=False):
                return _redundancy(blocks[p], stored_norms[p], m)
        targets, steps = mrp_allocate(
            n_params, zeros, targets, sparsity,
            prune_block=prune_block, redundancy=redundancy,
            step=opts["mrp_step"], cap=opts["mrp_cap"], slack=max(len(b) for b in blocks))
        result.trajectory = [s.to_dict() for s in steps]
        result.outlier_ratios = [1.0 - _redundancy(blocks[p], stored_norms[p], m) for p in range(n)]
        timings["mrp_loop"] = time.perf_counter() - t

    _fill_achieved(result, model, blocks, targets)
    timings["total"] = time.perf_counter() - t_start
    result.timings = timings
    log.info("sparsify %s/%s: overall sparsity %.5f (target %.5f) in %.1fs", allocation, score,
             result.overall_sparsity, sparsity, timings["total"])
    return result


def _fill_achieved(result: SparsifyResult, model: nn.Module, blocks: list[dict[str, nn.Linear]],
                   targets: list[float]) -> None:
    result.block_targets = [float(s) for s in targets]
    zero_total = 0
    for orig, linears in zip(result.layer_ids, blocks):
        block_zeros = 0
        for name, lin in linears.items():
            z = int((lin.weight == 0).sum())
            block_zeros += z
            result.layer_sparsity[f"layers.{orig}.{name}"] = z / lin.weight.numel()
        result.block_sparsity.append(block_zeros / sum(l.weight.numel() for l in linears.values()))
        zero_total += block_zeros
    result.overall_sparsity = zero_total / sum(result.block_params)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    result.model_sparsity = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
