"""Build of the C++ CPU kernels (pybind11 + OpenMP), compiled at install time.

Metadata lives in pyproject.toml; this file only declares the extension.
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(
    os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cpp")
)

compile_args = ["-O3"]
link_args = []
if sys.platform.startswith("linux"):
    compile_args += ["-fopenmp"]
    link_args += ["-fopenmp"]
if os.environ.get("SKYSENSE_NATIVE_ARCH", "0") == "1":
    compile_args += ["-march=native"]

ext = Pybind11Extension(
    "skysense.kernels._C",
    sources,
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
