"""Builds the compiled fast path (gateway/_fastpath.pyx).

Everything else is declared in pyproject.toml. GATEWAY_DEBUG=1 builds with
Cython's bounds and initialisation checks on and without optimisation, for a
debug run of the suite.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("GATEWAY_DEBUG") == "1"

extensions = [
    Extension(
        "gateway._fastpath",
        ["gateway/_fastpath.pyx"],
        extra_compile_args=["-O2"] if not debug else ["-O0", "-g"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=os.environ.get("GATEWAY_ANNOTATE") == "1",
    ),
)
