"""Checks `gradmap compare` runs before loading anything, and which results folder it may reuse."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["check_before_loading", "unfinished_run", "open_results_dir"]


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
        from gradmap.cli.checks import check_context
        from gradmap.cli.speed import speed_lengths
        check_context(cfg.model, {"--seq-len": cfg.seq_len, "--ppl-seq-len": cfg.ppl_seq_len,
                                  **speed_lengths(cfg.speed)})
        from gradmap.core.config_checks import check_family
        check_family(cfg.model)


def open_results_dir(out_dir, cfg, default_loader: bool) -> tuple[Path, int | None]:
    """Check every output of a compare run against its inputs and each other, create `out_dir`
    and lock it for this run: (the folder, a descriptor to close when the run ends).

    A second run to the same folder while this one holds the lock is refused, and one that got
    the lock after another finished finds its results and is refused too (without --overwrite).
    """
    from gradmap.core.checkpoint import make_parents, prepare_output_dir
    from gradmap.core.errors import GradmapError
    from gradmap.core.output_paths import MARKER, check_apart, input_paths

    check_apart({"--out": out_dir, "--save": cfg.save_dir, "--save-gguf": cfg.save_gguf})
    inputs = input_paths(cfg.model if default_loader else None, [cfg.calib, cfg.ppl_data])
    reuse = cfg.overwrite or unfinished_run(out_dir)
    out = prepare_output_dir(out_dir, reuse, inputs)
    if cfg.save_dir is not None:
        prepare_output_dir(cfg.save_dir, cfg.overwrite, inputs)
    make_parents(out)
    out.mkdir(exist_ok=True)
    fd = os.open(out / MARKER, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return out, fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise GradmapError(f"another gradmap run is writing to {str(out)!r}; wait for it to finish "
                           "or choose another --out") from None
    if (out / "results.json").exists() and not (cfg.overwrite or unfinished_run(out)):
        os.close(fd)
        raise GradmapError(f"results folder {str(out)!r} was filled by another run meanwhile; "
                           "nothing was replaced. Choose another --out or pass --overwrite")
    return out, fd
