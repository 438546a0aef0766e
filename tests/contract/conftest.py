"""Collects adapter factories from ``adapters_*.py`` and parametrizes the suite over them.

An adapter module may also name kinds in ``WAITS_ARE_SLOW``: the cases marked ``waits``
(they spend their time waiting for the clock: lease expiry, TTLs, delays, rate windows)
run on those kinds only under ``-m slow`` (``make test-slow``).  Sentinel and Cluster do:
they are the plain Redis adapters over another connection pool or client, whose waiting
is Redis's own clock and the same Lua as on the plain Redis, where every ``waits`` case
runs by default; every other case still runs through them by default.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest

_BROKERS: dict = {}
_BACKENDS: dict = {}
_WORKFLOW_STORES: dict = {}
_WAITS_ARE_SLOW: set[str] = set()
for path in sorted(pathlib.Path(__file__).parent.glob("adapters_*.py")):
    mod = importlib.import_module(f"tests.contract.{path.stem}")
    _BROKERS.update(getattr(mod, "BROKERS", {}))
    _BACKENDS.update(getattr(mod, "BACKENDS", {}))
    _WORKFLOW_STORES.update(getattr(mod, "WORKFLOW_STORES", {}))
    _WAITS_ARE_SLOW.update(getattr(mod, "WAITS_ARE_SLOW", ()))


@pytest.hookimpl(tryfirst=True)   # before ``-m 'not slow'`` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("waits") is None:
            continue
        params = getattr(item, "callspec", None)
        kinds = {params.params.get(name) for name in ("make_broker", "make_backend")} if params else set()
        if kinds & _WAITS_ARE_SLOW:
            item.add_marker(pytest.mark.slow)


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
