"""Which build of the hot path runs: the one place that decides and reports it.

Each hot-path module (``MODULES``) exists twice with one API: compiled,
``stem._speedups.<name>`` (built from ``_speedups/<name>.pyx``), and its
pure-Python twin (``stem._codec_py`` ...).  A stem module that needs one calls
``load(name)`` once at import and gets the build this process runs:

* ``STEM_PURE=1`` forces the twins;
* otherwise the compiled module, or -- when it does not import (no compiler at
  install time) -- its twin, with one ``RuntimeWarning`` for the whole process.

``implementation(name)`` reports the choice per module and ``implementation()``
overall ("cython" only when every module is compiled); the public
``IMPLEMENTATION`` constants of ``stem``, ``stem.envelope``, ``stem.signing``
and ``stem.worker.channel`` are read from here.  ``compiled(name)`` and
``pure(name)`` import one build without choosing, for the tests and benches
that run both side by side.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

__all__ = ["COMPILED", "FORCED_PURE", "MODULES", "PURE", "compiled", "implementation", "load", "pure"]

#: the hot-path modules, each with a compiled build and a pure twin
MODULES = ("codec", "signer", "ring", "resp")
#: the two builds, as ``implementation()`` names them
COMPILED, PURE = "cython", "python"

_PURE_TWINS = {
    "codec": "stem._codec_py",
    "signer": "stem._signer_py",
    "ring": "stem._ring_py",
    "resp": "stem._resp_py",
}

FORCED_PURE = os.environ.get("STEM_PURE", "") not in ("", "0")
_chosen: dict[str, str] = {}   # module name -> COMPILED | PURE, as load() chose it
_warned = False


def _check(name: str) -> None:
    if name not in _PURE_TWINS:
        raise ValueError(f"unknown hot-path module {name!r}; one of {', '.join(MODULES)}")


def compiled(name: str) -> ModuleType:
    """The compiled build of ``name``; ``ImportError`` when it is not built."""
    _check(name)
    return importlib.import_module(f"stem._speedups.{name}")


def pure(name: str) -> ModuleType:
    """The pure-Python twin of ``name``."""
    _check(name)
    return importlib.import_module(_PURE_TWINS[name])


def load(name: str) -> ModuleType:
    """The build of ``name`` this process runs (see the module docstring), recorded for
    ``implementation``."""
    global _warned
    _check(name)
    if not FORCED_PURE:
        try:
            mod = compiled(name)
        except ImportError as exc:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"stem: compiled speedups unavailable ({exc}); using the pure-Python "
                    "implementation (reinstall with a C compiler for full speed)",
                    RuntimeWarning, stacklevel=2)
        else:
            _chosen[name] = COMPILED
            return mod
    _chosen[name] = PURE
    return pure(name)


def implementation(name: str | None = None) -> str:
    """``COMPILED`` ("cython") or ``PURE`` ("python"): the build of module ``name`` this
    process runs, or with no name, of the whole hot path (compiled only when every module
    is).  A module not loaded yet is chosen now, as ``load`` would."""
    if name is None:
        builds = {implementation(n) for n in MODULES}
        return COMPILED if builds == {COMPILED} else PURE
    if name not in _chosen:
        load(name)
    return _chosen[name]
