"""Builds the C++ CPU kernels (csrc/) as the extension faim_kernels._C.

FAIM_KERNELS_NO_EXT=1 skips the native build (the package then runs with backend="reference"
and, on CUDA, backend="triton" only). No hardware sniffing here: the Triton kernels are
compiled at run time and the C++ kernels are plain CPU code.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FAIM_KERNELS_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # No errno from sqrt, no trapping comparisons: lets the epilogue loops (sqrt, selects) vectorise.
    extra = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-march=native"]
    ext_modules = [
        CppExtension(
            "faim_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": extra},
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
