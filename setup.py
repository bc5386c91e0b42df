# All metadata lives in pyproject.toml; this file exists so that `pip install -e .` works with
# older setuptools, and for the optional ahead-of-time build of the native CPU ops (csrc/):
#
#   MEGABYTE_BUILD_NATIVE=1 pip install --no-build-isolation -e .
#
# (--no-build-isolation: the extension is compiled against the torch already installed). A plain
# `pip install -e .` compiles nothing and needs no compiler: the native ops are then built on
# first use by megabyte_kernels/native.py (torch.utils.cpp_extension.load, cached).
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("MEGABYTE_BUILD_NATIVE") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "megabyte_kernels._megabyte_native",
            ["csrc/megabyte_native.cpp"],
            # portable: no -march / AVX flags in a library that may be copied to another machine
            extra_compile_args=["-O3", "-fopenmp", "-DNDEBUG"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
