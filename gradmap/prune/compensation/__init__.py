"""Compensators: repair hidden-state drift after layer removal by changing existing weights only.

`get_compensator(name, **options)` builds one by name; names and their classes are in
`COMPENSATORS`. Each compensator's options are the keyword arguments of its class.
"""
from __future__ import annotations

import inspect
from typing import Any

from gradmap.core.errors import GradmapError
from gradmap.prune.compensation.base import Compensator, NoCompensation, PruneContext
from gradmap.prune.compensation.magnitude import MagnitudeCompensation
from gradmap.prune.compensation.projection import ProjectionCompensation
from gradmap.prune.compensation.replaceme import ReplaceMeCompensation

__all__ = ["COMPENSATORS", "Compensator", "MagnitudeCompensation", "NoCompensation", "ProjectionCompensation",
           "PruneContext", "ReplaceMeCompensation", "get_compensator"]

COMPENSATORS: dict[str, type[Compensator]] = {
    "none": NoCompensation,
    "projection": ProjectionCompensation,   # GradMAP Stage 2 (the default of fast_prune)
    "magnitude": MagnitudeCompensation,     # Prune&Comp
    "replaceme": ReplaceMeCompensation,     # ReplaceMe least squares
}


def _option_names(cls: type[Compensator]) -> list[str]:
    if cls.__init__ is object.__init__:
        return []
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def get_compensator(name: str, **options: Any) -> Compensator:
    """The compensator called `name` ("none", "projection", "magnitude", "replaceme"), built with `options`.

    Unknown names and options raise GradmapError listing the valid ones.
    """
    if not isinstance(name, str) or name not in COMPENSATORS:
        raise GradmapError(f"unknown compensation {name!r}; choose one of {', '.join(COMPENSATORS)} "
                           "(or a list of them, e.g. ['magnitude', 'projection'])")
    cls = COMPENSATORS[name]
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise GradmapError(f"compensation {name!r} has no option(s) {unknown}; its options are "
                           f"{valid if valid else 'none'}")
    return cls(**options)
