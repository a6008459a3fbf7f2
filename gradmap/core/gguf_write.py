"""The output side every GGUF export shares: checking the target path, and the atomic write."""
from __future__ import annotations

import os
from pathlib import Path

from gguf import GGUFWriter

from gradmap.core.atomic_files import place_file, work_file, writable_ancestor, write_error
from gradmap.core.errors import GradmapError
from gradmap.core.output_paths import check_location, check_not_input

__all__ = ["check_gguf_target", "write_gguf"]


def check_gguf_target(path, overwrite: bool, inputs=()) -> Path:
    """The output file: a new (or, with `overwrite`, existing) `.gguf` file in a writable place,
    not one of the `inputs` or inside one; missing folders are created when it is written."""
    path = Path(path).expanduser()
    check_location(path, "GGUF output")
    check_not_input(path, inputs, "GGUF output")
    if path.suffix != ".gguf":
        raise GradmapError(f"GGUF output {str(path)!r} must end in .gguf, e.g. pruned.gguf")
    if path.is_dir():
        raise GradmapError(f"GGUF output {str(path)!r} is a directory; pass a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise GradmapError(f"GGUF output {str(path)!r} exists; choose a new file or pass overwrite=True "
                           "(--overwrite)")
    writable_ancestor(path, "GGUF output")
    return path


def write_gguf(path: Path, arch: str, fill, alignment: int | None = None, overwrite: bool = False) -> None:
    """Write `path` atomically: `fill(writer)` adds keys and tensors to a writer on a temporary sibling,
    which is fsynced and renamed over `path` only when complete; on any failure it is removed and an
    existing `path` is left as it was. The checkpoint writer's path: the temporary file of a killed
    export is removed by the next one, and of two exports to one new file exactly one wins."""
    tmp = work_file(path)
    writer = None
    try:
        writer = GGUFWriter(tmp, arch)
        if alignment is not None:
            writer.data_alignment = alignment
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for f in writer.fout or []:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        place_file(tmp, path, overwrite, "GGUF output")
    except OSError as exc:
        _close(writer, tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _close(writer, tmp)
        raise


def _close(writer, tmp: Path) -> None:
    if writer is not None:
        writer.close()
    tmp.unlink(missing_ok=True)
