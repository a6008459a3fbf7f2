"""The output side every GGUF export shares: checking the target path, and the atomic write."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from gguf import GGUFWriter

from gradmap.core.errors import GradmapError

__all__ = ["check_gguf_target", "write_gguf"]


def check_gguf_target(path, overwrite: bool) -> Path:
    """The output file: a new (or, with `overwrite`, existing) `.gguf` file in an existing folder."""
    path = Path(path).expanduser()
    if path.suffix != ".gguf":
        raise GradmapError(f"GGUF output {str(path)!r} must end in .gguf, e.g. pruned.gguf")
    if path.is_dir():
        raise GradmapError(f"GGUF output {str(path)!r} is a directory; pass a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise GradmapError(f"GGUF output {str(path)!r} exists; choose a new file or pass overwrite=True "
                           "(--overwrite)")
    if not path.resolve().parent.is_dir():
        raise GradmapError(f"the folder of GGUF output {str(path)!r} does not exist; create it first")
    return path


def write_gguf(path: Path, arch: str, fill, alignment: int | None = None) -> None:
    """Write `path` atomically: `fill(writer)` adds keys and tensors to a writer on a temporary sibling,
    which is fsynced and renamed over `path` only when complete; on any failure it is removed and an
    existing `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.gradmap-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    writer = GGUFWriter(tmp, arch)
    if alignment is not None:
        writer.data_alignment = alignment
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for f in writer.fout or []:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, path)
    except OSError as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise GradmapError(f"writing GGUF {str(path)!r} failed ({exc.strerror or exc}); nothing was "
                           "written") from None
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
