"""Contract-suite factories for the SQLite adapters: a fresh file per test (and the in-memory URL)."""

from stem.backends.sqlite import SqliteResultBackend
from stem.brokers.sqlite import SqliteBroker


def _file(request, name: str) -> str:
    return str(request.getfixturevalue("tmp_path") / name)


def _broker(request, **kwargs):
    return SqliteBroker(_file(request, "broker.db"), **kwargs)


def _memory_broker(request, **kwargs):
    return SqliteBroker.from_url("sqlite://", **kwargs)


def _backend(request, **kwargs):
    return SqliteResultBackend(_file(request, "backend.db"), **kwargs)


BROKERS = {"sqlite": _broker, "sqlite-memory": _memory_broker}
BACKENDS = {"sqlite": _backend}
