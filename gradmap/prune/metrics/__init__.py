"""Layer-importance metrics: GradMAP Stage 1 and peer baselines, one file each.

`get_metric(name, **options)` builds a validated metric; lowest score = removed first.
"""
from __future__ import annotations

import dataclasses

from gradmap.core.errors import GradmapError
from gradmap.prune.metrics.angular import Angular
from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.prune.metrics.block_influence import BlockInfluence
from gradmap.prune.metrics.gradmap_stage1 import GradMAP, gate_statistics
from gradmap.prune.metrics.magnitude import Magnitude
from gradmap.prune.metrics.ppl import PPL
from gradmap.prune.metrics.sleb import SLEB
from gradmap.prune.metrics.taylor import Taylor

__all__ = ["METRICS", "Metric", "ScoringRun", "get_metric", "available_metrics", "gate_statistics",
           "GradMAP", "BlockInfluence", "Angular", "Taylor", "PPL", "SLEB", "Magnitude"]

METRICS: dict[str, type[Metric]] = {
    cls.name: cls for cls in (GradMAP, BlockInfluence, Angular, Taylor, PPL, SLEB, Magnitude)
}


def available_metrics() -> list[str]:
    """Names accepted by `get_metric` / `fast_prune(metric=...)`."""
    return list(METRICS)


def get_metric(name: str | Metric, **options) -> Metric:
    """The metric called `name`, configured with `options` (errors name the valid choices)."""
    if isinstance(name, Metric):
        if options:
            raise GradmapError(f"metric options {sorted(options)} given with a metric instance; "
                               "set them on the instance instead")
        return name
    if name not in METRICS:
        raise GradmapError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    cls = METRICS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise GradmapError(f"unknown option(s) {unknown} for metric {name!r}; valid options: "
                           f"{', '.join(valid) if valid else 'none'}")
    return cls(**options)
