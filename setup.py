"""Build the Cython hot path (`_speedups/*.pyx` -> `stem._speedups.<name>`).

The C build is optional: when Cython or the compiler is missing the package
still installs with its pure-Python twins, and says so once.  Set
``STEM_DEBUG_BUILD=1`` for a debug build (no optimisation, asserts and bounds
checks on), as asyncpg does with ``ASYNCPG_DEBUG``.
"""

import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("STEM_DEBUG_BUILD") == "1"
MODULES = ["codec", "signer", "ring", "resp"]
# Developers rebuilding one module while editing another: STEM_BUILD_ONLY=ring
ONLY = [m for m in os.environ.get("STEM_BUILD_ONLY", "").split(",") if m]


class OptionalBuildExt(build_ext):
    """Never let a failed C build break the install: fall back to the twins."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc, ext.name)

    def _warn(self, exc, name="the C extensions"):
        msg = (f"stem: could not build {name} ({exc}); "
               "installing the pure-Python implementation instead")
        warnings.warn(msg)
        print("WARNING: " + msg, file=sys.stderr)


def extensions():
    if DEBUG:
        cflags = ["-O0", "-g3", "-UNDEBUG"]
        directives = {"boundscheck": True, "wraparound": True, "initializedcheck": True}
    else:
        cflags = ["-O3"]
        directives = {"boundscheck": False, "wraparound": False, "initializedcheck": False}
    directives["language_level"] = 3
    exts = []
    for name in ONLY or MODULES:
        src = os.path.join("_speedups", f"{name}.pyx")
        if os.path.exists(src):
            exts.append(Extension(f"stem._speedups.{name}", [src],
                                  extra_compile_args=cflags, include_dirs=["_speedups"]))
    try:
        from Cython.Build import cythonize
    except ImportError:
        warnings.warn("stem: Cython is not installed; installing the pure-Python implementation")
        return []
    return cythonize(exts, compiler_directives=directives, gdb_debug=DEBUG,
                     force=DEBUG, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
