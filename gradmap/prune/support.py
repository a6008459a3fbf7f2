"""Which metrics and compensators a `fast_prune` call can run, from what each declares it needs.

Checked before any work: layer streaming (`offload="layer"`) and models whose weights
accelerate offloaded to cpu/disk. The algorithm lists in the messages come from the registries,
so a new metric that declares `needs` is accepted or refused with no change here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from gradmap.core.errors import GradmapError
from gradmap.prune.compensation import COMPENSATORS
from gradmap.prune.metrics import METRICS
from gradmap.runtime.support import STREAMABLE, check_dispatch_support, requirements_of, unsupported

__all__ = ["check_prune_support", "check_model_support", "describe"]


def describe(algorithm: Any) -> str:
    """`metric 'x'` / `compensation ['x']`, with the option that matters for GradMAP."""
    name = getattr(algorithm, "name", type(algorithm).__name__)
    if name in METRICS and isinstance(algorithm, METRICS[name]):
        param = name == "gradmap" and getattr(algorithm, "gradient", None) == "param"
        return f"metric {name!r}" + (" with gradient='param'" if param else "")
    return f"compensation [{name!r}]"


def _streamable_names() -> tuple[list[str], list[str]]:
    metrics = [n for n, cls in METRICS.items() if requirements_of(cls()) <= STREAMABLE]
    comps = [n for n, cls in COMPENSATORS.items() if requirements_of(cls) <= STREAMABLE]
    return metrics, comps


def check_prune_support(metric: Any, compensators: Sequence[Any]) -> None:
    """Raise before anything runs when `fast_prune(offload="layer")` cannot stream this setup."""
    bad = unsupported([metric, *compensators], STREAMABLE)
    if bad:
        metrics, comps = _streamable_names()
        raise GradmapError(f"{', '.join(map(describe, bad))} does not support offload='layer' yet; with "
                           f"offload='layer' use compensation in ({', '.join(map(repr, comps))}) and one of "
                           f"the metrics {', '.join(metrics)} (gradmap with gradient != 'param'), or pass "
                           "offload=None (in-memory, device_map='auto' works there)")


def check_model_support(model: nn.Module, metric: Any, compensators: Sequence[Any]) -> None:
    """A dispatched model with offloaded weights: nothing may edit, read or differentiate them."""
    check_dispatch_support(model, [metric, *compensators], describe)
