"""The interface between `fast_prune` and the layer-importance metrics.

A metric is a small validated config (a dataclass) with two methods:

    scores = metric.score(run)          # ORIGINAL layer index -> score, lowest = least important
    for idx in metric.plan(run, scores, n):   # ORIGINAL indices, removal order
        ...                             # the driver removes idx (and runs compensator hooks)
                                        # before it asks for the next one

`plan` is a generator so that a metric may look at the model *after* each
removal (GradMAP's verification does); the default yields the lowest-scoring
removable layers in order.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.runtime.batching import AbsSink, MeanSink, Sinks
from gradmap.runtime.prefix_cache import PrefixCache

__all__ = ["Metric", "ScoringRun", "lowest_first", "check_choice"]


@dataclass
class ScoringRun:
    """Everything a metric may read during one `fast_prune` call.

    `removable` lists the ORIGINAL indices of the layers still present that may be
    removed (protected layers excluded); the driver keeps it current.
    `sink` collects what the driver asks a plain scoring pass to record as it goes (dense means
    on the first pass, layer magnitudes for the compensation that follows; runtime.batching
    sinks); metrics that run a plain pass over every row pass it to that pass.
    """

    model: nn.Module
    adapter: ModelAdapter
    calib: torch.Tensor
    batch_size: int
    removable: list[int]
    n_prune: int
    sink: MeanSink | AbsSink | Sinks | None = None
    progress: bool = False
    # per-decision details a metric wants in the report (e.g. verification losses)
    notes: list[dict[str, Any]] = field(default_factory=list)
    # the iterative loop's kept layer inputs (runtime.prefix_cache): a metric's plain forward
    # pass given it recomputes only from the first layer that changed since the last pass
    prefix: PrefixCache | None = None


def lowest_first(scores: dict[int, float], allowed: list[int]) -> list[int]:
    """ORIGINAL indices in `allowed` sorted by score, ties broken by the lower index."""
    missing = [i for i in allowed if i not in scores]
    if missing:
        raise RuntimeError(f"metric produced no score for removable layers {missing}")
    return sorted(allowed, key=lambda i: (scores[i], i))


def check_choice(name: str, value: Any, valid: tuple) -> None:
    """Raise GradmapError naming the valid values when `value` is not one of them."""
    if value not in valid:
        raise GradmapError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


class Metric:
    """Base class. Subclasses are dataclasses whose fields are the metric's options."""

    name: ClassVar[str] = ""
    # schedules the metric supports; fast_prune rejects the others with a clear error
    schedules: ClassVar[tuple[str, ...]] = ("one-shot", "iterative")
    # what fast_prune(schedule=None) uses for this metric; must be one of `schedules`
    default_schedule: ClassVar[str] = "iterative"
    # True when score() runs a plain forward of the current model (it can then feed dense means)
    plain_forward: ClassVar[bool] = False
    # the calibration passes score() uses (gradmap.runtime.support.PASS_KINDS); the runtime
    # decides from them whether the metric can run streamed or on offloaded weights. A metric
    # that runs forwards of its own declares "own_passes" (the conservative default).
    needs: ClassVar[frozenset[str]] = frozenset({"own_passes"})
    # True when plan() removes one contiguous block of layers (it then keeps a sliding/full
    # attention pattern by itself when n_prune is whole periods: gradmap.prune.attention_pattern)
    plans_one_block: ClassVar[bool] = False

    def score(self, run: ScoringRun) -> dict[int, float]:
        raise NotImplementedError

    @classmethod
    def resolved_default_schedule(cls) -> str:
        """`default_schedule` when the metric supports it, else its only schedule."""
        return cls.default_schedule if cls.default_schedule in cls.schedules else cls.schedules[0]

    def plan(self, run: ScoringRun, scores: dict[int, float], n: int) -> Iterator[int]:
        """Yield `n` ORIGINAL indices to remove, lowest score first (default)."""
        yield from lowest_first(scores, run.removable)[:n]

    def feeds_dense_means(self) -> bool:
        """True when this configured metric's first score() is a plain forward over every row."""
        return self.plain_forward

    def requirements(self) -> frozenset[str]:
        """The pass kinds this configured metric needs (`needs`, refined by options in subclasses)."""
        return self.needs

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
