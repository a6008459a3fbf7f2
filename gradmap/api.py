"""The public API: entry points plus typed option objects, alongside the string forms.

    from gradmap.api import GradMAP, Magnitude, Projection
    gradmap.fast_prune(model, calib, 8, metric=GradMAP(verify=4),
                       compensation=[Magnitude(), Projection(per_gap=True)])

is the same call as ``fast_prune(model, calib, 8, metric="gradmap", verify=4,
compensation=["magnitude", ProjectionCompensation(per_gap=True)])``. Metric option objects are
the metric dataclasses themselves (validated on construction); compensator option objects are
the compensator classes. ``Magnitude`` here is Prune&Comp's magnitude compensation; the
weight-magnitude layer metric is ``WeightMagnitude``.
"""
from __future__ import annotations

from gradmap.core.calibration import calibration_data
from gradmap.core.checkpoint import save_pretrained
from gradmap.core.gguf_export import export_gguf
from gradmap.core.models import load_model
from gradmap.core.result import PruneResult
from gradmap.core.surgery import original_layer_ids, remove_layers
from gradmap.healing import HealOptions, HealReport, heal
from gradmap.prune.compensation import MagnitudeCompensation as Magnitude
from gradmap.prune.compensation import NoCompensation
from gradmap.prune.compensation import ProjectionCompensation as Projection
from gradmap.prune.compensation import ReplaceMeCompensation as ReplaceMe
from gradmap.prune.driver import fast_prune
from gradmap.prune.metrics import PPL, SLEB, Angular, BlockInfluence, GradMAP, Taylor
from gradmap.prune.metrics import Magnitude as WeightMagnitude
from gradmap.sparsity.sparsify import SparsifyResult, sparsify

__all__ = [
    "fast_prune", "sparsify", "remove_layers", "save_pretrained", "load_model", "original_layer_ids",
    "calibration_data",
    "export_gguf", "heal", "HealOptions", "HealReport",
    "PruneResult", "SparsifyResult",
    "GradMAP", "BlockInfluence", "Angular", "Taylor", "PPL", "SLEB", "WeightMagnitude",
    "Magnitude", "Projection", "ReplaceMe", "NoCompensation",
]
