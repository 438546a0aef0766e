"""Contract-suite factories for the Postgres adapters: each instance in its own schema, dropped afterwards."""

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


def _broker(request, **kwargs):
    from stem.brokers.postgres import PostgresBroker
    url, schema = _schema(request)
    return PostgresBroker(url, schema=schema, **kwargs)


def _backend(request, **kwargs):
    from stem.backends.postgres import PostgresResultBackend
    url, schema = _schema(request)
    return PostgresResultBackend(url, schema=schema, **kwargs)


BROKERS = {"postgres": _broker}
BACKENDS = {"postgres": _backend}
