"""Method names for `gradmap compare`: `metric[+compensation[+compensation]][@schedule]`.

    gradmap+projection          GradMAP scores, projection compensation, default schedule
    block-influence             ShortGPT's Block Influence, no compensation
    angular+replaceme@one-shot  angular distance, ReplaceMe, one-shot schedule
    gradmap+magnitude+projection  two compensators, applied in the order written
    gradmap(verify=4)+magnitude   metric options in brackets, key=value, Python literals
    gradmap+projection(per_gap=True,top_m=0)   compensator options likewise
    block-influence+replaceme(each_step=True)@iterative   fold after every removal, then re-score

A bare metric means no compensation (`+none` says the same explicitly). Without a
`@schedule` suffix the schedule is the metric's default, as in `fast_prune(schedule=None)`
(one-shot for `gradmap`, iterative for the others that support it, else the metric's only
schedule: `ppl` is one-shot, `sleb` iterative);
the parsed spec always names the schedule it resolved to. `+heal` or `+heal(key=value, ...)`
anywhere after the metric (also `auto+heal`) heals the pruned model (`fast_prune(heal=...)`,
options of `gradmap.healing.HealOptions`, e.g. `gradmap+projection+heal(train='lora',steps=64)`). Valid metric names come from
the metrics registry and valid compensation names from the compensation registry, so a
new entry there is a valid method here at once. Options are checked by building the metric
or compensator (`get_metric` / `get_compensator`), so an unknown option or a bad value fails
at parse time with the metric's own message, which names the valid options.
`method_from_result` writes the method string, every option spelled out, that reruns a
recorded `PruneResult`.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gradmap.core.errors import GradmapError
from gradmap.prune.pipeline import AUTO

__all__ = ["MethodSpec", "parse_method", "parse_methods", "split_methods", "valid_metrics",
           "valid_compensations", "metric_schedules", "method_from_result", "format_method",
           "SCHEDULES", "DEFAULT_SCHEDULE"]

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
    `metric_options` holds (key, value) pairs; `compensation_options` one such tuple per
    compensation (empty tuple: that compensation's defaults, or none given at all).
    """

    name: str
    metric: str
    compensation: tuple[str, ...]
    schedule: str = DEFAULT_SCHEDULE
    metric_options: tuple[tuple[str, Any], ...] = ()
    compensation_options: tuple[tuple[tuple[str, Any], ...], ...] = ()
    heal: tuple[tuple[str, Any], ...] | None = None  # `+heal(...)` options; None: no healing

    @property
    def label(self) -> str:
        """The name with its schedule spelled out (`block-influence@iterative`)."""
        return self.name if "@" in self.name or self.metric == AUTO else f"{self.name}@{self.schedule}"

    def prune_kwargs(self) -> dict:
        """Keyword arguments for `fast_prune` (metric, compensation, schedule, metric options).

        A compensation with options is passed as a freshly built Compensator (compensators
        keep per-run state), one without as its name. "auto" passes nothing: the default.
        """
        healing = {} if self.heal is None else {"heal": dict(self.heal)}
        if self.metric == AUTO:
            return healing
        comps: list[Any] = list(self.compensation)
        if any(self.compensation_options):
            from gradmap.prune.compensation import get_compensator
            comps = [get_compensator(c, **dict(o)) if o else c
                     for c, o in zip(self.compensation, self.compensation_options)]
        comp = comps[0] if len(comps) == 1 else comps
        return {"metric": self.metric, "compensation": comp, "schedule": self.schedule,
                **dict(self.metric_options), **healing}


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside brackets and quotes (options may hold commas or tuples)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def split_methods(text: str) -> list[str]:
    """A comma-separated method list split into names; commas inside `(...)` do not split."""
    return [n.strip() for n in _split_top(text, ",") if n.strip()]


def _frozen(value: Any) -> Any:
    # lists become tuples so a spec stays hashable (methods are deduplicated by value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _options(text: str, part: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """`name(k=v, ...)` -> (name, ((k, v), ...)); values are Python literals."""
    name, bracket, rest = part.partition("(")
    name = name.strip()
    if not bracket:
        return name, ()
    if not rest.endswith(")"):
        raise GradmapError(f"method {text!r}: options of {name!r} must end with ')', e.g. "
                           "gradmap(verify=4)+magnitude")
    items, seen = [], set()
    for item in filter(str.strip, _split_top(rest[:-1], ",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        try:
            if not eq or not key.isidentifier():
                raise ValueError
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, RecursionError, MemoryError):  # e.g. 5000 nested '-'s
            raise GradmapError(f"method {text!r}: option {item.strip()!r} of {name!r} is not "
                               "key=value with a Python literal value, e.g. verify=4, "
                               "gradient='token', per_gap=True") from None
        if key in seen:
            raise GradmapError(f"method {text!r}: option {key!r} of {name!r} is given twice")
        seen.add(key)
        items.append((key, _frozen(parsed)))
    return name, tuple(items)


def _check_options(text: str, metric: str, metric_options: tuple,
                   comps: list[str], comp_options: list[tuple]) -> None:
    """Build the configured metric and compensators: their own errors name valid options."""
    try:
        if metric_options:
            from gradmap.prune.metrics import get_metric
            get_metric(metric, **dict(metric_options))
        for comp, opts in zip(comps, comp_options):
            if opts:
                if comp == "none":
                    raise GradmapError("'none' takes no options")
                from gradmap.prune.compensation import get_compensator
                get_compensator(comp, **dict(opts))
    except (GradmapError, TypeError, ValueError) as exc:
        raise GradmapError(f"method {text!r}: {exc}") from None


def _grammar(metrics: list[str], compensations: list[str]) -> str:
    return (f"write methods as metric[(key=value,...)][+compensation[(key=value,...)]...]"
            f"[@{'|@'.join(SCHEDULES)}], e.g. gradmap+projection, gradmap(verify=4)+magnitude "
            f"or angular+replaceme@one-shot, or {AUTO} (the default); valid metrics: "
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
    body, heal = _heal_part(text)
    if body == AUTO:  # the default: the best of the candidate pipelines on held-out rows
        return MethodSpec(name=text, metric=AUTO, compensation=(AUTO,), schedule=AUTO, heal=heal)
    spec = _parse_pipeline(text, body, metrics, compensations, schedules)
    return spec if heal is None else MethodSpec(**{**spec.__dict__, "heal": heal})


def _heal_part(text: str) -> tuple[str, tuple[tuple[str, Any], ...] | None]:
    """(the method without its `+heal(...)` part, the heal options or None); options checked."""
    body, *tail = _split_top(text, "@")
    parts = _split_top(body, "+")
    heals = [p for p in parts[1:] if p.partition("(")[0].strip() == "heal"]
    if not heals:
        return text, None
    if len(heals) > 1:
        raise GradmapError(f"method {text!r} names heal twice; name it once, e.g. +heal(train='lora')")
    _, options = _options(text, heals[0])
    try:
        from gradmap.healing.options import check_before_pruning, heal_options
        check_before_pruning(heal_options(dict(options)))
    except (GradmapError, TypeError, ValueError) as exc:
        raise GradmapError(f"method {text!r}: {exc}") from None
    rest = "+".join(p for p in parts if p is not heals[0])
    return "@".join([rest, *tail]), options


def _parse_pipeline(text: str, name: str, metrics: list[str], compensations: list[str],
                    schedules: dict[str, tuple[str, ...]]) -> MethodSpec:
    """`name` (the method without +heal) parsed; errors quote the whole method `text`."""
    body, *tail = _split_top(name, "@")
    at, schedule = bool(tail), "@".join(tail)
    if at and schedule not in SCHEDULES:
        raise GradmapError(f"method {text!r}: unknown schedule {schedule!r}; "
                           + _grammar(metrics, compensations))
    metric, *comps = _split_top(body, "+")
    metric, metric_options = _options(text, metric)
    parsed = [_options(text, c) for c in comps]
    comps = [c for c, _ in parsed]
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
    comp_options = [o for _, o in parsed]
    _check_options(text, metric, metric_options, comps, comp_options)
    return MethodSpec(name=text, metric=metric, compensation=tuple(comps) or ("none",),
                      schedule=schedule, metric_options=metric_options,
                      compensation_options=tuple(comp_options) if any(comp_options) else ())


def parse_methods(names: str | Iterable[str], metrics: Iterable[str] | None = None,
                  compensations: Iterable[str] | None = None,
                  schedules: dict[str, tuple[str, ...]] | None = None) -> list[MethodSpec]:
    """Parse a comma-separated string (or a list) of method names, all before any work is done."""
    items = split_methods(names) if isinstance(names, str) else [str(n).strip() for n in names]
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
        key = (spec.metric, spec.compensation, spec.schedule, spec.metric_options,
               spec.compensation_options, spec.heal)
        if key in seen:
            raise GradmapError(f"method {spec.name!r} repeats an earlier method (same metric, "
                               "compensations, schedule and options); list each method once")
        seen.add(key)
    return specs


def _literal(value: Any) -> str:
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)


def format_method(metric: str, compensation: Iterable[str], schedule: str,
                  metric_options: dict[str, Any] | None = None,
                  compensation_options: dict[str, dict[str, Any]] | None = None) -> str:
    """The method string for a pipeline, options written in sorted key order."""
    def with_options(name: str, opts: dict[str, Any] | None) -> str:
        if not opts:
            return name
        return f"{name}({','.join(f'{k}={_literal(v)}' for k, v in sorted(opts.items()))})"

    parts = [with_options(metric, metric_options)]
    parts += [with_options(c, (compensation_options or {}).get(c))
              for c in compensation if c != "none"]
    return "+".join(parts) + f"@{schedule}"


def method_from_result(result: dict[str, Any]) -> str:
    """The method string, every recorded option value spelled out, that reruns a PruneResult.

    `result` is `PruneResult.to_dict()` (or a report.json). Metric options are the recorded
    options that are fields of the metric; compensator options come from
    `options["compensation_options"]` (recorded by fast_prune).
    """
    import dataclasses

    from gradmap.prune.metrics import METRICS
    metric, options = result["metric"], result.get("options") or {}
    cls = METRICS.get(metric)
    fields = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    metric_options = {k: options[k] for k in fields if k in options}
    method = format_method(metric, result.get("compensation") or ["none"], result["schedule"],
                           metric_options, options.get("compensation_options"))
    heal = (result.get("heal") or {}).get("options")
    if not heal:
        return method
    pipeline, _, schedule = method.rpartition("@")
    return f"{pipeline}+heal({','.join(f'{k}={_literal(v)}' for k, v in sorted(heal.items()))})@{schedule}"
