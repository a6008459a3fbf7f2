"""Backend policy shared by the ops: which implementation runs, how the Triton kernels load, fallbacks.

Dispatch rule (issue 18). A Triton kernel is used only where it is expected to beat
torch on that dtype and shape class; until GPU measurements exist the rule is
conservative:

- CPU tensors: plain torch (the `*_reference` functions), by design, never a fallback.
- CUDA tensors, all of them bfloat16/float16 (`KERNEL_DTYPES`): the Triton kernels.
- CUDA tensors with a float32 input: torch/cuBLAS with TF32 off (`exact_fp32`), so
  the results stay exact; the fp32 kernels use FMA dots (no tensor cores) and are
  not expected to beat cuBLAS (issue item 6). This is policy, not a fallback.
- Unsupported dtypes (fp64, ...) and inputs on several devices: the reference,
  after one warning per (op, reason); `layer_grad_reductions` instead groups its
  gradients per device and dispatches each group on its own.
- A kernel that fails to compile or launch: the reference finishes the call
  (same formula), with one warning naming the kernel, and the op stays on the
  reference for the rest of the process (`backends()` says why).
- GRADMAP_STRICT_KERNELS=1 turns every fallback above into `StrictKernelError`
  (the GPU check `.ci/gpu` runs with it). GRADMAP_FORCE_REFERENCE=1 forces plain
  torch everywhere. Both are read at every call.

Where the kernels live. The ``@triton.jit`` kernels and their launchers stay in
the repository's top-level ``kernels/`` package (installed as ``gradmap.kernels``
by setup.py): a launcher's grid and constexpr choices are bound to its kernel's
signature, so they share a file, and keeping both out of ``gradmap/`` means
importing ``gradmap.ops`` never imports Triton. Each ``gradmap/ops/<op>.py`` holds
the op's reference and its dispatch and calls its launcher through
`load_kernels()`, which finds the kernels of *this* copy of gradmap:
``gradmap/kernels`` inside an installed package, else ``kernels/`` next to the
package in a source checkout (also what an editable install maps, and the only
source when the checkout is used through PYTHONPATH alone, or when another
checkout's editable install would map ``gradmap.kernels`` elsewhere), else
whatever the import system resolves. Importing this module never imports Triton
and never initialises CUDA.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from gradmap.core.errors import GradmapError
from gradmap.ops import extension

__all__ = [
    "KERNEL_DEVICE_TYPES", "KERNEL_DTYPES", "TORCH_DTYPES", "OPS", "StrictKernelError", "force_reference",
    "strict_kernels", "load_kernels", "kernels_dir", "device_key", "on_kernel_device", "choose", "fallback",
    "kernel_failed", "failed", "run_kernel", "record_kernels", "exact_fp32", "reset", "backends",
]

log = logging.getLogger(__name__)

# device types whose tensors may go to the Triton kernels (tests add "cpu" under TRITON_INTERPRET=1)
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# dtypes the Triton kernels are used for; other supported dtypes go to torch by policy
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
# dtypes torch handles by policy (exact fp32); anything else on a kernel device is a fallback
TORCH_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)
OPS = ("accumulate_moments", "layer_grad_reductions", "gate_reduction", "projection_solve")

_kernels: dict[str, object] = {}  # "module": ModuleType | None, "status": str
_failed: dict[str, str] = {}  # op -> why its kernel was abandoned in this process
_warned: set[tuple[str, str]] = set()  # (op, reason) pairs already warned about
_recorders: list[list[str]] = []  # the lists of the open `record_kernels` blocks


class StrictKernelError(GradmapError):
    """Raised instead of a fallback when GRADMAP_STRICT_KERNELS=1."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() not in ("", "0")


def force_reference() -> bool:
    """True when GRADMAP_FORCE_REFERENCE is set to a non-zero value (read at every call)."""
    return _flag("GRADMAP_FORCE_REFERENCE")


def strict_kernels() -> bool:
    """True when GRADMAP_STRICT_KERNELS is set to a non-zero value: fallbacks raise (read at every call)."""
    return _flag("GRADMAP_STRICT_KERNELS")


def reset() -> None:
    """Forget abandoned kernels, issued warnings and the cached kernels module (tests)."""
    _failed.clear()
    _warned.clear()
    _kernels.clear()


# ----------------------------------------------------------------------------- kernel loading

def kernels_dir() -> Path | None:
    """The kernels package directory of this copy of gradmap, or None (see the module docstring)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def _import_kernels() -> ModuleType:
    where = kernels_dir()
    if where is None or where.parent == Path(__file__).resolve().parent.parent:
        return importlib.import_module("gradmap.kernels")  # installed package (or a custom mapping)
    loaded = sys.modules.get("gradmap.kernels")
    if loaded is not None and Path(loaded.__file__).resolve().parent == where:
        return loaded
    if loaded is not None:
        log.warning("gradmap: gradmap.kernels was imported from %s; loading this checkout's %s instead",
                    Path(loaded.__file__).parent, where)
        for name in [n for n in sys.modules if n == "gradmap.kernels" or n.startswith("gradmap.kernels.")]:
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location("gradmap.kernels", where / "__init__.py",
                                                  submodule_search_locations=[str(where)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradmap.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("gradmap.kernels", None)
        raise
    setattr(sys.modules["gradmap"], "kernels", module)
    return module


def load_kernels() -> ModuleType | None:
    """The Triton kernels package (imported on first use), or None when Triton is unavailable."""
    if "status" not in _kernels:
        try:
            import triton
            module = _import_kernels()
            _kernels.update(module=module, status=f"triton {triton.__version__} "
                                                  f"({Path(module.__file__).parent})")
        except Exception as exc:
            _kernels.update(module=None, status=f"unavailable ({type(exc).__name__}: {exc})")
            log.info("gradmap: Triton kernels %s; CUDA tensors use plain torch", _kernels["status"])
    return _kernels["module"]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- policy

def device_key(t: torch.Tensor) -> object:
    """The device a tensor counts as being on, for grouping and mixed-device checks."""
    return t.device


def on_kernel_device(t: torch.Tensor) -> bool:
    """Whether `t` lives on a device type the Triton kernels serve."""
    return t.device.type in KERNEL_DEVICE_TYPES


def fallback(op: str, reason: str, warn: bool = True) -> None:
    """Record a fallback to the reference: one warning per (op, reason); StrictKernelError when strict.

    `warn=False` for fallbacks already announced (an op whose kernel failed earlier).
    """
    if strict_kernels():
        raise StrictKernelError(f"{op}: {reason}; GRADMAP_STRICT_KERNELS=1 forbids falling back to the "
                                "plain-torch reference")
    if warn and (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning("gradmap: %s: %s; using the plain-torch reference (same formula)", op, reason)


def choose(op: str, *inputs: torch.Tensor | None, device: object = None) -> ModuleType | None:
    """The kernels module when `op` should run on Triton for these inputs, else None (use torch).

    `device`: the device_key of in-place accumulators the inputs must share. Calls
    `fallback` (warning, or StrictKernelError) where a kernel was due but cannot run.
    """
    ts = [t for t in inputs if t is not None]
    if force_reference() or not ts or not any(on_kernel_device(t) for t in ts):
        return None
    devices = {device_key(t) for t in ts} | ({device} if device is not None else set())
    if len(devices) > 1:
        fallback(op, "inputs on several devices (" + ", ".join(sorted(map(str, devices))) + ")")
        return None
    dtypes = sorted({str(t.dtype) for t in ts if t.dtype not in KERNEL_DTYPES + TORCH_DTYPES})
    if dtypes:
        fallback(op, f"no kernel for dtype {', '.join(dtypes)}")
        return None
    if any(t.dtype in TORCH_DTYPES for t in ts):
        return None  # policy: fp32 through torch with TF32 off
    if op in _failed:
        fallback(op, f"its kernel failed earlier in this process ({_failed[op]})", warn=False)
        return None
    module = load_kernels()
    if module is None:
        fallback(op, f"Triton kernels {_kernels.get('status', 'not loaded')}")
    return module


def kernel_failed(op: str, kernel: str, exc: BaseException) -> None:
    """A kernel failed to compile or launch: abandon it for this process and warn once (or raise)."""
    _failed[op] = f"{kernel}: {type(exc).__name__}: {str(exc).strip()[:200]}"
    try:
        fallback(op, f"the kernel {kernel} failed ({_failed[op]})")
    except StrictKernelError as strict:
        raise strict from exc


def failed(op: str) -> str | None:
    """Why `op`'s kernel (or extension) was abandoned in this process, or None."""
    return _failed.get(op)


def run_kernel(op: str, kernel: str, call, reference):
    """`call()`, or on a compile/launch failure `reference()` after `kernel_failed`.

    Input errors (GradmapError) are re-raised: they would fail the reference too.
    """
    for seen in _recorders:
        seen.append(kernel)
    try:
        return call()
    except GradmapError:
        raise
    except Exception as exc:
        kernel_failed(op, kernel, exc)
        return reference()


@contextlib.contextmanager
def record_kernels() -> Iterator[list[str]]:
    """Inside the block, the names of the kernels `run_kernel` starts, in call order (also one
    that then fails and falls back): which kernels a pipeline reaches (tests, `.ci/gpu`)."""
    seen: list[str] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


@contextlib.contextmanager
def exact_fp32(*tensors: torch.Tensor | None):
    """Run fp32 CUDA matmuls inside with TF32 off (IEEE fp32), restoring the setting afterwards.

    The switch is process-wide while the block runs (torch has no per-call one).
    """
    if not any(t is not None and t.is_cuda for t in tensors):
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def backends() -> dict[str, str]:
    """Which implementation each op uses in this process, per device, and why.

    Keys: the four ops ("cpu=<impl>, cuda=<impl>"), "triton", "extension",
    "force_reference", "strict". Calling it may import Triton and load the
    extension; it never initialises CUDA.
    """
    strict = "1" if strict_kernels() else "0"
    if force_reference():
        reason = "torch (GRADMAP_FORCE_REFERENCE=1)"
        out = {op: reason for op in OPS}
        out.update(triton="not used (GRADMAP_FORCE_REFERENCE=1)",
                   extension="not used (GRADMAP_FORCE_REFERENCE=1)", force_reference="1", strict=strict)
        return out
    have_triton = load_kernels() is not None
    out = {}
    for op in OPS[:3]:
        cuda = (f"torch (kernel failed: {_failed[op]})" if op in _failed
                else "triton for bf16/fp16, torch for fp32" if have_triton else "torch")
        out[op] = f"cpu=torch, cuda={cuda}"
    ext = extension.extension()
    cpu_solve = "c++ (gradmap._C)" if ext is not None else "torch"
    cuda_solve = "c++/cuda (gradmap._C)" if ext is not None and ext.cuda_built() else "torch"
    if "projection_solve" in _failed:
        cuda_solve = f"torch (extension failed: {_failed['projection_solve']})"
    out["projection_solve"] = f"cpu={cpu_solve}, cuda={cuda_solve}"
    out["triton"] = str(_kernels.get("status", "not loaded"))
    out["extension"] = extension.extension_status()
    out["force_reference"] = "0"
    out["strict"] = strict
    return out
