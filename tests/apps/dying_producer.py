"""A producer that SIGKILLs itself while it creates a chord: ``python -m tests.apps.dying_producer CONFIG``.

``CONFIG`` is JSON: ``url`` and ``options`` (the store, as ``tests.support.Store.config``
gives them), ``canvas_id``, ``ledger``, ``members`` and ``where``:

* ``"unsealed"``: a chord whose members are not one task (each is published on its own, the
  record created unsealed first); the producer dies as it is about to seal it, its members
  published.  The workers' sweep must end it FAILED ``creation-interrupted``.
* ``"in_transaction"``: a chord of one task, created with its members in one transaction
  (``ResultBackend.group_publish``); the producer dies inside that transaction, after every
  member was written to it and before it commits (SQLite, Postgres), or after Redis queued
  every command of its ``MULTI`` and before its ``EXEC``.  Nothing may be left of it.

It prints ``DYING`` just before the kill, and ``SURVIVED`` if it got past it (a bug).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _die() -> None:
    print("DYING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_at_seal(backend) -> None:
    def seal(group_id):
        _die()

    backend.group_seal = seal


def _die_in_transaction(broker, backend) -> None:
    kind = type(backend).__name__
    if kind == "SqliteResultBackend":
        real = broker.publish_frames_in

        def publish_frames_in(*args, **kwargs):
            real(*args, **kwargs)
            _die()                           # the rows are written, the COMMIT never comes

        broker.publish_frames_in = publish_frames_in
    elif kind == "PostgresResultBackend":
        statement = broker.sql("publish")
        real_run = backend._pg.run

        class Dying:
            def __init__(self, conn):
                self._conn = conn

            def __getattr__(self, name):
                return getattr(self._conn, name)

            def execute(self, sql, params=None, **kwargs):
                cursor = self._conn.execute(sql, params, **kwargs)
                if sql is statement:
                    _die()                   # the members are inserted, the COMMIT never comes
                return cursor

        backend._pg.run = lambda fn, *a, **kw: real_run(lambda conn: fn(Dying(conn)), *a, **kw)
    elif kind == "RedisResultBackend":
        import stem.backends.redis as redis_backend
        from stem.stores.redis_pipe import read_replies

        def execute_watched(client, key, packed, n):
            cut = packed.rindex(b"*1\r\n$4\r\nEXEC\r\n")      # everything up to the EXEC
            conn = client.connection_pool.get_connection()
            conn.send_packed_command([packed[:cut]], check_health=False)
            replies = read_replies(conn, n - 2)             # MULTI's OK, then QUEUED for each
            assert all(r in (b"OK", b"QUEUED") for r in replies), replies[:3]
            _die()

        redis_backend.execute_watched = execute_watched
    else:
        raise SystemExit(f"no transaction to die in on {kind}")


def main(config: dict) -> int:
    from stem import Stem
    from stem.backends import from_url as backend_from_url
    from stem.brokers import from_url as broker_from_url
    from stem.canvas import Signature, chord, group
    from tests.apps.e2e import registry

    options = config.get("options") or {}
    broker, backend = broker_from_url(config["url"], **options), backend_from_url(config["url"], **options)
    stem = Stem(broker, backend, registry)
    ledger, n = config["ledger"], int(config["members"])
    members = [Signature("e2e.effect", {"n": i, "ledger": ledger}) for i in range(n)]
    if config["where"] == "unsealed":
        members.append(Signature("e2e.add", {"a": n, "b": 0}))   # not one task: published one by one
        _die_at_seal(backend)
    else:
        _die_in_transaction(broker, backend)
    stem.apply(chord(group(members), Signature("e2e.collect", {"ledger": ledger})), canvas_id=config["canvas_id"],
               creation_timeout=float(config.get("creation_timeout", 1.0)))
    print("SURVIVED", flush=True)
    return 3


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
