"""The frame codec and signer of each build, for the micro benches that put both in one group."""

from __future__ import annotations

import importlib
from types import ModuleType

from stem import _codec_py, _signer_py


def codec_builds() -> dict[str, tuple[ModuleType, ModuleType]]:
    """``{"py": (codec, signer), "c": (codec, signer)}``; "c" only when the compiled build imports."""
    builds = {"py": (_codec_py, _signer_py)}
    try:
        builds["c"] = (importlib.import_module("stem._speedups.codec"),
                       importlib.import_module("stem._speedups.signer"))
    except ImportError:
        pass
    return builds
