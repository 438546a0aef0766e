"""Collects adapter factories from ``adapters_*.py`` and parametrizes the suite over them."""

from __future__ import annotations

import importlib
import pathlib

import pytest

_BROKERS: dict = {}
_BACKENDS: dict = {}
_WORKFLOW_STORES: dict = {}
for path in sorted(pathlib.Path(__file__).parent.glob("adapters_*.py")):
    mod = importlib.import_module(f"tests.contract.{path.stem}")
    _BROKERS.update(getattr(mod, "BROKERS", {}))
    _BACKENDS.update(getattr(mod, "BACKENDS", {}))
    _WORKFLOW_STORES.update(getattr(mod, "WORKFLOW_STORES", {}))


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


@pytest.fixture(params=sorted(_WORKFLOW_STORES))
def make_wf_store(request):
    make, made = _maker(_WORKFLOW_STORES, request)
    yield make
    for s in made:
        s.close()


@pytest.fixture
def wf_store(make_wf_store):
    return make_wf_store()
