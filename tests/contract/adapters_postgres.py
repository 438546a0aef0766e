"""Contract-suite factories for the Postgres adapters: each instance in its own schema, dropped afterwards.

Brokers get ``contract_break_publish`` (a trigger that raises on the insert of a job row for
the named queue, so ``publish_keyed`` fails after its key upsert, in the same transaction) and
a ``contract_recipe`` (another process connects to the same schema); so do backends and the
workflow store (``open_postgres_workflow_store``: a backend on the schema and the store beside it)."""

import uuid


def _schema(request) -> tuple[str, str]:
    url = request.getfixturevalue("postgres_url")
    schema = f"{request.getfixturevalue('namespace')}_{uuid.uuid4().hex[:6]}"

    def drop():
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    request.addfinalizer(drop)
    return url, schema


def _break_publish(broker, url, schema):
    def brk(queue):
        import psycopg
        broker.migrate()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"""
                CREATE FUNCTION "{schema}".stem_contract_break() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.queue = '{queue}' THEN RAISE EXCEPTION 'injected: publishing to {queue} fails'; END IF;
                    RETURN NEW;
                END $$""")
            conn.execute(f'CREATE TRIGGER stem_contract_break BEFORE INSERT ON "{schema}".stem_jobs '
                         f'FOR EACH ROW EXECUTE FUNCTION "{schema}".stem_contract_break()')
    return brk


def _broker(request, **kwargs):
    from stem.brokers.postgres import PostgresBroker
    url, schema = _schema(request)
    broker = PostgresBroker(url, schema=schema, **kwargs)
    broker.contract_break_publish = _break_publish(broker, url, schema)
    broker.contract_recipe = (PostgresBroker, (url,), {"schema": schema, **kwargs})
    return broker


def _backend(request, **kwargs):
    from stem.backends.postgres import PostgresResultBackend
    url, schema = _schema(request)
    backend = PostgresResultBackend(url, schema=schema, **kwargs)
    backend.contract_recipe = (PostgresResultBackend, (url,), {"schema": schema, **kwargs})
    return backend


BROKERS = {"postgres": _broker}
BACKENDS = {"postgres": _backend}


def open_postgres_workflow_store(url: str, schema: str):
    """The workflow store beside a Postgres backend on ``schema``; closing the store closes the
    backend too."""
    from stem.backends.postgres import PostgresResultBackend
    from stem.workflows.store import open_store
    backend = PostgresResultBackend(url, schema=schema)
    store = open_store(backend)
    store.close = backend.close
    return store


def _workflow_store(request):
    url, schema = _schema(request)
    store = open_postgres_workflow_store(url, schema)
    store.contract_recipe = (open_postgres_workflow_store, (url, schema), {})
    return store


WORKFLOW_STORES = {"postgres": _workflow_store}
