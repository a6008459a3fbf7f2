"""Method names for `gradmap compare`: `metric[+compensation[+compensation]][@schedule]`.

    gradmap+projection          GradMAP scores, projection compensation, default schedule
    block-influence             ShortGPT's Block Influence, no compensation
    angular+replaceme@one-shot  angular distance, ReplaceMe, one-shot schedule
    gradmap+magnitude+projection  two compensators, applied in the order written

A bare metric means no compensation (`+none` says the same explicitly). Without a
`@schedule` suffix the schedule is the metric's default, as in `fast_prune(schedule=None)`
(one-shot for `gradmap`, iterative for the others that support it, else the metric's only
schedule: `ppl` is one-shot, `sleb` iterative);
the parsed spec always names the schedule it resolved to. Valid metric names come from
the metrics registry and valid compensation names from the compensation registry, so a
new entry there is a valid method here at once.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gradmap.core.errors import GradmapError

__all__ = ["MethodSpec", "parse_method", "parse_methods", "valid_metrics", "valid_compensations",
           "metric_schedules", "SCHEDULES", "DEFAULT_SCHEDULE"]

SCHEDULES = ("one-shot", "iterative")
DEFAULT_SCHEDULE = "iterative"  # for metrics outside the registry
MAX_COMPENSATIONS = 2


def _names(module, attrs: tuple[str, ...]) -> list[str]:
    for attr in attrs:
        registry = getattr(module, attr, None)
        if registry is None:
            continue
        names = registry() if callable(registry) else registry
        return sorted(str(n) for n in names)
    raise RuntimeError(f"{module.__name__} exposes none of {attrs}; cannot list valid names")


def valid_metrics() -> list[str]:
    """Names in the metrics registry (`gradmap.prune.metrics`)."""
    from gradmap.prune import metrics
    return _names(metrics, ("METRICS", "available_metrics"))


def metric_schedules() -> dict[str, tuple[str, ...]]:
    """Metric name -> the schedules it supports, its default first (from the metrics registry)."""
    from gradmap.prune import metrics
    out = {}
    for name, cls in getattr(metrics, "METRICS", {}).items():
        supported = tuple(getattr(cls, "schedules", SCHEDULES))
        default = cls.resolved_default_schedule() if hasattr(cls, "resolved_default_schedule") else None
        out[name] = (default,) + tuple(s for s in supported if s != default) if default else supported
    return out


def valid_compensations() -> list[str]:
    """Names in the compensation registry (`gradmap.prune.compensation`)."""
    from gradmap.prune import compensation
    return _names(compensation, ("COMPENSATORS", "available_compensators"))


@dataclass(frozen=True)
class MethodSpec:
    """One parsed method: what `fast_prune` is called with.

    `compensation` is ("none",) for a bare metric; `schedule` is always resolved.
    """

    name: str
    metric: str
    compensation: tuple[str, ...]
    schedule: str = DEFAULT_SCHEDULE

    @property
    def label(self) -> str:
        """The name with its schedule spelled out (`block-influence@iterative`)."""
        return self.name if "@" in self.name else f"{self.name}@{self.schedule}"

    def prune_kwargs(self) -> dict:
        """Keyword arguments for `fast_prune` (metric, compensation, schedule)."""
        comp = self.compensation[0] if len(self.compensation) == 1 else list(self.compensation)
        return {"metric": self.metric, "compensation": comp, "schedule": self.schedule}


def _grammar(metrics: list[str], compensations: list[str]) -> str:
    return (f"write methods as metric[+compensation[+compensation]][@{'|@'.join(SCHEDULES)}], "
            f"e.g. gradmap+projection or angular+replaceme@one-shot; valid metrics: "
            f"{', '.join(metrics)}; valid compensations: {', '.join(compensations)}")


def parse_method(name: str, metrics: Iterable[str] | None = None,
                 compensations: Iterable[str] | None = None,
                 schedules: dict[str, tuple[str, ...]] | None = None) -> MethodSpec:
    """Parse one method name; raise GradmapError naming the valid metrics and compensations.

    `metrics`, `compensations` and `schedules` (metric -> supported schedules) default to
    the registries; a metric missing from `schedules` supports both schedules.
    """
    if metrics is None:
        metrics = valid_metrics()
        if schedules is None:
            schedules = metric_schedules()
    metrics = sorted(metrics)
    schedules = schedules or {}
    compensations = sorted(compensations) if compensations is not None else valid_compensations()
    text = name.strip()
    if not text:
        raise GradmapError("empty method name; " + _grammar(metrics, compensations))
    body, at, schedule = text.partition("@")
    if at and schedule not in SCHEDULES:
        raise GradmapError(f"method {text!r}: unknown schedule {schedule!r}; "
                           + _grammar(metrics, compensations))
    metric, *comps = body.split("+")
    if metric not in metrics:
        raise GradmapError(f"method {text!r}: unknown metric {metric!r}; "
                           + _grammar(metrics, compensations))
    bad = [c for c in comps if c not in compensations]
    if bad:
        raise GradmapError(f"method {text!r}: unknown compensation {bad[0]!r}; "
                           + _grammar(metrics, compensations))
    if len(comps) > MAX_COMPENSATIONS:
        raise GradmapError(f"method {text!r} names {len(comps)} compensations; at most "
                           f"{MAX_COMPENSATIONS} may be chained; " + _grammar(metrics, compensations))
    if len(set(comps)) != len(comps):
        raise GradmapError(f"method {text!r} names a compensation twice; name each once")
    if "none" in comps and len(comps) > 1:
        raise GradmapError(f"method {text!r} chains 'none' with another compensation; drop '+none'")
    supported = schedules.get(metric, SCHEDULES)
    if schedule and schedule not in supported:
        raise GradmapError(f"method {text!r}: metric {metric!r} supports only "
                           f"{', '.join('@' + s for s in supported)}; write {body}@{supported[0]} "
                           f"or {body}")
    if not schedule:  # metric_schedules() lists the metric's default schedule first
        schedule = supported[0] if metric in schedules else DEFAULT_SCHEDULE
    return MethodSpec(name=text, metric=metric, compensation=tuple(comps) or ("none",),
                      schedule=schedule)


def parse_methods(names: str | Iterable[str], metrics: Iterable[str] | None = None,
                  compensations: Iterable[str] | None = None,
                  schedules: dict[str, tuple[str, ...]] | None = None) -> list[MethodSpec]:
    """Parse a comma-separated string (or a list) of method names, all before any work is done."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [
        str(n).strip() for n in names]
    items = [n for n in items if n]
    if metrics is None:
        metrics = valid_metrics()
        if schedules is None:
            schedules = metric_schedules()
    compensations = sorted(compensations) if compensations is not None else valid_compensations()
    if not items:
        raise GradmapError("no methods given; " + _grammar(sorted(metrics), compensations))
    specs, problems = [], []
    grammar = "; " + _grammar(sorted(metrics), compensations)
    for n in items:  # every bad name at once: fixing typos one run at a time is slow
        try:
            specs.append(parse_method(n, metrics, compensations, schedules))
        except GradmapError as exc:
            problems.append(str(exc).removesuffix(grammar))
    if len(problems) == 1:
        raise GradmapError(problems[0] + grammar)
    if problems:
        raise GradmapError(f"{len(problems)} method names are invalid: " + "; ".join(problems)
                           + grammar)
    seen: set[tuple] = set()
    for spec in specs:
        key = (spec.metric, spec.compensation, spec.schedule)
        if key in seen:
            raise GradmapError(f"method {spec.name!r} repeats an earlier method (same metric, "
                               "compensations and schedule); list each method once")
        seen.add(key)
    return specs
