"""Unstructured and N:M pruning of every linear layer in the decoder blocks, with layer-wise allocation.

Inside a layer (`score`): Wanda (Sun et al., 2023) and magnitude zero the lowest-scoring weights
of each OUTPUT ROW (scores in `gradmap.sparsity.scores`); a layer at sparsity s zeroes
k = round(s · rows · cols) weights, ⌊k / rows⌋ per row and one more in the first k mod rows rows.
SparseGPT (Frantar & Alistarh, 2023; `gradmap.sparsity.sparsegpt`) chooses the same count by OBS
saliency per block of 128 columns and reconstructs the kept weights from each layer's XᵀX.
Embeddings and the LM head are never pruned.

`pattern="N:M"` (`gradmap.sparsity.nm`): every matrix gets exactly N non-zeros per group of M
inputs (sparsity 1 − N/M, uniform allocation); checked on every pruned matrix before returning.

Across blocks (`allocation`):
    uniform  every block at S.
    owl      Yin et al., 2024: outlier ratios D_ℓ of the DENSE model (one dense pass), mapped to a
             2λ-wide band with mean exactly S (`gradmap.sparsity.owl`), then sequential pruning.
    mrp      Gao et al., 2025 (`gradmap.sparsity.mrp`): start every block at S − Δ, then raise the
             block with the most remaining redundancy by δ until the overall sparsity is S.

Sequential calibration (`gradmap.runtime.sequential`): block ℓ's statistics (Σx² for Wanda, XᵀX for
SparseGPT) are measured on inputs produced by the already-pruned blocks 0..ℓ-1.
MRP with Wanda / magnitude: the loop runs WITHOUT new forwards, on the per-block norms stored
during the sequential pass at S − Δ; raising a block re-scores only that block (pruned weights
score 0, so masks only grow). MRP with SparseGPT: a reconstruction cannot be re-pruned step by
step, so the loop runs first on copies of the dense model's scores (|W|·‖X‖, one sequential pass
of statistics), and SparseGPT then prunes every block once at its final target.

Every run reports each block's final redundancy R (`gradmap.sparsity.mrp.remaining_redundancy`,
under the run's own score) and its spread (std, max − min): MRP's third principle made measurable.

Options (keyword `**options` of `sparsify`), with defaults:
    outlier_m=5.0    M, outlier threshold (OWL, MRP and the reported redundancy)
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
from gradmap.runtime import placement
from gradmap.runtime.memory import limit_heap_fragmentation
from gradmap.runtime.sequential import check_calibration, sequential_blocks
from gradmap.sparsity.mrp import (DEFAULT_CAP, DEFAULT_DELTA, DEFAULT_STEP, mrp_allocate,
                                  redundancy_spread, remaining_redundancy)
from gradmap.sparsity.nm import check_nm, parse_pattern, prune_nm_
from gradmap.sparsity.owl import DEFAULT_LAMBDA, DEFAULT_M, outlier_ratio, owl_allocation
from gradmap.sparsity.scores import (SCORES, block_moments, block_scores, magnitude_scores, prune_rows_,
                                     wanda_scores)
from gradmap.sparsity.sparsegpt import sparsegpt_prune_

__all__ = ["sparsify", "SparsifyResult", "ALLOCATIONS", "SCORES", "OPTION_DEFAULTS", "wanda_scores",
           "magnitude_scores", "prune_rows_", "check_options", "resolve_pattern", "needs_calibration"]

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "mrp")
OPTION_DEFAULTS: dict[str, float] = {"outlier_m": DEFAULT_M, "owl_lambda": DEFAULT_LAMBDA,
                                     "mrp_delta": DEFAULT_DELTA, "mrp_step": DEFAULT_STEP,
                                     "mrp_cap": DEFAULT_CAP}
DEFAULT_SPARSITY = 0.7
Norms = dict[str, torch.Tensor]


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
    outlier_ratios: list[float] | None = None     # OWL: D of the dense model; MRP: final D, zeros included
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # MRP steps (gradmap.sparsity.mrp.MRPStep)
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    pattern: str | None = None                    # "N:M" when semi-structured, else None
    block_redundancy: list[float] = field(default_factory=list)  # final R per block (its own score)
    redundancy_std: float = 0.0                   # population std of block_redundancy
    redundancy_range: float = 0.0                 # max − min of block_redundancy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_pattern(pattern: Any, sparsity: Any, allocation: Any) -> tuple[tuple[int, int] | None, Any, Any]:
    """Fill the defaults of (sparsity, allocation) from `pattern`; reject combinations that conflict."""
    if pattern is None:
        return None, DEFAULT_SPARSITY if sparsity is None else sparsity, allocation or "mrp"
    n, m = parse_pattern(pattern)
    implied = 1.0 - n / m
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or abs(sparsity - implied) > 1e-9):
        raise GradmapError(f"pattern {n}:{m} zeroes exactly {implied:g} of every matrix but sparsity="
                           f"{sparsity!r} was given; drop sparsity or pass sparsity={implied:g}")
    if allocation not in (None, "uniform"):
        raise GradmapError(f"pattern {n}:{m} fixes every layer's sparsity, so allocation={allocation!r} "
                           "cannot apply; drop allocation or pass allocation='uniform'")
    return (n, m), implied, "uniform"


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
                          # far smaller steps never finish (1e-300 meant ~1e300 steps)
                          ("mrp_step", 1e-4 <= opts["mrp_step"] <= 1, "in [1e-4, 1]"),
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


def needs_calibration(allocation: str, score: str) -> bool:
    """Magnitude under uniform or MRP needs no activations (MRP scores redundancy with |W| then)."""
    return score != "magnitude" or allocation == "owl"


def _validate(model: nn.Module, calib: Any, sparsity: Any, allocation: Any, score: Any,
              batch_size: Any, options: dict[str, Any], nm: tuple[int, int] | None) -> dict[str, float]:
    adapter = get_adapter(model)  # raises UnsupportedModelError naming the supported families
    opts = check_options(sparsity, allocation, score, batch_size, options)
    placement.check_weights_editable(model, "sparsify")  # device_map: offloaded weights cannot be edited
    if nm is not None:
        bad = sorted({l.in_features for p in range(adapter.num_layers)
                      for l in adapter.linear_modules(p).values() if l.in_features % nm[1]})
        if bad:
            raise GradmapError(f"pattern {nm[0]}:{nm[1]} needs every layer's in_features to be a multiple "
                               f"of {nm[1]}, but some have {bad}; choose another M")
    if needs_calibration(allocation, score):
        if calib is None:
            raise GradmapError(f"score={score!r} with allocation={allocation!r} needs calibration data; "
                               "pass calib=gradmap.core.calibration.calibration_data(tokenizer, ...)")
        check_calibration(calib, getattr(model.config, "vocab_size", None))
    return opts


def sparsify(model: nn.Module, calib: torch.Tensor | None, sparsity: float | None = None,
             allocation: str | None = None, score: str = "wanda", *, pattern: str | None = None,
             batch_size: int = 8, progress: bool = True, offload: str | None = None,
             compute_device: str | torch.device | None = None, **options: float) -> SparsifyResult:
    """Zero a fraction `sparsity` (default 0.7) of the decoder blocks' linear weights in place.

    `calib`: LongTensor [n_samples, seq_len] of token ids (may be None for magnitude scores
    under uniform or MRP allocation). `allocation` in {"uniform", "owl", "mrp"} (default "mrp"),
    `score` in {"wanda", "magnitude", "sparsegpt"}; `pattern="2:4"` (or any "N:M") prunes
    semi-structured instead, with sparsity 1 − N/M and uniform allocation. `options` and the
    algorithms are described in the module docstring. The parameter-weighted overall sparsity
    over the pruned layers equals `sparsity` up to rounding (< 0.1%). On bad input a
    GradmapError is raised before the model is changed.

    Data-parallel under `torchrun`: pass the same GLOBAL `calib` on every rank; each rank runs
    its contiguous share of the rows and the activation statistics (Σx², XᵀX) are summed over
    ranks, so every rank prunes the same weights.

    `offload="layer"` (`gradmap.runtime.placement`): the weights stay on the host; each block is
    copied to `compute_device` (default CUDA when available), its statistics measured and its
    weights pruned there, and the pruned weights are written back to the host weights.
    """
    if offload not in placement.OFFLOAD_MODES:
        raise GradmapError(f"offload={offload!r} is not valid; choose one of {placement.OFFLOAD_MODES}")
    nm, sparsity, allocation = resolve_pattern(pattern, sparsity, allocation)
    opts = _validate(model, calib, sparsity, allocation, score, batch_size, options, nm)
    limit_heap_fragmentation()
    with placement.layer_offload(model, compute_device) if offload else nullcontext():
        return _sparsify(model, calib, sparsity, allocation, score, batch_size, progress, opts, nm)


def _on_block(model: nn.Module, position: int, write_back: bool = True):
    """Under layer streaming: block `position` on the compute device (edits written back); else nothing."""
    offload = placement.offload_of(model)
    if offload is None:
        return nullcontext()
    return placement.on_device([get_adapter(model).layers[position]], offload.compute_device, write_back)


def _prune_block(linears: dict[str, nn.Linear], sparsity: float, score: str, norms: Norms | None,
                 nm: tuple[int, int] | None = None, moments: dict | None = None) -> int:
    """Prune every linear of a block to `sparsity` (or the N:M pattern); return the block's zero count."""
    zeros = 0
    for (name, lin), scores in zip(linears.items(), block_scores(linears, score, norms)):
        w = lin.weight
        if score == "sparsegpt":
            zeros += sparsegpt_prune_(w, moments[name].xtx, sparsity, nm)
        elif nm is not None:
            zeros += prune_nm_(w, scores, *nm)
        else:
            zeros += prune_rows_(w, scores, round(sparsity * w.numel()))
    return zeros


def _redundancy(linears: dict[str, nn.Linear], score: str, norms: Norms | None, m: float) -> float:
    return remaining_redundancy(block_scores(linears, score, norms), m)


def _sparsify(model: nn.Module, calib: torch.Tensor | None, sparsity: float, allocation: str, score: str,
              batch_size: int, progress: bool, opts: dict[str, float],
              nm: tuple[int, int] | None) -> SparsifyResult:
    progress = progress and distributed.is_main()
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    n = adapter.num_layers
    blocks = [adapter.linear_modules(p) for p in range(n)]
    n_params = [sum(l.weight.numel() for l in b.values()) for b in blocks]
    result = SparsifyResult(allocation=allocation, score=score, target_sparsity=float(sparsity),
                            layer_ids=adapter.original_ids, block_params=n_params,
                            pattern=f"{nm[0]}:{nm[1]}" if nm else None,
                            options={**opts, "batch_size": batch_size,
                                     "calibration_shape": list(calib.shape) if calib is not None else None})
    if calib is not None:
        calib = distributed.shard_rows(calib)  # the only place rows are split: every pass is full-set
    timings = {"allocation_pass": 0.0, "pruning_pass": 0.0, "mrp_loop": 0.0}
    m = opts["outlier_m"]

    t = time.perf_counter()
    if allocation == "owl":
        ratios = []
        for block in sequential_blocks(model, calib, batch_size, progress, desc="OWL outlier ratios"):
            norms = _norms(block_moments(block, blocks[block.position]))
            ratios.append(outlier_ratio([wanda_scores(l.weight, norms[k])
                                         for k, l in blocks[block.position].items()], m))
        targets = owl_allocation(ratios, sparsity, opts["owl_lambda"])  # raises before any change
        result.outlier_ratios = ratios
    elif allocation == "mrp" and score == "sparsegpt":
        targets, steps, timings["mrp_loop"] = _mrp_on_dense_scores(model, calib, blocks, n_params, sparsity,
                                                                    batch_size, progress, opts)
        result.trajectory = [s.to_dict() for s in steps]
    elif allocation == "mrp":
        targets = [max(sparsity - opts["mrp_delta"], 0.0)] * n
    else:
        targets = [float(sparsity)] * n
    timings["allocation_pass"] = time.perf_counter() - t - timings["mrp_loop"]

    t = time.perf_counter()
    zeros = [0] * n
    norms_of: list[Norms | None] = [None] * n
    if score != "magnitude":
        for block in sequential_blocks(model, calib, batch_size, progress, desc=f"{score} pruning"):
            p = block.position
            moments = block_moments(block, blocks[p], want_xtx=score == "sparsegpt")
            norms_of[p] = _norms(moments)
            zeros[p] = _prune_block(blocks[p], targets[p], score, norms_of[p], nm, moments)
            del moments
    else:  # magnitude needs no activations
        for p in range(n):
            with _on_block(model, p):
                zeros[p] = _prune_block(blocks[p], targets[p], score, None, nm)
    timings["pruning_pass"] = time.perf_counter() - t

    if allocation == "mrp" and score != "sparsegpt":
        t = time.perf_counter()

        def prune_block(p: int, s: float) -> int:
            with _on_block(model, p):
                return _prune_block(blocks[p], s, score, norms_of[p])

        def redundancy(p: int) -> float:
            with _on_block(model, p, write_back=False):
                return _redundancy(blocks[p], score, norms_of[p], m)
        targets, steps = mrp_allocate(
            n_params, zeros, targets, sparsity, prune_block=prune_block, redundancy=redundancy,
            step=opts["mrp_step"], cap=opts["mrp_cap"], slack=max(len(b) for b in blocks))
        result.trajectory = [s.to_dict() for s in steps]
        timings["mrp_loop"] = time.perf_counter() - t

    _finish(result, model, blocks, targets, norms_of, score, m, nm)
    timings["total"] = time.perf_counter() - t_start
    result.timings = timings
    log.info("sparsify %s/%s: overall sparsity %.5f (target %.5f) in %.1fs", allocation, score,
             result.overall_sparsity, sparsity, timings["total"])
    return result


def _norms(moments: dict) -> Norms:
    return {name: mo.sq_x.sqrt() for name, mo in moments.items()}


def _mrp_on_dense_scores(model: nn.Module, calib: torch.Tensor, blocks: list[dict[str, nn.Linear]],
                         n_params: list[int], sparsity: float, batch_size: int, progress: bool,
                         opts: dict[str, float]) -> tuple[list[float], list, float]:
    """MRP's (targets, steps, loop seconds) for a reconstructing pruner, on copies of the dense |W|·‖X‖.

    Pruning a copy zeroes its lowest scores (`prune_rows_` on the scores themselves), which is
    exactly what the redundancy of a Wanda-style mask sees; the weights are not touched.
    """
    host = placement.host_device(model)
    scores: list[list[torch.Tensor]] = []
    start = max(sparsity - opts["mrp_delta"], 0.0)
    zeros = []
    for block in sequential_blocks(model, calib, batch_size, progress, desc="MRP scores (dense)"):
        norms = _norms(block_moments(block, blocks[block.position]))
        copies = [sc.to(host) for sc in block_scores(blocks[block.position], "sparsegpt", norms)]
        zeros.append(sum(prune_rows_(sc, sc, round(start * sc.numel())) for sc in copies))
        scores.append(copies)
    t = time.perf_counter()

    def prune_block(p: int, s: float) -> int:
        return sum(prune_rows_(sc, sc, round(s * sc.numel())) for sc in scores[p])
    targets, steps = mrp_allocate(
        n_params, zeros, [start] * len(blocks), sparsity, prune_block=prune_block,
        redundancy=lambda p: remaining_redundancy(scores[p], opts["outlier_m"]),
        step=opts["mrp_step"], cap=opts["mrp_cap"], slack=max(len(b) for b in blocks))
    return targets, steps, time.perf_counter() - t


def _finish(result: SparsifyResult, model: nn.Module, blocks: list[dict[str, nn.Linear]],
            targets: list[float], norms_of: list[Norms | None], score: str, m: float,
            nm: tuple[int, int] | None) -> None:
    """Achieved sparsities, the N:M check, and each block's final redundancy under the run's score."""
    result.block_targets = [float(s) for s in targets]
    zero_total = 0
    redundancy, ratios = [], []
    for p, (orig, linears) in enumerate(zip(result.layer_ids, blocks)):
        block_zeros = 0
        for name, lin in linears.items():
            z = int((lin.weight == 0).sum())
            block_zeros += z
            result.layer_sparsity[f"layers.{orig}.{name}"] = z / lin.weight.numel()
        result.block_sparsity.append(block_zeros / sum(l.weight.numel() for l in linears.values()))
        zero_total += block_zeros
        with _on_block(model, p, write_back=False):
            if nm is not None:
                for name, lin in linears.items():
                    check_nm(lin.weight, *nm, name=f"layers.{orig}.{name}")
            scores = block_scores(linears, score, norms_of[p])
            redundancy.append(remaining_redundancy(scores, m))
            ratios.append(outlier_ratio(scores, m))
    result.overall_sparsity = zero_total / sum(result.block_params)
    result.block_redundancy = redundancy
    result.redundancy_std, result.redundancy_range = redundancy_spread(redundancy)
    if result.allocation == "mrp":
        result.outlier_ratios = ratios  # D over all of each block's weights (pruned ones score 0)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    result.model_sparsity = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
