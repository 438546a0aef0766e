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
