"""Guards on which implementation is loaded."""

import os

import pytest

import stem
from stem import _native


def test_implementation_is_reported():
    assert stem.IMPLEMENTATION in ("cython", "python")


@pytest.mark.skipif(os.environ.get("STEM_EXPECT_COMPILED") != "1", reason="compiled build not expected")
def test_compiled_build_is_loaded_when_expected():
    assert stem.IMPLEMENTATION == "cython", (
        "STEM_EXPECT_COMPILED=1 but the Cython speedups did not load; run `make build`")


@pytest.mark.skipif(os.environ.get("STEM_PURE") != "1", reason="only under STEM_PURE=1")
def test_pure_build_is_forced_by_stem_pure():
    assert stem.IMPLEMENTATION == "python"
    assert _native.FORCED_PURE


def test_a_missing_compiled_module_falls_back_to_its_twin_with_one_warning(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **kw):
        if name.startswith("stem._speedups."):
            raise ImportError(f"No module named {name!r} (simulated failed C build)")
        return real(name, *a, **kw)

    monkeypatch.setattr(_native, "FORCED_PURE", False)
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.warns(RuntimeWarning, match="pure-Python implementation") as record:
        codec = _native.load("codec")
        signer = _native.load("signer")
    assert codec.__name__ == "stem._codec_py" and signer.__name__ == "stem._signer_py"
    assert len(record) == 1
    assert _native.implementation() == "python"
