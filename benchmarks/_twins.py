"""The builds of the hot path, for the micro benches that put both in one group.

Selection is ``stem._native``'s (``compiled``/``pure``); a bench measures a build, so a
missing compiled build just leaves its entries out (``make bench-micro`` builds first).
"""

from __future__ import annotations

from types import ModuleType

from stem import _native


def builds(*names: str) -> dict[str, tuple[ModuleType, ...]]:
    """``{"py": (modules...), "c": (modules...)}`` of ``names``; "c" only when every one imports."""
    out = {"py": tuple(_native.pure(name) for name in names)}
    try:
        out["c"] = tuple(_native.compiled(name) for name in names)
    except ImportError:
        pass
    return out


def codec_builds() -> dict[str, tuple[ModuleType, ModuleType]]:
    """``{"py": (codec, signer), "c": (codec, signer)}``; "c" only when the compiled build imports."""
    return builds("codec", "signer")  # type: ignore[return-value]


def compiled(name: str) -> ModuleType | None:
    """The compiled build of ``name``, or None when it is not built."""
    return builds(name).get("c", (None,))[0]
