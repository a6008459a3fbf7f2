"""Saving pruned models as plain Hugging Face checkpoints, atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from gradmap.core import distributed
from gradmap.core.errors import GradmapError

__all__ = ["save_pretrained", "prepare_output_dir"]


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that `out_dir` may be written; raise a clear error before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GradmapError(f"output path {str(out)!r} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GradmapError(f"output directory {str(out)!r} exists and is not empty; choose a new "
                           "directory or pass overwrite=True (--overwrite)")
    parent = out.resolve().parent
    if not parent.exists():
        raise GradmapError(f"parent directory {str(parent)!r} of the output does not exist; create it first")
    try:  # a real write probe: os.access() says yes to root even on read-only mounts
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise GradmapError(f"cannot write into {str(parent)!r} ({exc.strerror}); choose a writable "
                           "output directory") from None
    return out


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                    report: dict[str, Any] | None = None, overwrite: bool = False,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write safetensors weights, config, tokenizer and `report.json` to `out_dir` atomically.

    Everything is written into a temporary sibling directory that is renamed
    into place only when complete, so a failure never leaves a half-written
    output. The result loads with plain `AutoModelForCausalLM.from_pretrained`.

    Under torch.distributed only rank 0 writes; every rank returns the path after a barrier,
    so the checkpoint is complete when any rank returns (identical weights on all ranks are
    `fast_prune` / `sparsify`'s guarantee).
    """
    if not distributed.is_main():
        distributed.barrier()
        return Path(out_dir)
    try:
        return _save(model, tokenizer, out_dir, report, overwrite, extra_files)
    finally:  # also on error, so the other ranks are not left waiting
        distributed.barrier()


def _save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict[str, Any] | None,
          overwrite: bool, extra_files: dict[str, bytes] | None) -> Path:
    out = prepare_output_dir(out_dir, overwrite)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, backup / "old")
            os.rename(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
