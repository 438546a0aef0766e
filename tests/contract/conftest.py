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


def _maker(factories, request):
    """A factory building fresh adapters of the parametrized kind, all closed at teardown."""
    made = []

    def make(**kwargs):
        adapter = factories[request.param](request, **kwargs)
        made.append(adapter)
        return adapter

    return make, made


@pytest.fixture(params=sorted(_BROKERS))
def make_broker(request):
    make, made = _maker(_BROKERS, request)
    yield make
    for b in made:
        b.close()


@pytest.fixture
def broker(make_broker):
    return make_broker()


@pytest.fixture(params=sorted(_BACKENDS))
def make_backend(request):
    make, made = _maker(_BACKENDS, request)
    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend):
    return make_backend()
