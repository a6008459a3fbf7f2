"""The default pipeline: what `fast_prune` and `gradmap prune` run when no metric or compensation is named.

With nothing named, the default is `AUTO` ("auto"): every pipeline of `CANDIDATES` runs and the
one with the lowest held-out loss is kept (`gradmap.prune.auto`). `DEFAULT_PIPELINE`, the first
candidate, fills what a partial choice leaves open (a metric without a compensation, ...).
"""
from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_PIPELINE", "CANDIDATES", "AUTO", "default_pipeline_name", "pipeline_name", "resolve_pipeline"]


# What fast_prune and `gradmap prune` run when no metric / compensation is named: chosen from the
# multi-seed study of issue 14 (bench/RESULTS.md "Default pipeline (issue 14)"): at 8 of 30
# layers of SmolLM2 the lowest mean PPL of every pipeline measured over 3 calibration seeds
# (significantly below the previous one-shot default) and a 7-task average tied with the best,
# within 3x one forward+backward. Why it should hold beyond SmolLM2: block influence removes the
# layer that rotates the residual stream least; magnitude compensation restores the norm the
# removed layer added (a scalar per gap, folded), and re-scoring the compensated model before the
# next choice lets each decision see the earlier ones (the Prune&Comp loop), where one-shot
# scores all layers on the dense model; ReplaceMe then fits one least-squares linear map per
# removed run from the dense model's own outputs. Every pass is forward-only and the magnitude
# statistics come from the scoring pass itself. Measured limit: at 12 of 30 layers the loop
# grows one 8-layer run that one linear map repairs less well, and one-shot scoring is better
# there (RESULTS "4 and 12 of 30 layers"); `schedule="one-shot"` keeps it. Nothing is tuned to
# the model.
DEFAULT_PIPELINE: dict[str, Any] = {"metric": "block-influence", "metric_options": {},
                                    "compensation": ("magnitude", "replaceme"), "schedule": "iterative"}


# GradMAP as the paper describes it (Stage 1 one-shot + the closed-form Stage 2): the best of
# every pipeline measured on a Gemma-3 model where DEFAULT_PIPELINE was 36% worse (issue 24).
GRADMAP_PIPELINE: dict[str, Any] = {"metric": "gradmap", "metric_options": {},
                                    "compensation": ("projection",), "schedule": "one-shot"}
CANDIDATES: tuple[dict[str, Any], ...] = (DEFAULT_PIPELINE, GRADMAP_PIPELINE)
AUTO = "auto"


def pipeline_name(d: dict[str, Any]) -> str:
    """A pipeline dict as a `gradmap compare` method string."""
    opts = ",".join(f"{k}={v!r}" for k, v in d["metric_options"].items())
    return f"{d['metric']}{f'({opts})' if opts else ''}+{'+'.join(d['compensation'])}@{d['schedule']}"


def default_pipeline_name() -> str:
    """The default as a `gradmap compare` method string: "auto" (the best of `CANDIDATES`)."""
    return AUTO


def resolve_pipeline(metric: Any, compensation: Any, schedule: str | None, metric_options: dict
                     ) -> tuple[Any, Any, str | None, dict]:
    """Fill what the caller left None from DEFAULT_PIPELINE.

    `metric=None`: the default metric with its options (the caller's `metric_options` on top)
    and, when `schedule` is None too, the default schedule. `compensation=None`: the default
    compensation, whatever the metric. Anything named explicitly is kept as given.
    """
    if metric is None:
        metric = DEFAULT_PIPELINE["metric"]
        metric_options = {**DEFAULT_PIPELINE["metric_options"], **metric_options}
        schedule = DEFAULT_PIPELINE["schedule"] if schedule is None else schedule
    if compensation is None:
        compensation = list(DEFAULT_PIPELINE["compensation"])
    return metric, compensation, schedule, metric_options
