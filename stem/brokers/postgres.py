"""The PostgreSQL broker: a jobs table, ``FOR UPDATE SKIP LOCKED`` claims, LISTEN/NOTIFY wake-ups.

URL: ``postgresql://user@host:port/db?schema=name`` (or the ``schema=``
argument; default ``public``).  Needs psycopg 3 (``pip install
'stem-queue[postgres]'``).  Schema and channels: ``stem/stores/postgres_schema.py``;
connections, retries and error translation: ``stem/stores/postgres.py``.

* **Claim** (one statement, autocommit): for each consumed queue, the best
  ready rows (``stem_jobs_ready``: priority, then id = age) and the best rows
  that are due again -- delayed rows whose ``not_before`` passed and leases
  that expired (``stem_jobs_waiting``) -- each ``FOR UPDATE SKIP LOCKED``;
  the best ``max_count`` of them are leased (``available_at = now +`` the
  row's own visibility timeout, else the consuming broker's default;
  ``delivery_count + 1``) with ``UPDATE ... RETURNING``, past
  ``max_deliveries`` too (the consumer dead-letters those).  Expired leases
  need no sweeper: the claim itself reclaims them.
* **Publish** is one ``INSERT ... SELECT FROM unnest(...)`` round trip for a
  whole batch, with ``pg_notify`` in the same statement (so in the same
  transaction: a consumer is woken only once the rows are visible).
* **Settle**: ``ack`` is one ``DELETE ... WHERE id = ANY(...)``; ``retry``
  (delete + insert) and ``dead_letter`` (delete + copy) are single statements
  with data-modifying CTEs, hence atomic.
* **Keys**: ``publish_keyed`` is one statement (one round trip, one
  transaction) per batch: ``INSERT INTO stem_keys ... ON CONFLICT DO
  UPDATE`` claims each distinct key of the batch (in key order, so
  concurrent batches lock them alike) where it is expired, and rewrites a
  live key with its own values, so that ``RETURNING`` names the holder even
  when it committed after the statement's snapshot; ``claimed_in`` (the
  claiming transaction's id) tells a claim from a live key, the owner's own
  included.  The same statement inserts the messages of the keys it claimed,
  in batch order.  A later duplicate in the batch takes its first
  occurrence's answer.  The terminal settles release keys in their own statement
  (``stem.stores.postgres_schema.release_ctes``): a keyed ack, dead letter,
  reject, purge, delete_queue, and the backend's fused result+ack; an ack
  without keyed deliveries runs the plain delete.  ``retry`` copies the key
  columns; ``replay`` claims again in one transaction.  Expired keys are
  swept by ``publish_keyed`` now and then (and overwritten by any claim).
* **Waiting**: a per-broker listener thread LISTENs on ``stem.<schema>.jobs``;
  an idle ``consume`` sleeps on a condition variable until a notification for
  one of its queues, the next due time of a delayed row or lease, or its
  timeout -- no polling while the listener is up.
* **Errors**: psycopg errors become ``BrokerError``; lost connections are
  re-established by the next call, retrying for up to ``reconnect_timeout``
  seconds before ``BrokerConnectionError``.  A publish retried after a
  connection loss mid-commit can store the message twice (at least once).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from .. import _checks as checks
from ..errors import ConfigurationError
from ..stores.base import BROKER_ERRORS
from ..stores.local import after_fork_in_child
from ..stores.postgres import PostgresStore, parse_postgres_url
from ..stores.postgres_schema import NOW, quote_schema, release_ctes
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Keyed,
                   Message, QueueStats, check_consume, check_keyed, validate_queue_name)

__all__ = ["PostgresBroker", "migrate"]

_FALLBACK_POLL_S = 1.0       # only while the listener is reconnecting
_KEY_SWEEP_EVERY_S = 60.0
_KEY_SWEEP_ROWS = 10_000

_COLUMNS = "queue, task_id, priority, state, available_at, visibility_timeout, frame"
_KEY_COLUMNS = "key, key_ttl, key_linger"
_DEAD_COLUMNS = f"queue, task_id, reason, failed_at, priority, visibility_timeout, frame, {_KEY_COLUMNS}"


def _queries(s: str) -> dict[str, str]:
    jobs, dead, keys = f"{s}.stem_jobs", f"{s}.stem_dead_letters", f"{s}.stem_keys"
    due = f"CASE WHEN m.nb > {NOW} THEN 1 ELSE 0 END, CASE WHEN m.nb > {NOW} THEN m.nb ELSE {NOW} END"
    free = f"k.expires_at <= {NOW}"
    return {
        "publish": f"""
            WITH ins AS (
                INSERT INTO {jobs} ({_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f
                FROM unnest(%s::text[], %s::text[], %s::int4[], %s::float8[], %s::float8[], %s::bytea[])
                     WITH ORDINALITY AS m(q, t, p, nb, v, f, n)
                ORDER BY m.n)
            SELECT pg_notify(%s, q) FROM unnest(%s::text[]) AS q""",
        # the batch's distinct keys, in key order (concurrent batches lock them alike); a live
        # key is "updated" to itself, so that RETURNING names its holder (claimed_in: who won)
        "publish_keyed": f"""
            WITH m AS (
                SELECT * FROM unnest(%(q)s::text[], %(k)s::text[], %(t)s::text[], %(ttl)s::float8[],
                                     %(lg)s::float8[], %(p)s::int4[], %(nb)s::float8[], %(v)s::float8[],
                                     %(f)s::bytea[])
                     WITH ORDINALITY AS m(q, k, t, ttl, lg, p, nb, v, f, n)),
            claimed AS (
                INSERT INTO {keys} AS k (queue, key, owner, expires_at, claimed_in)
                SELECT q, k, t, {NOW} + ttl, txid_current() FROM m ORDER BY q, k
                ON CONFLICT (queue, key) DO UPDATE SET
                    owner = CASE WHEN {free} THEN EXCLUDED.owner ELSE k.owner END,
                    expires_at = CASE WHEN {free} THEN EXCLUDED.expires_at ELSE k.expires_at END,
                    claimed_in = CASE WHEN {free} THEN EXCLUDED.claimed_in ELSE k.claimed_in END
                RETURNING k.queue, k.key, k.owner, k.claimed_in = txid_current() AS won),
            ins AS (
                INSERT INTO {jobs} ({_COLUMNS}, {_KEY_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f, m.k, m.ttl, m.lg
                FROM m JOIN claimed c ON c.queue = m.q AND c.key = m.k
                WHERE c.won
                ORDER BY m.n)
            SELECT queue, key, CASE WHEN won THEN NULL ELSE owner END,
                   CASE WHEN won THEN pg_notify(%(ch)s, queue) END
            FROM claimed""",
        # replay's claim: where the key is free or the entry's own task holds it
        "reclaim": f"""
            INSERT INTO {keys} AS k (queue, key, owner, expires_at, claimed_in)
            VALUES (%s, %s, %s, {NOW} + %s, txid_current())
            ON CONFLICT (queue, key) DO UPDATE
            SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, claimed_in = EXCLUDED.claimed_in
            WHERE {free} OR k.owner = EXCLUDED.owner
            RETURNING 1""",
        "release_key": f"DELETE FROM {keys} WHERE queue = %s AND key = %s AND owner = %s AND expires_at > {NOW}",
        "key_owner": f"SELECT owner FROM {keys} WHERE queue = %s AND key = %s AND expires_at > {NOW}",
        "sweep_keys": f"""
            DELETE FROM {keys} WHERE (queue, key) IN (
                SELECT queue, key FROM {keys} WHERE expires_at <= {NOW} LIMIT %s FOR UPDATE SKIP LOCKED)""",
        "claim": f"""
            WITH cand AS (
                SELECT c.id, c.priority
                FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL (
                    SELECT * FROM (
                        SELECT id, priority FROM {jobs}
                        WHERE queue = q.name AND state = 0
                        ORDER BY priority DESC, id LIMIT %(n)s
                        FOR UPDATE SKIP LOCKED) ready
                    UNION ALL
                    SELECT * FROM (
                        SELECT id, priority FROM {jobs}
                        WHERE queue = q.name AND state <> 0 AND available_at <= {NOW}
                        ORDER BY priority DESC, id LIMIT %(n)s
                        FOR UPDATE SKIP LOCKED) due_again
                ) c
                ORDER BY c.priority DESC, c.id LIMIT %(n)s)
            UPDATE {jobs} j
            SET state = 2, delivery_count = j.delivery_count + 1,
                available_at = {NOW} + coalesce(j.visibility_timeout, %(vt)s)
            FROM cand
            WHERE j.id = cand.id
            RETURNING j.id, j.queue, j.task_id, j.frame, j.delivery_count,
                      coalesce(j.visibility_timeout, %(vt)s), cand.priority, j.key""",
        "next_due": f"""
            SELECT min(w.available_at) - {NOW}
            FROM unnest(%s::text[]) AS q(name) CROSS JOIN LATERAL (
                SELECT available_at FROM {jobs} WHERE queue = q.name AND state <> 0
                ORDER BY available_at LIMIT 1) w""",
        "ack": f"DELETE FROM {jobs} WHERE id = ANY(%s::int8[])",
        "ack_keyed": f"""
            WITH d AS (DELETE FROM {jobs} WHERE id = ANY(%s::int8[]) RETURNING queue, task_id, key, key_linger),
            {release_ctes(s, "d")}
            SELECT 1""",
        "requeue": f"""
            WITH u AS (UPDATE {jobs} SET state = 0, available_at = {NOW} WHERE id = %s AND state = 2 RETURNING queue)
            SELECT pg_notify(%s, queue) FROM u""",
        "reject": f"""
            WITH d AS (DELETE FROM {jobs} WHERE id = %s AND state = 2 RETURNING *), {release_ctes(s, "d")}
            INSERT INTO {dead} ({_DEAD_COLUMNS})
            SELECT queue, task_id, 'rejected', {NOW}, priority, visibility_timeout, frame, {_KEY_COLUMNS} FROM d""",
        "dead_letter": f"""
            WITH d AS (DELETE FROM {jobs} WHERE id = %s RETURNING *), {release_ctes(s, "d")}
            INSERT INTO {dead} ({_DEAD_COLUMNS})
            SELECT queue, task_id, %s, {NOW}, priority, visibility_timeout, frame, {_KEY_COLUMNS} FROM d""",
        "retry": f"""
            WITH old AS (DELETE FROM {jobs} WHERE id = %s
                         RETURNING queue, task_id, priority, visibility_timeout, {_KEY_COLUMNS}),
            ins AS (
                INSERT INTO {jobs} ({_COLUMNS}, {_KEY_COLUMNS})
                SELECT old.queue, old.task_id, old.priority, {due}, old.visibility_timeout, %s,
                       old.key, old.key_ttl, old.key_linger
                FROM old, (SELECT %s::float8 AS nb) m
                RETURNING queue)
            SELECT pg_notify(%s, queue) FROM ins""",
        "extend": f"""
            UPDATE {jobs} j SET available_at = {NOW} + m.vt
            FROM unnest(%s::int8[], %s::float8[]) AS m(id, vt)
            WHERE j.id = m.id AND j.state = 2""",
        "dead_letters": f"""
            SELECT id, task_id, queue, reason, failed_at, frame, key FROM {dead}
            WHERE queue = %s ORDER BY id LIMIT %s""",
        # replay: (queue, ids or NULL for all); the keyed entries, locked, to claim again in key
        # order (as publish_keyed locks keys), each key's entries in DLQ order
        "replay_keyed": f"""
            SELECT id, task_id, key, key_ttl FROM {dead}
            WHERE queue = %s AND (%s::int8[] IS NULL OR id = ANY(%s::int8[])) AND key IS NOT NULL
            ORDER BY key, id FOR UPDATE""",
        # then (queue, ids or NULL, ids left in the DLQ, channel, queue)
        "replay": f"""
            WITH d AS (DELETE FROM {dead}
                       WHERE queue = %s AND (%s::int8[] IS NULL OR id = ANY(%s::int8[]))
                           AND NOT id = ANY(%s::int8[])
                       RETURNING *),
            ins AS (
                INSERT INTO {jobs} ({_COLUMNS}, {_KEY_COLUMNS})
                SELECT queue, task_id, priority, 0, {NOW}, visibility_timeout, frame, {_KEY_COLUMNS}
                FROM d ORDER BY id
                RETURNING 1)
            SELECT (SELECT count(*) FROM ins), pg_notify(%s, %s)""",
        "purge": f"""
            WITH d AS (DELETE FROM {jobs} WHERE queue = %s AND state IN (0, 1) RETURNING queue, task_id, key,
                       key_linger), {release_ctes(s, "d")}
            SELECT count(*) FROM d""",
        "purge_dead": f"DELETE FROM {dead} WHERE queue = %s",
        "stats": f"""
            SELECT (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state = 0),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at <= {NOW}),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 2),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 1),
                   (SELECT count(*) FROM {dead} WHERE queue = %(q)s)""",
        "delete_queue": f"""
            WITH j AS (DELETE FROM {jobs} WHERE queue = %(q)s), d AS (DELETE FROM {dead} WHERE queue = %(q)s),
            k AS (DELETE FROM {keys} WHERE queue = %(q)s)
            DELETE FROM {s}.stem_queues WHERE name = %(q)s""",
        "register": f"INSERT INTO {s}.stem_queues (name) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
        "queues": f"SELECT name FROM {s}.stem_queues ORDER BY name",
    }


class PostgresBroker(Broker):
    def __init__(self, conninfo: str = "postgresql://localhost/postgres", *, schema: str | None = None,
                 default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 max_deliveries: int = DEFAULT_MAX_DELIVERIES, reconnect_timeout: float = 10.0,
                 url: str | None = None):
        self.default_visibility_timeout = checks.seconds("default_visibility_timeout", default_visibility_timeout)
        self.max_deliveries = checks.integer("max_deliveries", max_deliveries)
        conninfo, schema = parse_postgres_url(conninfo, schema)
        self.url = url or conninfo
        self.schema = schema
        self._store = PostgresStore(conninfo, schema, who="PostgresBroker", errors=BROKER_ERRORS,
                                    reconnect_timeout=reconnect_timeout)
        self._pg, self._fast = self._store.durable, self._store.fast
        self._sql = _queries(quote_schema(schema))
        self.channel = f"stem.{schema}.jobs"
        self._generation: dict[str, int] = {}
        self._resets = 0
        self._new_locks()
        after_fork_in_child(self._new_locks)
        self._listener = self._store.listener(self.channel, self._on_notify, self._on_reset)
        self._known_queues: set[str] = set()
        self._next_key_sweep = time.monotonic() + _KEY_SWEEP_EVERY_S
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "PostgresBroker":
        return cls(url, url=url, **kwargs)

    def migrate(self) -> int:
        """Create or upgrade the schema (idempotent, advisory-locked; also done on first use)."""
        return self._store.migrate()

    # -- wake-ups -------------------------------------------------------------------
    def _new_locks(self) -> None:
        """At construction and in a forked child (where another thread may have held it)."""
        self._cond = threading.Condition(threading.Lock())

    def _on_notify(self, queue: str) -> None:
        with self._cond:
            self._generation[queue] = self._generation.get(queue, 0) + 1
            self._cond.notify_all()

    def _on_reset(self) -> None:
        with self._cond:
            self._resets += 1
            self._cond.notify_all()

    def _seen(self, queues: Sequence[str]) -> int:
        return self._resets + sum(self._generation.get(q, 0) for q in queues)

    def _register(self, names: Sequence[str]) -> None:
        new = [n for n in names if n not in self._known_queues]
        if new:
            self._pg.run(lambda conn: conn.execute(self._sql["register"], (new,)))
            self._known_queues.update(new)

    # -- publishing -------------------------------------------------------------------
    def publish(self, message: Message) -> None:
        self.publish_many((message,))

    def publish_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        queues = list(dict.fromkeys(m.queue for m in messages))
        for q in queues:
            validate_queue_name(q)
        self._register(queues)
        params = self.publish_params(messages, queues)
        self._pg.run(lambda conn: conn.execute(self._sql["publish"], params))
        for q in queues:            # consumers of this instance need not wait for the round trip
            self._on_notify(q)

    def publish_params(self, messages: Sequence[Message], queues: list[str]) -> tuple:
        """The parameters of the publish statement (``sql("publish")``) for ``messages`` of ``queues``."""
        return ([m.queue for m in messages], [m.task_id for m in messages], [int(m.priority) for m in messages],
                [m.not_before for m in messages],
                [float(m.visibility_timeout) if m.visibility_timeout else None for m in messages],
                [bytes(m.frame) for m in messages], self.channel, queues)

    def sql(self, name: str) -> str:
        """One of this broker's statements (for the async producer, ``stem.brokers.postgres_async``)."""
        return self._sql[name]

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        items = check_keyed(items)
        if not items:
            return []
        params, first, queues = self.keyed_params(items)
        self._register(queues)
        rows = self._pg.run(lambda conn: conn.execute(self._sql["publish_keyed"], params).fetchall())
        out = self.keyed_holders(items, first, rows)
        if time.monotonic() >= self._next_key_sweep:
            self._next_key_sweep = time.monotonic() + _KEY_SWEEP_EVERY_S
            self._fast.run(lambda conn: conn.execute(self._sql["sweep_keys"], (_KEY_SWEEP_ROWS,)))
        return out

    def keyed_params(self, items: list[Keyed]) -> tuple[dict[str, Any], dict[tuple[str, str], int], list[str]]:
        """``publish_keyed``'s statement parameters for checked ``items``, the index of each
        key's first item, and the queues (to register)."""
        first: dict[tuple[str, str], int] = {}      # (queue, key) -> index of its first item
        for n, item in enumerate(items):
            first.setdefault((item.message.queue, item.key), n)
        batch = [items[n] for n in first.values()]
        msgs = [i.message for i in batch]
        queues = list(dict.fromkeys(m.queue for m in msgs))
        params = {"q": [m.queue for m in msgs], "k": [i.key for i in batch], "t": [m.task_id for m in msgs],
                  "ttl": [float(i.ttl) for i in batch],
                  "lg": [float(i.linger) for i in batch], "p": [int(m.priority) for m in msgs],
                  "nb": [m.not_before for m in msgs],
                  "v": [float(m.visibility_timeout) if m.visibility_timeout else None for m in msgs],
                  "f": [bytes(m.frame) for m in msgs], "ch": self.channel}
        return params, first, queues

    def keyed_holders(self, items: list[Keyed], first: dict[tuple[str, str], int], rows: list) -> list[str | None]:
        """``publish_keyed``'s answer from the rows of its statement."""
        holder = {(r[0], r[1]): r[2] for r in rows}        # None: claimed by this call
        out: list[str | None] = []
        for n, item in enumerate(items):
            qk = (item.message.queue, item.key)
            held = holder[qk]
            out.append(held if held is not None or first[qk] == n else items[first[qk]].message.task_id)
        for q in {q for (q, _), held in holder.items() if held is None}:
            self._on_notify(q)
        return out

    def release_key(self, queue: str, key: str, owner: str) -> bool:
        validate_queue_name(queue)
        return self._pg.run(lambda conn: conn.execute(self._sql["release_key"], (queue, key, owner)).rowcount) > 0

    def key_owner(self, queue: str, key: str) -> str | None:
        validate_queue_name(queue)
        row = self._fast.run(lambda conn: conn.execute(self._sql["key_owner"], (queue, key)).fetchone())
        return None if row is None else row[0]

    # -- consuming --------------------------------------------------------------------
    def consume(self, queues: Sequence[str], max_count: int, timeout: float,
                *, consumer: str = "") -> list[Delivery]:
        queues = check_consume(queues, max_count)
        self._register(queues)
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self._closed:
            seen = self._seen(queues)
            out = self._claim(queues, max_count)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            listening = self._listener.listening
            if not listening and self._listener.ensure(min(2.0, remaining)):
                continue        # listening from now on: claim again, a publish may have come first
            next_due = self._fast.run(lambda conn: conn.execute(self._sql["next_due"], (queues,)).fetchone()[0])
            wait = remaining
            if next_due is not None:
                wait = min(wait, max(next_due, 0.001))
            if not listening:
                wait = min(wait, _FALLBACK_POLL_S)
            with self._cond:
                if self._seen(queues) == seen and not self._closed:
                    self._cond.wait(wait)
        return []

    def _claim(self, queues: list[str], max_count: int) -> list[Delivery]:
        params = {"queues": queues, "n": max_count, "vt": self.default_visibility_timeout}
        rows = self._fast.run(lambda conn: conn.execute(self._sql["claim"], params, binary=True).fetchall())
        now = time.time()
        rows.sort(key=lambda r: (-r[6], r[0]))
        return [Delivery(r[1], r[2], r[3], r[0], r[4], r[5], now, r[7]) for r in rows]

    # -- settling ---------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.receipt for d in deliveries]
        if ids:
            sql = self._sql["ack_keyed" if any(d.key is not None for d in deliveries) else "ack"]
            self._fast.run(lambda conn: conn.execute(sql, (ids,)))

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        if requeue:
            self._fast.run(lambda conn: conn.execute(self._sql["requeue"], (delivery.receipt, self.channel)))
        else:
            self._pg.run(lambda conn: conn.execute(self._sql["reject"], (delivery.receipt,)))

    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        self._pg.run(lambda conn: conn.execute(self._sql["retry"], (delivery.receipt, bytes(frame), not_before,
                                                                     self.channel)))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._pg.run(lambda conn: conn.execute(self._sql["dead_letter"], (delivery.receipt, reason)))

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        if deliveries:
            params = ([d.receipt for d in deliveries],
                      [float(visibility_timeout or d.visibility_timeout) for d in deliveries])
            self._fast.run(lambda conn: conn.execute(self._sql["extend"], params))

    # -- dead letters and admin -------------------------------------------------------
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        validate_queue_name(queue)
        rows = self._fast.run(lambda conn: conn.execute(self._sql["dead_letters"], (queue, max(limit, 0))).fetchall())
        return [DeadLetter(str(r[0]), r[1], r[2], r[3], r[4], bytes(r[5]), r[6]) for r in rows]

    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """One transaction: the keyed entries' keys are claimed again (owner: the entry's task
        id, its ttl), each key by its entries in DLQ order; those whose key another task holds
        stay; the rest move."""
        validate_queue_name(queue)
        wanted = None
        if ids is not None:
            try:
                wanted = [int(i) for i in ids]
            except ValueError:
                raise ConfigurationError(f"bad dead-letter id in {list(ids)!r}") from None

        def move(conn) -> int:
            with conn.transaction():
                held = [entry_id for entry_id, task_id, key, ttl
                        in conn.execute(self._sql["replay_keyed"], (queue, wanted, wanted)).fetchall()
                        if conn.execute(self._sql["reclaim"], (queue, key, task_id, ttl or 0.0)).fetchone() is None]
                return int(conn.execute(self._sql["replay"], (queue, wanted, wanted, held, self.channel, queue))
                           .fetchone()[0])

        return self._pg.run(move)

    def purge(self, queue: str) -> int:
        validate_queue_name(queue)
        return int(self._pg.run(lambda conn: conn.execute(self._sql["purge"], (queue,)).fetchone()[0]))

    def purge_dead_letters(self, queue: str) -> int:
        validate_queue_name(queue)
        return self._pg.run(lambda conn: conn.execute(self._sql["purge_dead"], (queue,)).rowcount)

    def delete_queue(self, queue: str) -> None:
        validate_queue_name(queue)
        self._pg.run(lambda conn: conn.execute(self._sql["delete_queue"], {"q": queue}))
        self._known_queues.discard(queue)
        with self._cond:
            self._generation.pop(queue, None)

    def stats(self, queue: str) -> QueueStats:
        validate_queue_name(queue)
        r = self._fast.run(lambda conn: conn.execute(self._sql["stats"], {"q": queue}).fetchone())
        return QueueStats(queue, r[0] + r[1], r[2], r[3], r[4])

    def queues(self) -> list[str]:
        return [r[0] for r in self._fast.run(lambda conn: conn.execute(self._sql["queues"]).fetchall())]

    def ping(self) -> None:
        self._pg.run(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        self._closed = True
        self._listener.stop()
        with self._cond:
            self._cond.notify_all()
        self._store.close()


def migrate(url: str, *, schema: str | None = None) -> int:
    """Create or upgrade stem's Postgres tables at ``url`` (for ``stem migrate``).  Returns the version."""
    with PostgresBroker(url, schema=schema) as broker:
        return broker.migrate()
