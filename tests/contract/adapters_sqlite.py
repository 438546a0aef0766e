"""Contract-suite factories for the SQLite adapters: a fresh file per test (and the in-memory URL).

Brokers get ``contract_break_publish`` (a trigger that aborts the insert of a message row for
the named queue, so ``publish_keyed`` fails after its key upsert), and the file-based one a
``contract_recipe`` (another process opens the same file); so do the backend and the workflow
store (``open_sqlite_workflow_store``: a backend on the file and the store beside it)."""

from stem.backends.sqlite import SqliteResultBackend
from stem.brokers.sqlite import SqliteBroker
from stem.workflows.store import open_store


def _file(request, name: str) -> str:
    return str(request.getfixturevalue("tmp_path") / name)


def _break_publish(broker):
    def brk(queue):
        with broker.store.write() as conn:
            conn.execute(f"CREATE TRIGGER stem_contract_break BEFORE INSERT ON stem_messages "
                         f"WHEN NEW.queue = '{queue}' BEGIN SELECT RAISE(ABORT, 'injected: publishing to "
                         f"{queue} fails'); END")
    return brk


def _broker(request, **kwargs):
    path = _file(request, "broker.db")
    broker = SqliteBroker(path, **kwargs)
    broker.contract_break_publish = _break_publish(broker)
    broker.contract_recipe = (SqliteBroker, (path,), kwargs)
    return broker


def _memory_broker(request, **kwargs):
    broker = SqliteBroker.from_url("sqlite://", **kwargs)
    broker.contract_break_publish = _break_publish(broker)
    return broker


def _backend(request, **kwargs):
    path = _file(request, "backend.db")
    backend = SqliteResultBackend(path, **kwargs)
    backend.contract_recipe = (SqliteResultBackend, (path,), kwargs)
    return backend


BROKERS = {"sqlite": _broker, "sqlite-memory": _memory_broker}
BACKENDS = {"sqlite": _backend}


def open_sqlite_workflow_store(path: str | None):
    """The workflow store beside a SQLite backend on ``path`` (None: in memory); closing the
    store closes the backend too."""
    backend = SqliteResultBackend(path)
    store = open_store(backend)
    store.close = backend.close
    return store


def _workflow_store(request):
    path = _file(request, "workflows.db")
    store = open_sqlite_workflow_store(path)
    store.contract_recipe = (open_sqlite_workflow_store, (path,), {})
    return store


WORKFLOW_STORES = {"sqlite": _workflow_store,
                   "sqlite-memory": lambda request: open_sqlite_workflow_store(None)}
