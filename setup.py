"""Build script: packages plus the optional C++/CUDA extension ``gradmap._C`` from csrc/.

The extension is optional. Installing never fails because of it: it is
skipped (with the reason printed) when GRADMAP_BUILD_EXT=0, when there are no
sources, when torch is not importable at build time (use
``pip install --no-build-isolation``), when no C++ compiler is found, or when
compilation fails (the error and the compiler's output stay in the build log:
``pip install -v``). gradmap then uses its plain-torch fallbacks
(``gradmap.ops.backends()`` says which is active).

CUDA sources are added when torch has CUDA and nvcc is found (CUDA_HOME);
GRADMAP_BUILD_CUDA=0 builds the CPU part only. The GPU architectures are always
explicit (-gencode per entry of TORCH_CUDA_ARCH_LIST): without the variable,
torch would compile only for the GPU visible at build time (a wheel built on
an H100 then fails with "no kernel image" on an A100 or L4), so setup.py sets
DEFAULT_CUDA_ARCHS: sm_80 (A100), sm_86 (A10), sm_89 (L4, RTX 4090), sm_90 (H100/
H200) and PTX for sm_90 so newer GPUs JIT it. `.ci/gpu` builds with "9.0".
Should a CUDA solve still fail at run time, gradmap falls back to the torch
solve with a warning (GRADMAP_STRICT_KERNELS=1 makes that an error).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

PACKAGES = ["gradmap", "gradmap.core", "gradmap.ops", "gradmap.runtime", "gradmap.prune",
            "gradmap.prune.metrics", "gradmap.prune.compensation", "gradmap.sparsity", "gradmap.evaluate",
            "gradmap.cli", "gradmap.experiments", "gradmap.kernels"]
PACKAGE_DIR = {"gradmap.kernels": "kernels"}
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _say(msg):
    print(f"gradmap: {msg}", file=sys.stderr)


def _cxx_available():
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def _cuda_available(torch, cuda_home):
    if os.environ.get("GRADMAP_BUILD_CUDA", "1") == "0":
        _say("GRADMAP_BUILD_CUDA=0, building the CPU extension only")
        return False
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA; building the CPU extension only")
        return False
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        _say(f"torch has CUDA {torch.version.cuda} but nvcc was not found (CUDA_HOME={cuda_home}); "
             "building the CPU extension only")
        return False
    return True


def _extension_kwargs():
    if os.environ.get("GRADMAP_BUILD_EXT", "1") == "0":
        _say("GRADMAP_BUILD_EXT=0, skipping the C++/CUDA extension")
        return {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        _say("no C++ sources in csrc/, skipping the extension")
        return {}
    if not _cxx_available():
        _say("no C++ compiler found (set CXX), skipping the extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env
        _say(f"torch not importable at build time ({exc}); skipping the extension — install with "
             "pip install --no-build-isolation to build it against the installed torch")
        return {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
    cpu_ext = CppExtension("gradmap._C", cpp, depends=headers, extra_compile_args=["-O3"])
    attempts = [cpu_ext]
    if cu and _cuda_available(torch, CUDA_HOME):
        cuda_ext = CUDAExtension("gradmap._C", cpp + cu, depends=headers,
                                 define_macros=[("GRADMAP_WITH_CUDA", None)],
                                 extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
        attempts = [cuda_ext, cpu_ext]  # a failed CUDA build falls back to the CPU-only one
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)  # read by BuildExtension
        _say(f"building gradmap._C with CUDA {torch.version.cuda} (CUDA_HOME={CUDA_HOME}) for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        _say("building gradmap._C for CPU")

    class SoftBuild(BuildExtension):
        """build_ext that tries CUDA, then CPU-only, then gives up quietly: never fails the install."""

        def run(self):
            # build_ext.run replaces self.compiler (a name) by a compiler object, which a second
            # run cannot take: each attempt starts from the name, or the CPU retry fails too
            # a failed attempt leaves build_ext half-run: each attempt starts from the compiler
            # name and the inplace flag it was given, and takes the annotations finalize_options
            # gave the first attempt (same module name)
            compiler, inplace = self.compiler, self.inplace
            for i, ext in enumerate(attempts):
                for attr in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):
                    if hasattr(attempts[0], attr):
                        setattr(ext, attr, getattr(attempts[0], attr))
                self.extensions, self.compiler, self.inplace = [ext], compiler, inplace
                kind = "with CUDA" if ext is not cpu_ext else "for CPU only"
                try:
                    super().run()
                    _say(f"built {ext.name} {kind}")
                    return
                except Exception as exc:  # never fails the install, but says everything it knows
                    nxt = "retrying CPU-only" if i + 1 < len(attempts) else "using plain-torch fallbacks"
                    _say(f"building {ext.name} {kind} FAILED ({type(exc).__name__}: {exc}); {nxt}. The "
                         "compiler's own output is above (pip hides it unless run with -v)")
            self.extensions = []

    use_ninja = shutil.which("ninja") is not None
    return {"ext_modules": [attempts[0]],
            "cmdclass": {"build_ext": SoftBuild.with_options(use_ninja=use_ninja)}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_kwargs())
