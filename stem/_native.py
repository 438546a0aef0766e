"""Chooses, once at import, between the compiled `_speedups` and the pure twins.

``STEM_PURE=1`` forces the twins.  A compiled module that fails to import falls
back to its twin with a single warning.  ``IMPLEMENTATION`` records the choice:
"cython" when every compiled module loaded, "python" otherwise.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_PURE_TWINS = {
    "codec": "stem._codec_py",
    "signer": "stem._signer_py",
    "ring": "stem._ring_py",
    "resp": "stem._resp_py",
}

FORCED_PURE = os.environ.get("STEM_PURE", "") not in ("", "0")
_loaded: dict[str, str] = {}
_warned = False


def load(name: str) -> ModuleType:
    """Return the compiled module ``name`` or its pure twin."""
    global _warned
    if not FORCED_PURE:
        try:
            mod = importlib.import_module(f"stem._speedups.{name}")
        except ImportError as exc:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"stem: compiled speedups unavailable ({exc}); using the pure-Python "
                    "implementation (reinstall with a C compiler for full speed)",
                    RuntimeWarning, stacklevel=2)
        else:
            _loaded[name] = "cython"
            return mod
    _loaded[name] = "python"
    return importlib.import_module(_PURE_TWINS[name])


def implementation() -> str:
    """"cython" if every loaded hot-path module is compiled, else "python"."""
    if FORCED_PURE:
        return "python"
    for name in _PURE_TWINS:
        if name not in _loaded:
            try:
                load(name)
            except ImportError:
                _loaded[name] = "python"
    return "cython" if all(v == "cython" for v in _loaded.values()) else "python"
