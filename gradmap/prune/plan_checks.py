"""What `fast_prune` checks before it touches the model: the calibration ids, the schedule a metric
supports, and which layers may be removed. Needs no model weights for the plan, so the CLI runs
`check_prune_plan` on the config before loading."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradmap.core.errors import GradmapError
from gradmap.prune.compensation.base import Compensator, NoCompensation
from gradmap.prune.metrics import Metric
from gradmap.prune.metrics.base import check_choice

__all__ = ["SCHEDULES", "check_calibration", "protected_layers", "check_schedule", "check_prune_plan",
           "resolve_compensation"]

SCHEDULES = ("one-shot", "iterative")


def check_calibration(model: nn.Module, calib: Any) -> torch.Tensor:
    """Validate calibration token ids: a non-empty integer tensor [n_samples, seq_len]."""
    if not torch.is_tensor(calib):
        raise GradmapError(f"calibration must be a LongTensor [n_samples, seq_len] of token ids, got "
                           f"{type(calib).__name__}; build one with gradmap.core.calibration.calibration_data")
    if calib.is_floating_point() or calib.is_complex() or calib.dtype == torch.bool:
        raise GradmapError(f"calibration must hold integer token ids, got dtype {calib.dtype}")
    if calib.dim() != 2:
        raise GradmapError(f"calibration must be 2-D [n_samples, seq_len], got shape {tuple(calib.shape)}; "
                           "for one sequence pass ids[None]")
    if calib.numel() == 0:
        raise GradmapError("calibration set is empty; pass at least one sequence of >= 2 tokens")
    if calib.shape[1] < 2:
        raise GradmapError(f"calibration sequences have {calib.shape[1]} token(s); the next-token loss "
                           "needs at least 2")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and calib.shape[1] > max_pos:
        raise GradmapError(f"calibration sequences have {calib.shape[1]} tokens, more than the model's "
                           f"max_position_embeddings={max_pos}; use seq_len <= {max_pos}")
    vocab = getattr(model.config, "vocab_size", None)
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise GradmapError(f"calibration token ids span [{lo}, {hi}], outside the model's vocabulary "
                           f"[0, {vocab}); tokenize with the model's own tokenizer")
    return calib.long()


def protected_layers(original_ids: Sequence[int], protect_first: int, protect_last: int) -> set[int]:
    """ORIGINAL indices of the first `protect_first` and last `protect_last` layers of the original model.

    The original depth is taken as max(original index) + 1.
    """
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GradmapError(f"{name} must be an integer >= 0, got {value!r}")
    n_orig = max(original_ids) + 1
    return {i for i in original_ids if i < protect_first or i >= n_orig - protect_last}


def check_schedule(metric_obj: Metric, schedule: str | None) -> str:
    """The schedule to run: `schedule`, or the metric's default; refuse one the metric lacks."""
    if schedule is None:
        schedule = metric_obj.resolved_default_schedule()
    check_choice("schedule", schedule, SCHEDULES)
    if schedule not in metric_obj.schedules:
        alt = {"ppl": " (its iterative form is metric='sleb')", "sleb": " (its one-shot form is metric='ppl')"}
        raise GradmapError(f"metric {metric_obj.name!r} supports schedule {metric_obj.schedules[0]!r} only"
                           f"{alt.get(metric_obj.name, '')}; pass schedule={metric_obj.schedules[0]!r}")
    return schedule


def check_prune_plan(original_ids: Sequence[int], n_prune: int, protect_first: int,
                     protect_last: int) -> tuple[set[int], list[int]]:
    """(protected, removable) ORIGINAL indices; refuse an n_prune the model cannot take.

    Needs only the layer indices, so the CLI runs it on the config before loading the model.
    """
    ids = list(original_ids)
    protected = protected_layers(ids, protect_first, protect_last)
    removable = [i for i in ids if i not in protected]
    if not isinstance(n_prune, int) or isinstance(n_prune, bool) or n_prune <= 0:
        raise GradmapError(f"n_prune must be a positive integer, got {n_prune!r}")
    if len(removable) < 2:  # at least one removable layer must stay, so n_prune <= removable - 1
        raise GradmapError(f"protect_first={protect_first} and protect_last={protect_last} leave "
                           f"{len(removable)} of the model's {len(ids)} layers removable, so none can be "
                           f"pruned; protect fewer layers (together at most {len(ids) - 2})")
    if n_prune >= len(removable):
        raise GradmapError(f"n_prune={n_prune} but only {len(removable)} of {len(ids)} layers are removable "
                           f"(protect_first={protect_first}, protect_last={protect_last}); use n_prune <= "
                           f"{len(removable) - 1} or protect fewer layers")
    return protected, removable


def resolve_compensation(spec: Any) -> list[Compensator]:
    """Compensators from "none", a registered name, a Compensator, or a list of those."""
    items = [] if spec is None else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    from gradmap.prune import compensation as registry_module
    get_compensator = getattr(registry_module, "get_compensator", None)
    out: list[Compensator] = []
    for item in items:
        if isinstance(item, Compensator):
            out.append(item)
        elif item == "none":
            continue
        elif isinstance(item, str):
            if get_compensator is None:
                raise GradmapError(f"compensation {item!r} is not available in this installation (no "
                                   "compensator registry); pass compensation='none' or a Compensator")
            out.append(get_compensator(item))
        else:
            raise GradmapError(f"compensation must be 'none', a compensator name, a Compensator or a list "
                               f"of those; got {item!r}")
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # each would apply its correction again, under one report entry
        raise GradmapError(f"compensation {twice[0]!r} is given twice; name each compensator once "
                           "(e.g. --compensation magnitude,projection)")
    return out or [NoCompensation()]
