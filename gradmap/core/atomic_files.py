"""Single files and folders written safely: temporary siblings, a lock on the parent, stale
leftovers of killed writers removed, one-line errors. Shared by the checkpoint and GGUF writers."""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gradmap.core.errors import GradmapError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the re-check before the rename still runs
    fcntl = None

__all__ = ["writable_ancestor", "make_parents", "work_file", "place_file", "write_error", "clean_stale", "dir_lock",
           "current_umask"]

# Work folders are siblings of the target named `.<target>.gradmap-<kind>-<pid>-<random>`, so a
# later save can tell gradmap's own leftovers from anything else and whether their writer lives.
_WORK_RE = r"\.{name}\.gradmap-(tmp|old)-(\d+)-[0-9a-f]+$"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def writable_ancestor(path: Path, what: str) -> Path:
    """The nearest existing folder above `path`, probed for writing: missing parents of an output
    are created when it is written (`make_parents`), so `--out runs/p8` works without `runs/`."""
    base = path.resolve().parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise GradmapError(f"{str(base)!r} on the path of the {what} {str(path)!r} is a file, not a "
                           "folder; choose another path")
    try:  # a real write probe: os.access() says yes to root even on read-only mounts
        tempfile.TemporaryDirectory(dir=base).cleanup()
    except OSError as exc:
        raise GradmapError(f"cannot write into {str(base)!r} ({exc.strerror}); choose a writable "
                           f"location for the {what}") from None
    return base


def make_parents(path: Path) -> Path:
    """Create the missing folders above `path` (mode per the umask); its parent, resolved."""
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return parent


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def work_file(path: Path) -> Path:
    """A temporary sibling for writing `path`, named like the checkpoint work folders so the next
    write to `path` removes it when its writer was killed; missing parent folders are created."""
    parent = make_parents(path)
    with dir_lock(parent):
        clean_stale(path, parent)
    return parent / f".{path.name}.gradmap-tmp-{os.getpid()}-{secrets.token_hex(4)}"


def place_file(tmp: Path, path: Path, overwrite: bool, what: str = "file") -> None:
    """Rename the finished `tmp` to `path` under the parent's lock; without `overwrite`, a file
    another process put at `path` meanwhile is kept (of two writers exactly one wins)."""
    with dir_lock(tmp.parent):
        if path.exists() and not overwrite:
            raise GradmapError(f"{what} {str(path)!r} was written by another process meanwhile; "
                               "nothing was replaced. Choose a new file or pass --overwrite")
        os.replace(tmp, path)


@contextmanager
def dir_lock(parent: Path):
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(out: Path, parent: Path) -> None:
    """Remove work folders of dead saves to `out`; call with the parent's lock held."""
    pattern = re.compile(_WORK_RE.format(name=re.escape(out.name)))
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        try:
            if m.group(1) == "old" and not out.exists() and (entry / "old").is_dir():
                os.rename(entry / "old", out)  # killed between the two renames: restore it
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:  # a single-file output's (GGUF, JSON) temporary file
                entry.unlink()
        except OSError:  # e.g. a read-only parent; the write probe then reports the real problem
            pass


def write_error(target: Path, exc: BaseException) -> GradmapError:
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in _DISK_FULL or "No space left" in text or "StorageFull" in text:
        return GradmapError(f"the disk holding {str(target)!r} is full; nothing was written. Free "
                            "some space or choose an output folder on another disk")
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return GradmapError(f"writing {str(target)!r} failed ({reason}); nothing was written")
