"""Collects adapter factories from ``adapters_*.py`` and parametrizes the suite over them."""

from __future__ import annotations

import importlib
import pathlib

import pytest

_BROKERS: dict = {}
_BACKENDS: dict = {}
for path in sorted(pathlib.Path(__file__).parent.glob("adapters_*.py")):
    mod = importlib.import_module(f"tests.contract.{path.stem}")
    _BROKERS.update(getattr(mod, "BROKERS", {}))
    _BACKENDS.update(getattr(mod, "BACKENDS", {}))


@pytest.fixture(params=sorted(_BROKERS))
def make_broker(request):
    made = []

    def make(**kwargs):
        b = _BROKERS[request.param](request, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def broker(make_broker):
    return make_broker()


@pytest.fixture(params=sorted(_BACKENDS))
def make_backend(request):
    made = []

    def make(**kwargs):
        b = _BACKENDS[request.param](request, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend):
    return make_backend()
