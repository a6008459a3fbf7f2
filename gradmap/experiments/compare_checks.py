"""Checks `gradmap compare` runs before loading anything, and which results folder it may reuse."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["check_before_loading", "unfinished_run"]


def unfinished_run(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds the results of a compare that failed or was interrupted.

    Such a folder is replaced without --overwrite: nothing in it is worth keeping over a rerun.
    A run that was killed outright still says "running" and needs --overwrite, since it cannot
    be told apart from one that is still going.
    """
    try:
        status = json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(status, str) and (status.startswith("aborted") or status == "interrupted")


def check_before_loading(cfg, default_loader: bool) -> None:
    """Data files, device and (for the default loader) the layer count, before anything loads."""
    from gradmap.core.calibration import check_source
    from gradmap.core.model_checks import check_device, check_dtype
    from gradmap.evaluate.perplexity import check_text
    from gradmap.evaluate.tasks import check_task_files

    check_source(cfg.calib, "--calib")
    check_text(cfg.ppl_data, "--ppl-data")
    if cfg.tasks:
        check_task_files(cfg.tasks)
    check_dtype(cfg.dtype)
    check_device(cfg.device)
    if default_loader:  # a custom loader may load anything; its model is checked once loaded
        from gradmap.core.models import model_layer_ids
        from gradmap.prune.driver import check_prune_plan
        ids = model_layer_ids(cfg.model)
        if ids is not None:
            check_prune_plan(ids, cfg.n_prune, cfg.protect_first, cfg.protect_last)
