"""`heal`: a short distillation of a pruned model towards its dense teacher, left as plain weights.

The loss is the top-K KL of gradmap/healing/teacher.py, averaged over every position of a step's
rows; Adam at a constant learning rate updates only what the mode trains (HealOptions.train):

* ``compensation``: one d×d map per removal site, identity-initialised, folded into the site's
  down projection (GradMAP Stage 2 / ReplaceMe's map, trained instead of solved);
* ``norms+compensation``: the same plus every norm weight;
* ``lora``: LoRA adapters on the kept layers, merged at the end (gradmap/healing/lora.py);
* ``partial``: every weight of the last k kept layers, and the norms.

The last `holdout` fraction of the rows is never trained on; its KL is measured before training,
every `eval_every` steps and at the end, and the parameters of the best of those states are kept
(early stopping; if no step lowered it, the model is returned unhealed). `on_eval(model, step, kl)`
runs after each of those held-out checks, with the model computing exactly what the current state
would give once folded: a budget curve from one run instead of one run per budget. Every existing weight
the mode edits is copied first; an exception or interrupt at any point (training, fold, merge)
removes the hooks/adapters and restores those copies, leaving the pruned-but-unhealed model.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.healing.lora import check_peft, lora_trainable
from gradmap.healing.options import HealOptions, heal_options
from gradmap.healing.seams import check_seams, seam_inputs, seam_loss_sum
from gradmap.healing.teacher import TeacherTargets, teacher_targets, topk_kl_sum
from gradmap.healing.trainables import Trainable, compensation_trainable, partial_trainable
from gradmap.runtime.batching import preserved_state
from gradmap.runtime.placement import model_device

__all__ = ["heal", "HealReport", "check_heal"]

log = logging.getLogger(__name__)


@dataclass
class HealReport:
    """What `heal` did: budget, loss curve, held-out checks (KL per position, nats)."""

    train: str
    what: str
    n_params: int
    top_k: int
    steps: int
    rows_per_step: int
    tokens: int
    passes: float  # tokens trained / tokens of the whole calibration set (× one forward+backward)
    seconds: float
    teacher_seconds: float
    loss_start: float
    loss_end: float
    loss_curve: list[float] = field(default_factory=list)
    holdout_rows: int = 0
    holdout: list[dict[str, float]] = field(default_factory=list)  # {"step", "kl"}, step 0 = unhealed
    best_step: int = 0
    holdout_kl_final: float = float("nan")  # measured again on the plain model after the fold / merge
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        start = self.holdout[0]["kl"]
        return (f"heal ({self.train}): {self.steps} steps, {self.tokens} tokens ({self.passes:.1f}× the "
                f"calibration set), {self.seconds:.1f}s; held-out top-{self.top_k} KL {start:.4f} -> "
                f"{self.holdout_kl_final:.4f} (best step {self.best_step}); trained {self.what}")


def _check_calib(calib: Any) -> torch.Tensor:
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise GradmapError("heal needs calibration ids as an integer tensor of shape (rows, seq_len), e.g. from "
                           "gradmap.core.calibration.calibration_data")
    if calib.shape[0] < 2:
        raise GradmapError(f"heal needs at least 2 calibration rows (one is held out), got {calib.shape[0]}")
    return calib


def check_heal(model: nn.Module, opts: HealOptions, n_layers_after: int | None = None) -> None:
    """Refuse before any work what `heal` cannot run on `model` (peft missing, too many layers)."""
    get_adapter(model)
    if opts.train == "lora":
        check_peft()
    n = get_adapter(model).num_layers if n_layers_after is None else n_layers_after
    if opts.train == "partial" and opts.partial_layers > n:
        raise GradmapError(f"partial_layers={opts.partial_layers} but the model has only {n} layers; choose "
                           f"at most {n}")


def _targets(teacher: Any, calib: torch.Tensor, k: int) -> tuple[TeacherTargets | nn.Module]:
    if isinstance(teacher, TeacherTargets):
        if tuple(teacher.indices.shape[:2]) != tuple(calib.shape):
            raise GradmapError(f"teacher targets cover {tuple(teacher.indices.shape[:2])} (rows, positions) but "
                               f"the calibration ids are {tuple(calib.shape)}; compute them on the same rows")
        if teacher.k < k:
            raise GradmapError(f"teacher targets hold the top {teacher.k} tokens but top_k={k}; recompute them "
                               f"with k >= {k} or lower top_k")
        return teacher
    if isinstance(teacher, nn.Module):
        return teacher
    raise GradmapError("heal needs teacher=: the dense model (its top-K log-probs are computed once, then it is "
                       "not used again) or TeacherTargets from gradmap.healing.teacher_targets(dense, calib, k)")


def _check_seam_targets(targets: TeacherTargets, seams: list[int], calib: torch.Tensor, hidden: int) -> None:
    missing = [j for j in seams if j not in targets.hidden]
    if missing:
        raise GradmapError(f"seam_mse needs the dense model's hidden states entering layer(s) {missing} (the "
                           f"seams), which these teacher targets do not hold; pass teacher=the dense model or "
                           f"targets from teacher_targets(dense, calib, k, hidden_at={seams})")
    for j in seams:
        if tuple(targets.hidden[j].shape) != (*calib.shape, hidden):
            raise GradmapError(f"teacher hidden states at layer {j} have shape {tuple(targets.hidden[j].shape)}, "
                               f"not (rows, positions, hidden) = {(*calib.shape, hidden)}; compute them on the "
                               "same rows with the dense model of this student")


def _trainable(model: nn.Module, opts: HealOptions) -> Trainable:
    adapter = get_adapter(model)
    if opts.train in ("compensation", "norms+compensation"):
        return compensation_trainable(adapter, with_norms=opts.train == "norms+compensation")
    if opts.train == "partial":
        return partial_trainable(adapter, opts.partial_layers)
    return lora_trainable(model, adapter, opts.lora_rank, opts.lora_alpha)


def _kl(model: nn.Module, calib: torch.Tensor, targets: TeacherTargets, rows: list[int], k: int,
        grad: bool, seam_weight: float = 0.0) -> tuple[float, float]:
    """(mean top-K KL per position, mean seam loss per row) over `rows`, one row per forward; with
    `grad`, backward per row of KL + seam_weight × seam loss (the seam loss only when the weight is
    above 0, else 0.0)."""
    device = model_device(model)
    seams = list(targets.hidden) if seam_weight > 0 else []
    adapter = get_adapter(model)
    total, seam_total, count = 0.0, 0.0, len(rows) * calib.shape[1]
    for r in rows:
        idx, lp = targets.rows(slice(r, r + 1))
        with torch.set_grad_enabled(grad), (seam_inputs(adapter, seams) if seams else nullcontext()) as store:
            logits = model(input_ids=calib[r:r + 1].to(device), use_cache=False).logits
            loss = topk_kl_sum(logits, idx[..., :k], lp[..., :k]) / count
            seam = seam_loss_sum(store, {j: targets.hidden[j][r:r + 1] for j in seams}) / len(rows) if seams \
                else None
        if grad:
            (loss if seam is None else loss + seam_weight * seam).backward()
        total += float(loss.detach())
        seam_total += 0.0 if seam is None else float(seam.detach())
    return total, seam_total


def heal(model: nn.Module, calib: torch.Tensor, teacher: Any = None, train: str | None = None,
         steps: int | None = None, lr: float | None = None, top_k: int | None = None, seed: int | None = None,
         progress: bool = True, options: Any = None, on_eval: Callable[[nn.Module, int, float], None] | None = None,
         **more: Any) -> HealReport:
    """Heal the pruned `model` in place by top-K distillation towards `teacher`; see the module docstring.

    `teacher`: the dense model (its top-K log-probs on `calib` are computed once, before training;
    it is not used afterwards, so the caller may free it) or `TeacherTargets` computed earlier on
    the same rows (`gradmap.healing.teacher_targets`; `fast_prune(heal=...)` computes them on the
    model itself before pruning). `options` (a mode name, dict or HealOptions) and the keyword
    arguments (`train`, `steps`, `lr`, `top_k`, `seed`, any other HealOptions field) combine,
    keywords winning. Every option is checked before any work. `on_eval(model, step, kl)` is
    called after every held-out check (step 0 = unhealed) with the current, not the best, state
    active; it must not change the model. Returns a HealReport; the model afterwards has exactly
    its previous modules and config.
    """
    if on_eval is not None and not callable(on_eval):
        raise GradmapError(f"heal on_eval must be a callable (model, step, kl), got {type(on_eval).__name__}")
    opts = heal_options(options, train=train, steps=steps, lr=lr, top_k=top_k, seed=seed, **more)
    calib = _check_calib(calib)
    teacher = _targets(teacher, calib, opts.top_k)
    check_heal(model, opts)
    if opts.train in ("compensation", "norms+compensation"):
        compensation_trainable(get_adapter(model), False)  # refuses a model with no removal site
    seams = check_seams(get_adapter(model)) if opts.seam_mse > 0 else []
    if isinstance(teacher, TeacherTargets):
        _check_seam_targets(teacher, seams, calib, get_adapter(model).config.hidden_size)
    n_hold = max(1, int(round(opts.holdout * calib.shape[0])))
    if n_hold >= calib.shape[0]:
        n_hold = calib.shape[0] - 1
    train_rows, hold_rows = list(range(calib.shape[0] - n_hold)), list(range(calib.shape[0] - n_hold, calib.shape[0]))
    start = time.perf_counter()
    if isinstance(teacher, nn.Module):
        teacher = teacher_targets(teacher, calib, opts.top_k, hidden_at=seams)
    # only the seams' states enter the loss (the caller's targets are not changed)
    teacher = TeacherTargets(teacher.indices, teacher.logprobs, {j: teacher.hidden[j] for j in seams})
    teacher_seconds = time.perf_counter() - start
    k = opts.top_k
    gen = torch.Generator().manual_seed(opts.seed)
    with preserved_state(model) as all_params:
        for p in all_params:
            p.requires_grad_(False)
        torch.manual_seed(opts.seed)  # LoRA's A initialisation
        plan = _trainable(model, opts)
        backup = [t.detach().clone() for t in plan.edited]
        try:
            report = _train(model, calib, teacher, plan, opts, train_rows, hold_rows, gen, progress, on_eval)
            with torch.no_grad():
                plan.finalize()
        except BaseException:
            plan.discard()
            with torch.no_grad():
                for t, b in zip(plan.edited, backup):
                    t.copy_(b)
            log.warning("heal failed or was interrupted: the model keeps its unhealed weights")
            raise
        finally:
            for p in plan.params:
                p.grad = None
    report.holdout_kl_final = _kl(model, calib, teacher, hold_rows, k, grad=False)[0]
    report.teacher_seconds = teacher_seconds
    report.seconds = time.perf_counter() - start
    log.info("%s", report.summary())
    return report


def _observe(model: nn.Module, on_eval: Callable[[nn.Module, int, float], None], step: int, kl: float) -> None:
    # the callback evaluates; gradients must not reach the trained parameters, and train mode is restored
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            on_eval(model, step, kl)
    finally:
        model.train(was_training)


def _train(model: nn.Module, calib: torch.Tensor, teacher: TeacherTargets, plan: Trainable, opts: HealOptions,
           train_rows: list[int], hold_rows: list[int], gen: torch.Generator, progress: bool,
           on_eval: Callable[[nn.Module, int, float], None] | None = None) -> HealReport:
    """The optimisation loop with held-out early stopping; leaves the best parameters in `plan.params`."""
    for p in plan.params:
        p.requires_grad_(True)
    k = opts.top_k
    w = opts.seam_mse

    def check(step: int) -> float:
        kl, seam = _kl(model, calib, teacher, hold_rows, k, grad=False, seam_weight=w)
        held.append({"step": step, "kl": kl} | ({"seam": seam} if w > 0 else {}))
        return kl

    held: list[dict[str, float]] = []
    best = check(0)  # unhealed; hooks not needed (identity)
    best_params, best_step = [p.detach().clone() for p in plan.params], 0
    opt = torch.optim.Adam(plan.params, lr=opts.learning_rate)
    order: list[int] = []
    curve = []
    every = opts.eval_every or opts.steps
    bar = tqdm(range(1, opts.steps + 1), desc=f"heal ({opts.train})", unit="step", disable=not progress)
    with plan.active():
        if on_eval is not None:
            _observe(model, on_eval, 0, best)
        for step in bar:
            rows = []
            while len(rows) < opts.batch_rows:
                if not order:
                    order = [train_rows[i] for i in torch.randperm(len(train_rows), generator=gen).tolist()]
                rows.append(order.pop())
            opt.zero_grad(set_to_none=True)
            kl, seam = _kl(model, calib, teacher, rows, k, grad=True, seam_weight=w)
            loss = kl + w * seam
            opt.step()
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % every == 0 or step == opts.steps:
                kl = check(step)
                if kl < best:
                    best, best_step = kl, step
                    best_params = [p.detach().clone() for p in plan.params]
                if on_eval is not None:
                    _observe(model, on_eval, step, kl)
    with torch.no_grad():
        for p, b in zip(plan.params, best_params):
            p.copy_(b)
            p.requires_grad_(False)
    tokens = opts.steps * opts.batch_rows * calib.shape[1]
    return HealReport(train=opts.train, what=plan.what, n_params=plan.n_params, top_k=k, steps=opts.steps,
                      rows_per_step=opts.batch_rows, tokens=tokens, passes=tokens / calib.numel(), seconds=0.0,
                      teacher_seconds=0.0, loss_start=curve[0], loss_end=curve[-1], loss_curve=curve,
                      holdout_rows=len(hold_rows), holdout=held, best_step=best_step, options=opts.as_dict())
