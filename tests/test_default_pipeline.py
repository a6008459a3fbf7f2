"""The default pipeline: one definition (gradmap.prune.driver.DEFAULT_PIPELINE) that fast_prune,
`gradmap prune` and its --help all use, and what a partial choice resolves to."""
from __future__ import annotations

import torch

from gradmap.cli.checks import DEFAULT_PIPELINE_NAME
from gradmap.experiments.methods import parse_method
from gradmap.prune.driver import DEFAULT_PIPELINE, default_pipeline_name, fast_prune, resolve_pipeline
from tiny import random_ids, tiny_model


def test_cli_help_names_the_driver_default():
    assert DEFAULT_PIPELINE_NAME == default_pipeline_name() == "auto"
    assert parse_method(default_pipeline_name()).prune_kwargs() == {}  # "auto" is fast_prune's default
    assert parse_method("auto").label == "auto"


def test_partial_choices_keep_what_was_named():
    m, c, s, o = resolve_pipeline(None, None, None, {})
    assert (m, list(c), s, o) == (DEFAULT_PIPELINE["metric"], list(DEFAULT_PIPELINE["compensation"]),
                                  DEFAULT_PIPELINE["schedule"], DEFAULT_PIPELINE["metric_options"])
    assert resolve_pipeline("angular", None, None, {})[0::2] == ("angular", None)  # metric's own schedule
    assert resolve_pipeline(None, "none", "iterative", {})[1:3] == ("none", "iterative")


def test_fast_prune_without_method_options_runs_the_default_and_records_it():
    calib = random_ids(4, 12, seed=3)
    default = tiny_model("llama", n_layers=5, dtype=torch.float64, seed=2)
    explicit = tiny_model("llama", n_layers=5, dtype=torch.float64, seed=2)
    r1 = fast_prune(default, calib, 2, batch_size=2, progress=False)
    chosen = r1.options["auto"]["chosen"]
    r2 = fast_prune(explicit, calib, 2, batch_size=2, progress=False, **parse_method(chosen).prune_kwargs())
    assert r1.options["default_pipeline"] is True and r2.options["default_pipeline"] is False
    assert r1.removed_layers == r2.removed_layers
    for (k, a), b in zip(default.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), k
