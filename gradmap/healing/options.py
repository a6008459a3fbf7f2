"""Healing options, validated on construction (every bad option is refused before any work)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gradmap.core.errors import GradmapError

__all__ = ["HEAL_MODES", "HEAL_ROWS", "HealOptions", "heal_options", "check_before_pruning"]

# what trains (gradmap/healing/trainables.py, gradmap/healing/lora.py)
HEAL_MODES = ("compensation", "norms+compensation", "lora", "partial")
# fresh healing rows the command line and compare draw by default: 32 calibration rows overfit the
# maps on SmolLM2, 256 did not (bench/RESULTS.md "Healing")
HEAL_ROWS = 256


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GradmapError(f"heal option {name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class HealOptions:
    """What `gradmap.heal` trains and how long.

    `train`: one of HEAL_MODES. `steps` optimiser steps of `batch_rows` healing rows each
    (Adam, learning rate `lr`, constant). The defaults (the seam maps and the norm weights, 160
    steps of 4 rows, lr 3e-4, held-out checks every 40 steps) are the variant measured best on
    SmolLM2 over 3 seeds with 256 healing rows of 256 tokens (bench/RESULTS.md "Healing"). `top_k`: teacher tokens kept per position (the loss is
    top-K KL, gradmap/healing/teacher.py). `holdout`: the last fraction of the rows (at least one)
    is never trained on; its KL is measured every `eval_every` steps (0: only at the start and
    the end) and the best state is kept (early stopping; the unhealed model if no step helped).
    `partial_layers`: the last k kept layers trained by `partial`. `lora_rank`, `lora_alpha`:
    the LoRA adapters of `lora`. `seed` seeds the row order and the LoRA initialisation.
    `seam_mse`: weight of the hidden-state loss at the seams added to the KL (gradmap/healing/seams.py;
    0, the default: off). It needs the dense model's states at the seams, so `gradmap.heal` with
    the dense model (or targets computed with `hidden_at=`) or `gradmap heal`, not `fast_prune`.
    """

    train: str = "norms+compensation"
    steps: int = 160
    lr: float | None = None
    top_k: int = 128
    batch_rows: int = 4
    holdout: float = 0.125
    eval_every: int = 40
    partial_layers: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    seam_mse: float = 0.0

    def __post_init__(self) -> None:
        if self.train not in HEAL_MODES:
            raise GradmapError(f"heal train={self.train!r} is not a healing mode; choose one of "
                               f"{', '.join(HEAL_MODES)}")
        _positive_int("steps", self.steps)
        _positive_int("top_k", self.top_k)
        _positive_int("batch_rows", self.batch_rows)
        _positive_int("eval_every", self.eval_every, 0)
        _positive_int("partial_layers", self.partial_layers)
        _positive_int("lora_rank", self.lora_rank)
        _positive_int("seed", self.seed, 0)
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if value is None and name == "lr":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise GradmapError(f"heal option {name} must be a positive finite number, got {value!r}")
        if isinstance(self.seam_mse, bool) or not isinstance(self.seam_mse, (int, float)) \
                or not (math.isfinite(self.seam_mse) and self.seam_mse >= 0):
            raise GradmapError(f"heal option seam_mse must be a finite number >= 0 (0: no seam loss), got "
                               f"{self.seam_mse!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise GradmapError(f"heal option holdout must be a fraction in (0, 1), got {self.holdout!r}")

    @property
    def learning_rate(self) -> float:
        """`lr`, or the mode's default: 3e-4 for the maps and norms (measured, 3 seeds), 1e-4 for
        LoRA (measured with the maps' budget), 1e-5 for whole layers (not measured);
        bench/RESULTS.md "Healing"."""
        if self.lr is not None:
            return float(self.lr)
        return {"lora": 1e-4, "partial": 1e-5}.get(self.train, 3e-4)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"lr": self.learning_rate}


def heal_options(spec: Any = None, **overrides: Any) -> HealOptions:
    """HealOptions from None (defaults), a mode name, a dict of options or a HealOptions, with
    `overrides` (None values ignored) on top."""
    if isinstance(spec, HealOptions):
        base = dataclasses.asdict(spec)
    elif spec is None:
        base = {}
    elif isinstance(spec, str):
        base = {"train": spec}
    elif isinstance(spec, dict):
        base = dict(spec)
    else:
        raise GradmapError(f"heal must be None, a mode name ({', '.join(HEAL_MODES)}), a dict of heal "
                           f"options or a HealOptions; got {spec!r}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(HealOptions)}
    unknown = sorted(set(base) - fields)
    if unknown:
        raise GradmapError(f"unknown heal option {unknown[0]!r}; valid options: {', '.join(sorted(fields))}")
    return HealOptions(**base)


def check_before_pruning(opts: HealOptions) -> None:
    """Refuse what a heal planned before pruning cannot do (fast_prune, prune --heal, compare +heal cache
    the teacher's log-probs before the removed layers are known)."""
    if opts.seam_mse > 0:
        raise GradmapError("heal option seam_mse needs the dense model's hidden states where layers were removed, "
                           "known only after pruning; prune first, then heal with gradmap.heal(model, rows, "
                           "teacher=dense, seam_mse=...) or `gradmap heal --heal-option seam_mse=...`")
