"""Where gradmap may write: never over or into an input, a system or home folder, or another
output of the same command; and `--overwrite` replaces only a folder gradmap wrote itself.

`gradmap prune --out <folder holding the model> --overwrite` used to delete the model (issue 25).
Every check reads paths only, so the commands run them before loading anything.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gradmap.core.errors import GradmapError

__all__ = ["MARKER", "FORCE", "FORCE_FLAG", "check_location", "check_not_input", "check_apart", "input_paths",
           "check_overwrite_mode", "replaceable", "check_finite", "model_sources"]

# An empty file in every folder gradmap writes as an output; `--overwrite` replaces only those.
MARKER = ".gradmap-output"
FORCE = "force"  # overwrite=FORCE also replaces a folder without the marker
FORCE_FLAG = "--force-overwrite"

# nothing is written anywhere inside these (pseudo file systems, the OS itself)
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib32",
                 "/lib64", "/usr", "/System", "/Library", "/Applications")
# these are never replaced themselves; their sub-folders are fine (/tmp/run1)
_SYSTEM_DIRS = ("/", "/home", "/root", "/tmp", "/var", "/opt", "/srv", "/mnt", "/media", "/run",
                "/Users", "/private", "/Volumes")


def check_overwrite_mode(overwrite) -> None:
    if not (overwrite is False or overwrite is True or overwrite == FORCE):
        raise GradmapError(f"overwrite must be False, True (replace a folder gradmap wrote) or "
                           f"{FORCE!r} (replace any folder); got {overwrite!r}")


def _forms(path) -> set[Path]:
    """The path as written (absolute) and with every symlink resolved: a check must hold for both."""
    text = os.path.expanduser(os.fspath(path))
    return {Path(os.path.abspath(text)), Path(text).resolve()}


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_location(path, what: str) -> None:
    """Refuse a path in a system tree, or one that is a system, home or existing top-level folder."""
    home = Path.home().resolve()
    for p in _forms(path):
        tree = next((t for t in _SYSTEM_TREES if _relation(p, Path(t)) in ("is", "lies inside")), None)
        if tree is not None:
            raise GradmapError(f"the {what} {os.fspath(path)!r} is in the system folder {tree}, where "
                               "gradmap writes nothing; choose a folder under your home or work folder")
        if (str(p) in _SYSTEM_DIRS or p == home or p in home.parents
                or str(p.parent) in ("/home", "/Users") or (len(p.parts) == 2 and p.exists())):
            raise GradmapError(f"the {what} {os.fspath(path)!r} is a system, home or top-level folder, "
                               "which gradmap never replaces; pass a new sub-folder of it, e.g. "
                               f"{str(p / 'pruned-model')!r}")


def check_not_input(path, inputs: Iterable, what: str) -> None:
    """Refuse an output that is, contains or lies inside an input file or folder."""
    for inp in inputs:
        for p in _forms(path):
            for i in _forms(inp):
                rel = _relation(p, i)
                if rel is not None:
                    raise GradmapError(f"the {what} {os.fspath(path)!r} {rel} the input "
                                       f"{os.fspath(inp)!r}; gradmap never writes over or into its "
                                       "inputs, choose an output folder outside them")


def check_apart(outputs: dict) -> None:
    """Refuse two outputs of one command that are the same path or nested (one replaces the other)."""
    items = [(flag, p) for flag, p in outputs.items() if p is not None]
    for n, (fa, a) in enumerate(items):
        for fb, b in items[n + 1:]:
            rel = next((r for x in _forms(a) for y in _forms(b) if (r := _relation(x, y))), None)
            if rel is not None:
                raise GradmapError(f"{fa} {os.fspath(a)!r} {rel} {fb} {os.fspath(b)!r}, so writing one "
                                   "would replace the other; give them separate paths, side by side")


def replaceable(out: Path, overwrite) -> str | None:
    """Why the existing non-empty folder `out` may not be replaced, or None when it may."""
    if not overwrite:
        return "exists and is not empty; choose a new directory or pass overwrite=True (--overwrite)"
    if overwrite != FORCE and not (out / MARKER).is_file():
        return (f"was not written by gradmap (it has no {MARKER} file), so --overwrite keeps it; "
                f"choose a new directory, or pass {FORCE_FLAG} (overwrite={FORCE!r}) to replace it")
    return None


def input_paths(model=None, data: Iterable = ()) -> list[Path]:
    """The local files and folders a command reads: the model (folder, .gguf file or cached hub
    snapshot) and data files; a named data set (c4, wikitext2) stands for the shared data folder."""
    from gradmap.core.calibration import NAMED_SOURCES, data_dir
    out: list[Path] = []
    if model is not None:
        from gradmap.core.models import resolve_model_path
        try:
            source, gguf_file = resolve_model_path(model)
        except GradmapError:  # a missing model is reported where the command checks it
            source, gguf_file = None, None
        if source is None:
            pass
        elif gguf_file is not None:
            out.append(Path(source, gguf_file))
        elif os.path.isdir(source):
            out.append(Path(source))
        else:  # a hub id: its cached snapshot, if any
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(source, "config.json")
            if isinstance(cached, str):
                out.append(Path(cached).parent)
    for item in data:
        if item is None:
            continue
        text = os.fspath(item)
        if text in NAMED_SOURCES:
            root = data_dir()
            if root is not None:
                out.append(Path(root))
        elif os.path.exists(os.path.expanduser(text)):
            out.append(Path(os.path.expanduser(text)))
    return out


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse to write weights holding NaN or infinity: such a file looks fine until it is used."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise GradmapError(f"weight {name} holds NaN or infinite values, so no {what} was "
                                   "written; an option produced them (e.g. a huge ridge): rerun with "
                                   "its default, or with the safeguards on")


def model_sources(model: nn.Module) -> list[str]:
    """The local folder or .gguf file `model` was loaded from, which its save must not replace."""
    from gradmap.core.models import GGUF_SOURCE_ATTR
    found = [getattr(model, GGUF_SOURCE_ATTR, None),
             getattr(getattr(model, "config", None), "_name_or_path", None)]
    return [s for s in found if isinstance(s, str) and s and os.path.exists(os.path.expanduser(s))]
