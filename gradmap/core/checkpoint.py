"""Saving pruned models as plain Hugging Face checkpoints, atomically."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.core.legacy_config import add_legacy_keys
from gradmap.core.output_paths import (MARKER, check_finite, model_sources, check_location, check_not_input, check_overwrite_mode,
                                       replaceable)
from gradmap.core.result import json_text
from gradmap.core.atomic_files import (clean_stale, dir_lock, current_umask, make_parents, place_file, work_file,
                                        writable_ancestor, write_error)

__all__ = ["save_pretrained", "prepare_output_dir", "check_output_path", "write_file_atomic",
           "check_finite", "model_sources", "writable_ancestor", "make_parents", "work_file", "place_file",
           "write_error"]


def check_output_path(out_dir: str | os.PathLike, what: str = "output directory") -> Path:
    """Refuse output paths that would replace the working directory, a system or home folder."""
    text = os.fspath(out_dir)
    if not text.strip():
        raise GradmapError(f"the {what} is empty; pass a folder name, e.g. --out pruned-model")
    resolved = Path(text).expanduser().resolve()
    if resolved == Path(resolved.anchor):
        raise GradmapError(f"the {what} {text!r} is the filesystem root; pass a new sub-folder")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise GradmapError(f"the {what} {text!r} is the current directory or one above it, which "
                           "cannot be replaced; pass a new sub-folder, e.g. --out pruned-model")
    check_location(text, what)
    return Path(text).expanduser()


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool | str = False,
                       inputs=()) -> Path:
    """Check that `out_dir` may be written; raise a clear error before any work is done.

    `out_dir` must not be, contain or lie inside any of `inputs` (files or folders the command
    reads). An existing non-empty folder is replaced only with `overwrite`, and only when gradmap
    wrote it (its marker file), unless `overwrite="force"`. Also removes the work folders a killed gradmap save left next to `out_dir` (see
    `save_pretrained`), so they neither pile up nor hide a checkpoint that should be back.
    """
    check_overwrite_mode(overwrite)
    out = check_output_path(out_dir)
    check_not_input(out, inputs, "output directory")
    parent = out.resolve().parent
    if parent.is_dir():
        with dir_lock(parent):
            clean_stale(out, parent)
    if out.exists() and not out.is_dir():
        raise GradmapError(f"output path {str(out)!r} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and (why := replaceable(out, overwrite)):
        raise GradmapError(f"output directory {str(out)!r} {why}")
    writable_ancestor(out, "output directory")
    return out


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling, so `path` is never left half-written."""
    path = Path(path)
    tmp = work_file(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        place_file(tmp, path, overwrite=True)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                    report: dict[str, Any] | None = None, overwrite: bool | str = False,
                    extra_files: dict[str, bytes] | None = None,
                    gguf: str | os.PathLike | None = None, gguf_dtype: str | None = None) -> Path:
    """Write safetensors weights, config, tokenizer and `report.json` to `out_dir` atomically.

    Everything is written into a temporary sibling directory that is renamed
    into place only when complete, so a failure never leaves a half-written
    output. Missing parent folders are created. The folder gets a marker file, so a later
    `overwrite=True` may replace it; a folder without one needs `overwrite="force"`; the folder
    (or .gguf) the model was loaded from is never replaced. Weights holding NaN or infinity are
    refused. The final rename holds a lock on the parent directory and re-checks the target,
    so of two concurrent saves to one new folder without `overwrite` exactly one succeeds.
    Work folders left by a killed save are removed by the next save to the same target
    (a replaced checkpoint whose new copy never landed is put back first).
    Files get the umask's mode. The result loads with plain `AutoModelForCausalLM.from_pretrained`.

    With `gguf`, the model is also written there by `export_gguf` (from its GGUF source, else
    converted), with `gguf_dtype` as its `dtype` (default "source"; checked before anything is written).

    Under torch.distributed only rank 0 writes; every rank returns the path after a barrier,
    so the checkpoint is complete when any rank returns (identical weights on all ranks are
    `fast_prune` / `sparsify`'s guarantee).
    """
    if not distributed.is_main():
        distributed.barrier()
        return Path(out_dir)
    try:
        if gguf is not None:
            from gradmap.core.gguf_export import check_gguf_dtype  # imports gguf: only when asked
            check_gguf_dtype(gguf_dtype or "source")
        elif gguf_dtype is not None:
            raise GradmapError(f"gguf_dtype={gguf_dtype!r} sets the type of the GGUF file's changed "
                               "tensors; pass gguf='FILE.gguf' too (or drop gguf_dtype)")
        out = _save(model, tokenizer, out_dir, report, overwrite, extra_files)
        if gguf is not None:
            from gradmap.core.gguf_export import export_gguf
            export_gguf(model, tokenizer, gguf, dtype=gguf_dtype or "source", overwrite=overwrite)
        return out
    finally:  # also on error, so the other ranks are not left waiting
        distributed.barrier()


def _check_extra_files(extra_files: dict[str, bytes] | None) -> None:
    for name in extra_files or {}:
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
                or (os.altsep and os.altsep in name):
            raise GradmapError(f"extra file name {name!r} is not a plain file name; names must not "
                               "contain folders or '..' (the files go into the output folder)")
        if name in (MARKER, "report.json"):
            raise GradmapError(f"extra file name {name!r} is a file save_pretrained writes itself; "
                               "pick another name")


def _work_dir(out: Path, parent: Path, kind: str) -> Path:
    path = parent / f".{out.name}.gradmap-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(path)  # default mode 0o777 minus the umask, like any folder the user creates
    return path


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _is_write_failure(exc: BaseException) -> bool:
    # safetensors wraps the OS error of a failed write in its own exception type
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def _save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict[str, Any] | None,
          overwrite: bool, extra_files: dict[str, bytes] | None) -> Path:
    _check_extra_files(extra_files)
    out = prepare_output_dir(out_dir, overwrite, inputs=model_sources(model))
    check_finite(model, "checkpoint")
    parent = make_parents(out)
    need, free = _state_bytes(model), shutil.disk_usage(parent).free
    if need > free:
        raise GradmapError(f"the weights need about {need / 2**30:.2f} GiB but only "
                           f"{free / 2**30:.2f} GiB are free in {str(parent)!r}; free some space or "
                           "choose an output folder on another disk")
    tmp = _work_dir(out, parent, "tmp")
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            add_legacy_keys(tmp)  # so transformers 4.x, still claimed, loads the same model
            if report is not None:
                (tmp / "report.json").write_text(json_text(report))
            for name, data in (extra_files or {}).items():
                try:
                    with open(tmp / name, "xb") as f:
                        f.write(data)
                except FileExistsError:
                    raise GradmapError(f"extra file {name!r} would replace a file of the checkpoint "
                                       "itself; pick another name") from None
            (tmp / MARKER).write_text("written by gradmap; `--overwrite` may replace this folder\n")
            mode = 0o666 & ~current_umask()  # some writers create 0600 temporary files and rename them
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, mode)
        except Exception as exc:
            if _is_write_failure(exc):
                raise write_error(out, exc) from None
            raise
        with dir_lock(parent):
            _move_into_place(tmp, out, parent, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path, parent: Path, overwrite: bool) -> None:
    """The final rename; the parent's lock is held, so the target cannot change meanwhile."""
    if out.exists() and not out.is_dir():
        raise GradmapError(f"output path {str(out)!r} appeared as a file while saving; nothing was "
                           "replaced. Choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GradmapError(f"output directory {str(out)!r} was filled by another process while "
                               "this one was saving; nothing was replaced. Save to a new folder "
                               "or pass overwrite=True (--overwrite)")
        if why := replaceable(out, overwrite):
            raise GradmapError(f"output directory {str(out)!r} {why}")
        backup = _work_dir(out, parent, "old")
        os.rename(out, backup / "old")
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup / "old", out)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
        return
    if out.is_dir():  # rename() silently replaces an empty folder; make that explicit
        os.rmdir(out)
    os.rename(tmp, out)
