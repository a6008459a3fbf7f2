"""Loader for the optional C++/CUDA extension ``gradmap._C`` (fails soft).

``extension()`` returns the compiled module or None, with the reason kept in
``extension_status()``. The module built by ``setup.py`` is tried first; with
GRADMAP_JIT_EXT=1 (or ``jit_build()``), a missing module is compiled just in
time from csrc/ with ``torch.utils.cpp_extension.load`` (ninja; ~1 min on CPU)
into a cache directory (GRADMAP_EXT_BUILD_DIR, default
``~/.cache/gradmap/ext``). Loading never initialises CUDA and never raises.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from types import ModuleType

import torch

__all__ = ["extension", "extension_status", "jit_build", "CSRC"]

log = logging.getLogger(__name__)

CSRC = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "csrc"))

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": ModuleType | None, "status": str


def _import_built() -> tuple[ModuleType | None, str]:
    try:
        from gradmap import _C  # noqa: F401  (compiled by setup.py)
    except ImportError as exc:
        return None, f"gradmap._C not importable ({exc})"
    except OSError as exc:  # e.g. built against another torch: undefined symbols
        return None, (f"gradmap._C failed to load ({exc}); rebuild it against this torch with "
                      "pip install --no-build-isolation -e .")
    return _C, "gradmap._C (setup.py build)"


def jit_build(verbose: bool = False) -> ModuleType | None:
    """Compile csrc/ now with torch.utils.cpp_extension.load and use the result; None on failure."""
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not sources:
        status = f"no C++ sources at {CSRC} (the JIT build needs a source checkout)"
        with _lock:
            _state.update(module=None, status=status)
        log.warning("gradmap extension: %s", status)
        return None
    try:
        from torch.utils import cpp_extension
        cuda_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        with_cuda = (bool(cuda_sources) and torch.version.cuda is not None
                     and cpp_extension.CUDA_HOME is not None
                     and os.environ.get("GRADMAP_BUILD_CUDA", "1") != "0")
        build_dir = os.environ.get("GRADMAP_EXT_BUILD_DIR",
                                   os.path.join(os.path.expanduser("~"), ".cache", "gradmap", "ext"))
        os.makedirs(build_dir, exist_ok=True)
        module = cpp_extension.load(
            name="gradmap_jit_C", sources=sources + (cuda_sources if with_cuda else []),
            extra_cflags=["-O3"] + (["-DGRADMAP_WITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=["-O3", "-DGRADMAP_WITH_CUDA"], with_cuda=with_cuda,
            build_directory=build_dir, verbose=verbose)
    except Exception as exc:  # compiler missing, ninja missing, compile error
        status = f"JIT build failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
        with _lock:
            _state.update(module=None, status=status)
        log.warning("gradmap extension: %s; using plain-torch fallbacks", status)
        return None
    with _lock:
        _state.update(module=module, status=f"gradmap_jit_C (JIT build in {build_dir})")
    return module


def extension() -> ModuleType | None:
    """The loaded extension module, or None when it is unavailable (reason: extension_status())."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
    module, status = _import_built()
    if module is None and os.environ.get("GRADMAP_JIT_EXT", "0") == "1":
        return jit_build()
    if module is None:
        log.info("gradmap extension unavailable: %s; using plain-torch fallbacks", status)
    with _lock:
        _state.update(module=module, status=status)
    return module


def extension_status() -> str:
    """Human-readable description of the extension in use, or why none is."""
    extension()
    return str(_state["status"])


def _reset() -> None:
    """Forget the cached load result (tests)."""
    with _lock:
        _state.clear()
