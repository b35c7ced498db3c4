"""Build script of faim_kernels (the metadata is in pyproject.toml).

By default the wheel is pure Python and the build needs no torch: the C++ CPU kernels' sources
(csrc/*.cpp, csrc/*.h) go into the package as faim_kernels/csrc/, and faim_kernels/_cpp_loader.py
compiles them against the torch that is running, on first use, into a cache. So `pip install`
never downloads a torch to build against, and the kernels always match the user's torch.

On request, the kernels are built ahead of time as faim_kernels._C, against the torch installed
here (the loader prefers that library while its build stamp matches the running torch):

    python setup.py build_ext --inplace                              (a source checkout)
    FAIM_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .      (a wheel tied to this torch)

FAIM_KERNELS_BUILD_EXT=0 turns the native build off even for `build_ext`. No hardware sniffing:
the Triton kernels compile at run time and the C++ kernels are plain CPU code.
"""
import glob
import importlib.util
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _loader():
    """faim_kernels/_cpp_loader.py on its own (it imports nothing from the package): the release
    flags and the source hash are defined once, there."""
    spec = importlib.util.spec_from_file_location(
        "_faim_cpp_loader", os.path.join(HERE, "faim_kernels", "_cpp_loader.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithSources(build_py):
    """Copies csrc/*.cpp and csrc/*.h into the built package as faim_kernels/csrc/ (csrc/ itself
    stays at the repository root; an editable install reads it there)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "faim_kernels", "csrc")
        shutil.rmtree(dest, ignore_errors=True)  # no stale sources from an earlier build
        os.makedirs(dest)
        for f in sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.h"))):
            self.copy_file(f, os.path.join(dest, os.path.basename(f)))


def _wants_native_build() -> bool:
    switch = os.environ.get("FAIM_KERNELS_BUILD_EXT")
    if switch is not None:
        return switch == "1"
    return "build_ext" in sys.argv[1:]  # `python setup.py build_ext --inplace` asks for it


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}
if _wants_native_build():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit("faim_kernels: the ahead-of-time build compiles against the installed torch, and "
                 "torch does not import here: install torch first, and pass --no-build-isolation "
                 "to pip (or leave FAIM_KERNELS_BUILD_EXT unset: the kernels then compile on first use)")
    loader = _loader()
    # Portable unless asked (FAIM_KERNELS_MARCH=native, as scripts/bootstrap.sh does for a checkout):
    # a wheel built here may run on another CPU.
    NATIVE = os.environ.get("FAIM_KERNELS_MARCH") == "native"

    class BuildExtensionStamped(BuildExtension.with_options(use_ninja=True)):
        """Writes the build stamp (torch build, source hash) next to the library: the loader
        skips a library built for another torch or from other sources."""

        def run(self):
            super().run()
            for ext in self.extensions:
                stamp = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), loader.STAMP_NAME)
                with open(stamp, "w") as f:
                    json.dump({"torch": torch.__version__, "torch_git": torch.version.git_version,
                               "sources": loader.sources_hash(loader.Path(CSRC)),
                               "cpu": loader.cpu_id() if NATIVE else None}, f, indent=1)

    ext_modules = [
        CppExtension(
            "faim_kernels._C",
            sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(CSRC, "*.cpp"))),
            # -g0 last: Python's own CFLAGS carry -g (6.5 MB of debug info otherwise).
            extra_compile_args={"cxx": loader.cxx_flags(native=NATIVE) + ["-g0"]},
        )
    ]
    cmdclass["build_ext"] = BuildExtensionStamped

setup(ext_modules=ext_modules, cmdclass=cmdclass)
