"""The SQLite broker: a durable queue in one file, shared by the processes of one machine.

URLs: ``sqlite:///stem.db`` (relative to the current directory),
``sqlite:////var/lib/stem.db`` (absolute), ``sqlite://`` (in memory, one
process).  Options in the query string: ``busy_timeout`` (seconds).  The
schema lives in ``stem/stores/sqlite_schema.py``, connections and error
translation in ``stem/stores/sqlite.py``.

* **Claim.**  One ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, so
  claims from every process are serialised): due delayed rows and expired
  leases of the consumed queues go back to ready (state 0), then the best
  ``max_count`` ready rows (priority, then id = age) are leased with
  ``UPDATE ... RETURNING`` for their own visibility timeout (a message
  without one: the consuming broker's ``default_visibility_timeout``), past
  ``max_deliveries`` too (the consumer dead-letters those).  Task id and frame
  come back as text and bytes whatever a hand-written row holds.
* **Settle.**  ``ack`` deletes rows (batched); ``retry`` deletes the row and
  inserts the new frame in one transaction; ``dead_letter`` copies then
  deletes in one transaction.  Receipts are row ids, never reused
  (AUTOINCREMENT).
* **Keys.**  ``publish_keyed`` runs one write transaction per batch: for each
  item in order, an upsert into ``stem_keys`` that takes the key only where
  it is absent or expired (``ON CONFLICT DO UPDATE ... WHERE expires_at <=
  now RETURNING``), then the message row (carrying key, ttl and linger) only
  if it did; a refused item reads the holder.  The write lock makes the claim
  race-free across processes, and a failing insert rolls the claim back.  The
  terminal settles (ack, dead letter, reject, purge, delete_queue, and the
  backend's fused result+ack) release keys in their own transaction through
  ``stem.stores.sqlite_schema.release_keys``; retry copies the key columns to
  the new row; replay claims again.  Expired keys are swept by publish_keyed
  now and then (and overwritten by any claim meanwhile).
* **Limits** (schema version 5; ``docs/design.md``, "Brokers and backends").  A
  limited message is a row of ``stem_lane_messages``, never read by the
  unlimited claim; the claim's transaction first probes ``stem_lanes`` for a
  due lane of its queues and, if there is one, serves the lanes
  (``stem.brokers._lanes``) before the unlimited rows.  Buckets are rows of
  ``stem_buckets`` (one TAT per queue and rate key), slots are the leased lane
  rows.  The clock is the process's: SQLite has none of its own, and the
  processes sharing a file share the machine's.
* **Waiting.**  SQLite has no notifications.  An idle ``consume`` re-checks
  with a cheap indexed read (no write lock) every 5 ms, backing off to 50 ms,
  and never sleeps past the next due time; a publish in the same process wakes
  it at once through a condition variable.  It also never sleeps past the
  earliest ``next_eligible`` of its queues' lanes (the next token or slot).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from .. import _checks as checks
from ..errors import ConfigurationError
from ..stores.base import BROKER_ERRORS
from ..stores.sqlite import SqliteStore, parse_sqlite_url
from ..stores.sqlite_schema import LIMIT_COLUMNS, enter_lanes, left_lanes, release_keys, settle_acked
from . import _lanes
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Held, Keyed,
                   LaneStats, Limit, Message, QueueStats, check_consume, check_frame_batch, check_keyed, check_limit,
                   lane_of, validate_queue_name)

__all__ = ["SqliteBroker", "migrate"]

READY, DELAYED, LEASED = 0, 1, 2
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.05
_KEY_SWEEP_EVERY_S = 60.0
_KEY_SWEEP_ROWS = 10_000

_INSERT = ("INSERT INTO stem_messages (queue, task_id, priority, state, available_at, visibility_timeout, frame) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")
_INSERT_KEYED = ("INSERT INTO stem_messages (queue, task_id, priority, state, available_at, visibility_timeout, "
                 "frame, key, key_ttl, key_linger) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# takes the key where it is absent or expired; returns a row only then
_CLAIM = ("INSERT INTO stem_keys (queue, key, owner, expires_at) VALUES (?, ?, ?, ?) "
          "ON CONFLICT (queue, key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
          "WHERE stem_keys.expires_at <= ? RETURNING 1")
# replay's claim: also where the entry's own task still holds the key
_RECLAIM = _CLAIM.replace("RETURNING", "OR stem_keys.owner = excluded.owner RETURNING")
_LANE_COLUMNS = ("queue, task_id, priority, state, available_at, visibility_timeout, frame, key, key_ttl, key_linger, "
                 f"delivery_count, lane, {LIMIT_COLUMNS}")
_INSERT_LANE = f"INSERT INTO stem_lane_messages ({_LANE_COLUMNS}) VALUES ({','.join('?' * 17)})"
_LANE_RETURNING = ("id, queue, CAST(task_id AS BLOB), CAST(frame AS BLOB), delivery_count, "
                   f"coalesce(visibility_timeout, ?), key, {LIMIT_COLUMNS}")
_BUCKET_SWEEP_EVERY_S = 60.0


def limit_values(limit: Limit) -> tuple:
    """A message's ``Limit`` as the values of its row's (lane, *LIMIT_COLUMNS)."""
    return (lane_of(limit), limit.rate_key, float(limit.rate), int(limit.burst), limit.concurrency_key,
            int(limit.concurrency))


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqliteBroker(Broker):
    def __init__(self, path: str | None = None, *,
                 default_visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                 max_deliveries: int = DEFAULT_MAX_DELIVERIES, busy_timeout: float = 10.0,
                 url: str | None = None):
        """``path`` None or ``":memory:"`` is an in-memory database for this process."""
        if path == ":memory:":
            path = None
        self.default_visibility_timeout = checks.seconds("default_visibility_timeout", default_visibility_timeout)
        self.max_deliveries = checks.integer("max_deliveries", max_deliveries)
        self._store = SqliteStore(path, busy_timeout=busy_timeout, errors=BROKER_ERRORS)
        self.url = url or ("sqlite://" if path is None else f"sqlite:///{path}")
        self._known_queues: set[str] = set()
        self._next_key_sweep = time.monotonic() + _KEY_SWEEP_EVERY_S
        self._next_bucket_sweep = 0.0
        self._closed = False

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return None if self.url in ("sqlite://", "sqlite:///:memory:") else (self.url, {})

    @classmethod
    def from_url(cls, url: str = "sqlite://", **kwargs: Any) -> "SqliteBroker":
        path, options = parse_sqlite_url(url)
        if "busy_timeout" in options:
            kwargs.setdefault("busy_timeout", float(options.pop("busy_timeout")))
        if options:
            raise ConfigurationError(f"unknown option(s) {sorted(options)} in {url!r}; known: busy_timeout")
        return cls(path, url=url, **kwargs)

    def migrate(self) -> int:
        """Create or upgrade the tables (idempotent; also done on first use).  Returns the version."""
        return self._store.migrate()

    # -- helpers --------------------------------------------------------------------
    def _register(self, conn, names) -> None:
        new = [n for n in names if n not in self._known_queues]
        if new:
            conn.executemany("INSERT OR IGNORE INTO stem_queues (name) VALUES (?)", [(n,) for n in new])
            self._known_queues.update(new)

    def _row(self, m: Message, now: float) -> tuple:
        delayed = m.not_before is not None and m.not_before > now
        return (m.queue, m.task_id, int(m.priority), DELAYED if delayed else READY,
                m.not_before if delayed else now,
                float(m.visibility_timeout) if m.visibility_timeout else None, bytes(m.frame))

    @staticmethod
    def _dead(conn, ids: Sequence[int], reason: str, now: float, limited: bool = False) -> None:
        if not limited:
            conn.execute(
                "INSERT INTO stem_dead_letters (queue, task_id, reason, failed_at, priority, visibility_timeout, "
                "frame, key, key_ttl, key_linger) SELECT queue, task_id, ?, ?, priority, visibility_timeout, frame, "
                f"key, key_ttl, key_linger FROM stem_messages WHERE id IN ({_marks(len(ids))}) ORDER BY id",
                (reason, now, *ids))
            rows = conn.execute(f"DELETE FROM stem_messages WHERE id IN ({_marks(len(ids))}) "
                                "RETURNING queue, task_id, key, key_linger", tuple(ids)).fetchall()
            release_keys(conn, rows, now)
            return
        conn.execute(
            "INSERT INTO stem_dead_letters (queue, task_id, reason, failed_at, priority, visibility_timeout, frame, "
            f"key, key_ttl, key_linger, lane, {LIMIT_COLUMNS}) SELECT queue, task_id, ?, ?, priority, "
            f"visibility_timeout, frame, key, key_ttl, key_linger, lane, {LIMIT_COLUMNS} FROM stem_lane_messages "
            f"WHERE id IN ({_marks(len(ids))}) ORDER BY id", (reason, now, *ids))
        rows = conn.execute(f"DELETE FROM stem_lane_messages WHERE id IN ({_marks(len(ids))}) "
                            "RETURNING queue, task_id, key, key_linger, lane, concurrency_key", tuple(ids)).fetchall()
        release_keys(conn, [r[:4] for r in rows], now)
        left_lanes(conn, [(r[0], r[4], r[5]) for r in rows], now)

    # -- publishing -------------------------------------------------------------------
    def publish(self, message: Message) -> None:
        self.publish_many((message,))

    def publish_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        for name in {m.queue for m in messages}:
            validate_queue_name(name)
        now = time.time()
        limited = [m for m in messages if m.limit is not None]
        if limited:
            for m in limited:
                check_limit(m.limit)
            messages = [m for m in messages if m.limit is None]
        rows = [self._row(m, now) for m in messages]
        with self._store.write() as conn:
            self._register(conn, {m.queue for m in messages} | {m.queue for m in limited})
            if rows:
                conn.executemany(_INSERT, rows)
            if limited:
                self._enter(conn, [(*self._row(m, now), None, None, None, 0, *limit_values(m.limit))
                                   for m in limited])
        self._store.wake.notify()

    def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                       priority: int = 0, visibility_timeout: float | None = None) -> None:
        if not check_frame_batch(task_ids, frames):
            return
        validate_queue_name(queue)
        with self._store.write() as conn:
            self.publish_frames_in(conn, queue, task_ids, frames, priority=priority,
                                   visibility_timeout=visibility_timeout)
        self._store.wake.notify()

    def publish_frames_in(self, conn: Any, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                          priority: int = 0, visibility_timeout: float | None = None) -> None:
        """``publish_frames``' rows, written on ``conn`` inside the write transaction its
        caller holds on this file (a result backend creating a group with its members, so
        that both commit together or neither does); the caller wakes consumers
        (``store.wake.notify()``) once it committed."""
        check_frame_batch(task_ids, frames)
        validate_queue_name(queue)
        now = time.time()
        priority = int(priority)
        vt = float(visibility_timeout) if visibility_timeout else None
        self._register(conn, (queue,))
        conn.executemany(_INSERT, [(queue, t, priority, READY, now, vt, bytes(f)) for t, f in zip(task_ids, frames)])

    @staticmethod
    def _enter(conn, rows: Sequence[tuple]) -> None:
        """Insert lane messages (``_INSERT_LANE`` rows) and make their lanes due as they come due."""
        conn.executemany(_INSERT_LANE, rows)
        enter_lanes(conn, [(r[0], r[11], r[12], r[15], r[4]) for r in rows])

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        items = check_keyed(items)
        if not items:
            return []
        for item in items:
            if item.message.limit is not None:
                check_limit(item.message.limit)
        out: list[str | None] = []
        with self._store.write() as conn:
            now = time.time()
            self._register(conn, {i.message.queue for i in items})
            for item in items:
                m = item.message
                if conn.execute(_CLAIM, (m.queue, item.key, m.task_id, now + item.ttl, now)).fetchone() is None:
                    out.append(conn.execute("SELECT owner FROM stem_keys WHERE queue = ? AND key = ?",
                                            (m.queue, item.key)).fetchone()[0])
                    continue
                if m.limit is None:
                    conn.execute(_INSERT_KEYED, (*self._row(m, now), item.key, float(item.ttl), float(item.linger)))
                else:
                    self._enter(conn, [(*self._row(m, now), item.key, float(item.ttl), float(item.linger), 0,
                                        *limit_values(m.limit))])
                out.append(None)
            if time.monotonic() >= self._next_key_sweep:
                self._next_key_sweep = time.monotonic() + _KEY_SWEEP_EVERY_S
                conn.execute("DELETE FROM stem_keys WHERE (queue, key) IN (SELECT queue, key FROM stem_keys "
                             "WHERE expires_at <= ? LIMIT ?)", (now, _KEY_SWEEP_ROWS))
        if None in out:
            self._store.wake.notify()
        return out

    def release_key(self, queue: str, key: str, owner: str) -> bool:
        validate_queue_name(queue)
        with self._store.write() as conn:
            return conn.execute("DELETE FROM stem_keys WHERE queue = ? AND key = ? AND owner = ? AND expires_at > ?",
                                (queue, key, owner, time.time())).rowcount > 0

    def key_owner(self, queue: str, key: str) -> str | None:
        validate_queue_name(queue)
        with self._store.connection() as conn:
            row = conn.execute("SELECT owner FROM stem_keys WHERE queue = ? AND key = ? AND expires_at > ?",
                               (queue, key, time.time())).fetchone()
        return None if row is None else row[0]

    # -- consuming --------------------------------------------------------------------
    def consume(self, queues: Sequence[str], max_count: int, timeout: float,
                *, consumer: str = "") -> list[Delivery]:
        queues = check_consume(queues, max_count)
        if any(q not in self._known_queues for q in queues):
            with self._store.write() as conn:
                self._register(conn, queues)
        deadline = time.monotonic() + max(timeout, 0.0)
        poll = _POLL_MIN_S
        check_first = False
        while not self._closed:
            seen = self._store.wake.seq
            next_due = None
            if check_first:
                ready, next_due = self._probe(queues)
                if ready or (next_due is not None and next_due <= time.time()):
                    next_due = None
                    check_first = False
            if not check_first:
                out = self._claim(queues, max_count)
                if out:
                    return out
                check_first = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sleep = min(remaining, poll)
            if next_due is not None:
                sleep = min(sleep, max(next_due - time.time(), 0.001))
            self._store.wake.wait(seen, sleep)
            poll = _POLL_MIN_S if self._store.wake.seq != seen else min(poll * 2, _POLL_MAX_S)
        return []

    def _probe(self, queues: list[str]) -> tuple[bool, float | None]:
        """(any ready row?, earliest due time of delayed/leased rows and of lanes) -- reads only,
        no write lock."""
        ready = False
        next_due = None
        with self._store.connection() as conn:
            for q in queues:
                if not ready and conn.execute(
                        "SELECT 1 FROM stem_messages WHERE queue = ? AND state = 0 LIMIT 1", (q,)).fetchone():
                    ready = True
                for due, in conn.execute(
                        "SELECT min(available_at) FROM stem_messages WHERE queue = ?1 AND state <> 0 "
                        "UNION ALL SELECT min(next_eligible) FROM stem_lanes WHERE queue = ?1", (q,)).fetchall():
                    if due is not None and (next_due is None or due < next_due):
                        next_due = due
        return ready, next_due

    def _claim(self, queues: list[str], max_count: int) -> list[Delivery]:
        with self._store.write() as conn:
            now = time.time()
            out: list[Delivery] = []
            # the one step the unlimited path pays for limits: an index probe of the lanes table
            if conn.execute(f"SELECT 1 FROM stem_lanes WHERE queue IN ({_marks(len(queues))}) "
                            "AND next_eligible <= ? LIMIT 1", (*queues, now)).fetchone() is not None:
                out, _ = _lanes.serve(_SqliteLanes(conn, now, self.default_visibility_timeout), queues, max_count)
                if time.monotonic() >= self._next_bucket_sweep:
                    self._next_bucket_sweep = time.monotonic() + _BUCKET_SWEEP_EVERY_S
                    conn.execute("DELETE FROM stem_buckets WHERE tat < ?", (now,))
                max_count -= len(out)
                if max_count <= 0:
                    return out
            conn.execute(f"UPDATE stem_messages SET state = 0 WHERE queue IN ({_marks(len(queues))}) "
                         "AND state <> 0 AND available_at <= ?", (*queues, now))
            candidates: list[tuple[int, int]] = []
            for q in queues:
                candidates += conn.execute(
                    "SELECT id, priority FROM stem_messages WHERE queue = ? AND state = 0 "
                    "ORDER BY priority DESC, id LIMIT ?", (q, max_count)).fetchall()
            if len(queues) > 1:
                candidates.sort(key=lambda c: (-c[1], c[0]))
                del candidates[max_count:]
            if not candidates:
                return out
            take = [c[0] for c in candidates]
            vt = self.default_visibility_timeout
            # SQLite keeps what a hand-written row holds (text in the frame column, a blob that
            # is not UTF-8 as task id): both are read as bytes, so no row can fail the whole
            # claim or reach the worker as anything but bytes it can dead-letter
            rows = conn.execute(
                "UPDATE stem_messages SET state = 2, delivery_count = delivery_count + 1, "
                f"available_at = ? + coalesce(visibility_timeout, ?) WHERE id IN ({_marks(len(take))}) "
                "RETURNING id, queue, CAST(task_id AS BLOB), CAST(frame AS BLOB), delivery_count, "
                "coalesce(visibility_timeout, ?), key",
                (now, vt, *take, vt)).fetchall()
        order = {i: n for n, i in enumerate(take)}
        rows.sort(key=lambda r: order[r[0]])
        return out + [Delivery(r[1], r[2].decode("utf-8", "replace"), r[3], r[0], r[4], r[5], now, r[6])
                      for r in rows]

    # -- settling ---------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        with self._store.write() as conn:
            settle_acked(conn, deliveries, time.time())

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        now = time.time()
        limited = delivery.limit is not None
        table = "stem_lane_messages" if limited else "stem_messages"
        with self._store.write() as conn:
            if requeue:
                if not limited:
                    conn.execute("UPDATE stem_messages SET state = 0, available_at = ? WHERE id = ? AND state = 2",
                                 (now, delivery.receipt))
                else:
                    row = conn.execute("UPDATE stem_lane_messages SET state = 0, available_at = ? WHERE id = ? "
                                       "AND state = 2 RETURNING queue, lane, rate_key, concurrency_key",
                                       (now, delivery.receipt)).fetchone()
                    if row is not None:
                        left_lanes(conn, [(row[0], row[1], row[3])], now)
                        enter_lanes(conn, [(*row, now)])
            elif conn.execute(f"SELECT 1 FROM {table} WHERE id = ? AND state = 2", (delivery.receipt,)).fetchone():
                self._dead(conn, [delivery.receipt], "rejected", now, limited)
        if requeue or limited:
            self._store.wake.notify()

    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        now = time.time()
        with self._store.write() as conn:
            delayed = not_before is not None and not_before > now
            state, due = (DELAYED, not_before) if delayed else (READY, now)
            if delivery.limit is not None:
                old = conn.execute(f"DELETE FROM stem_lane_messages WHERE id = ? RETURNING queue, task_id, priority, "
                                   f"visibility_timeout, key, key_ttl, key_linger, lane, {LIMIT_COLUMNS}",
                                   (delivery.receipt,)).fetchone()
                if old is None:
                    return
                left_lanes(conn, [(old[0], old[7], old[11])], now)
                self._enter(conn, [(old[0], old[1], old[2], state, due, old[3], bytes(frame), *old[4:7], 0, *old[7:])])
            else:
                old = conn.execute("DELETE FROM stem_messages WHERE id = ? RETURNING queue, task_id, priority, "
                                   "visibility_timeout, key, key_ttl, key_linger", (delivery.receipt,)).fetchone()
                if old is None:
                    return
                conn.execute(_INSERT_KEYED, (old[0], old[1], old[2], state, due, old[3], bytes(frame), *old[4:]))
        self._store.wake.notify()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._store.write() as conn:
            self._dead(conn, [delivery.receipt], reason, time.time(), delivery.limit is not None)
        if delivery.limit is not None:
            self._store.wake.notify()

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        if not deliveries:
            return
        now = time.time()
        plain = [(now + (visibility_timeout or d.visibility_timeout), d.receipt) for d in deliveries if d.limit is None]
        limited = [(now + (visibility_timeout or d.visibility_timeout), d.receipt) for d in deliveries
                   if d.limit is not None]
        with self._store.write() as conn:
            if plain:
                conn.executemany("UPDATE stem_messages SET available_at = ? WHERE id = ? AND state = 2", plain)
            if limited:
                conn.executemany("UPDATE stem_lane_messages SET available_at = ? WHERE id = ? AND state = 2", limited)

    def route_limited(self, delivery: Delivery, limit: Limit) -> None:
        check_limit(limit)
        now = time.time()
        source = "stem_lane_messages" if delivery.limit is not None else "stem_messages"
        with self._store.write() as conn:
            old = conn.execute(f"DELETE FROM {source} WHERE id = ? AND state = 2 AND delivery_count = ? RETURNING "
                               "queue, task_id, priority, visibility_timeout, frame, key, key_ttl, key_linger, "
                               "delivery_count" + (", lane, concurrency_key" if delivery.limit is not None else ""),
                               (delivery.receipt, delivery.delivery_count)).fetchone()
            if old is None:
                return
            if delivery.limit is not None:
                left_lanes(conn, [(old[0], old[9], old[10])], now)
            # routing is not a delivery: the next lease counts as the routed one did
            self._enter(conn, [(old[0], old[1], old[2], READY, now, old[3], old[4], *old[5:8], old[8] - 1,
                                *limit_values(limit))])
        self._store.wake.notify()

    # -- dead letters and admin -------------------------------------------------------
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        validate_queue_name(queue)
        with self._store.connection() as conn:
            rows = conn.execute("SELECT id, task_id, queue, reason, failed_at, frame, key FROM stem_dead_letters "
                                "WHERE queue = ? ORDER BY id LIMIT ?", (queue, max(limit, 0))).fetchall()
        return [DeadLetter(str(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def replay(self, queue: str, ids: Sequence[str] | None = None) -> int:
        validate_queue_name(queue)
        now = time.time()
        with self._store.write() as conn:
            if ids is None:
                where, params = "queue = ?", (queue,)
            else:
                try:
                    wanted = [int(i) for i in ids]
                except ValueError:
                    raise ConfigurationError(f"bad dead-letter id in {list(ids)!r}") from None
                if not wanted:
                    return 0
                where, params = f"queue = ? AND id IN ({_marks(len(wanted))})", (queue, *wanted)
            held = self._reclaim(conn, queue, where, params, now)
            if held:            # entries whose key another task holds stay in the DLQ
                where, params = f"{where} AND id NOT IN ({_marks(len(held))})", (*params, *held)
            moved = conn.execute(
                "INSERT INTO stem_messages (queue, task_id, priority, state, available_at, visibility_timeout, "
                "frame, key, key_ttl, key_linger) SELECT queue, task_id, priority, 0, ?, visibility_timeout, frame, "
                f"key, key_ttl, key_linger FROM stem_dead_letters WHERE {where} AND lane IS NULL ORDER BY id",
                (now, *params)).rowcount
            # a limited dead letter goes back into its lane
            lane_rows = conn.execute(
                "SELECT queue, task_id, priority, 0, ?, visibility_timeout, frame, key, key_ttl, key_linger, 0, "
                f"lane, {LIMIT_COLUMNS} FROM stem_dead_letters WHERE {where} AND lane IS NOT NULL ORDER BY id",
                (now, *params)).fetchall()
            if lane_rows:
                self._enter(conn, lane_rows)
                moved += len(lane_rows)
            conn.execute(f"DELETE FROM stem_dead_letters WHERE {where}", params)
        if moved:
            self._store.wake.notify()
        return moved

    @staticmethod
    def _reclaim(conn, queue: str, where: str, params: tuple, now: float) -> list[int]:
        """Claim again, in DLQ order, the keys of the keyed entries about to be replayed (owner:
        the entry's task id, its ttl); returns the ids of those whose key another task holds."""
        held = []
        for entry_id, task_id, key, ttl in conn.execute(
                f"SELECT id, task_id, key, key_ttl FROM stem_dead_letters WHERE {where} AND key IS NOT NULL "
                "ORDER BY id", params).fetchall():
            if conn.execute(_RECLAIM, (queue, key, task_id, now + (ttl or 0.0), now)).fetchone() is None:
                held.append(entry_id)
        return held

    def purge(self, queue: str) -> int:
        validate_queue_name(queue)
        with self._store.write() as conn:
            return self._drop_waiting(conn, queue, time.time())

    @staticmethod
    def _drop_waiting(conn, queue: str, now: float) -> int:
        """Delete the queue's waiting messages (ready, delayed, in lanes), releasing their keys."""
        release_keys(conn, conn.execute(
            "SELECT queue, task_id, key, key_linger FROM stem_messages WHERE queue = ? AND state IN (0, 1) "
            "AND key IS NOT NULL", (queue,)).fetchall(), now)
        count = conn.execute("DELETE FROM stem_messages WHERE queue = ? AND state IN (0, 1)", (queue,)).rowcount
        rows = conn.execute("DELETE FROM stem_lane_messages WHERE queue = ? AND state IN (0, 1) "
                            "RETURNING queue, task_id, key, key_linger, lane", (queue,)).fetchall()
        if rows:
            release_keys(conn, [r[:4] for r in rows], now)
            left_lanes(conn, [(queue, lane, None) for lane in {r[4] for r in rows}], now)
        return count + len(rows)

    def purge_hold(self, queue: str) -> int:
        validate_queue_name(queue)
        with self._store.write() as conn:
            # copied, then deleted, in one write transaction: never in both places, never in neither
            for table in ("stem_messages", "stem_lane_messages"):
                conn.execute(f"INSERT INTO stem_purge_held (queue, task_id, frame) SELECT queue, task_id, frame "
                             f"FROM {table} WHERE queue = ? AND state IN (0, 1) ORDER BY id", (queue,))
            return self._drop_waiting(conn, queue, time.time())

    def purge_held(self, queue: str, limit: int = 1000) -> list[Held]:
        validate_queue_name(queue)
        checks.integer("limit", limit)
        with self._store.connection() as conn:
            rows = conn.execute("SELECT id, task_id, frame FROM stem_purge_held WHERE queue = ? ORDER BY id LIMIT ?",
                                (queue, limit)).fetchall()
        return [Held(str(i), t, bytes(f)) for i, t, f in rows]

    def purge_drop(self, queue: str, ids: Sequence[str]) -> int:
        validate_queue_name(queue)
        numbers = [int(i) for i in ids if str(i).isdigit()]
        dropped = 0
        with self._store.write() as conn:
            for i in range(0, len(numbers), 500):
                chunk = numbers[i:i + 500]
                dropped += conn.execute(f"DELETE FROM stem_purge_held WHERE queue = ? AND id IN "
                                        f"({','.join('?' * len(chunk))})", (queue, *chunk)).rowcount
        return dropped

    def purge_dead_letters(self, queue: str) -> int:
        validate_queue_name(queue)
        with self._store.write() as conn:
            return conn.execute("DELETE FROM stem_dead_letters WHERE queue = ?", (queue,)).rowcount

    def delete_queue(self, queue: str) -> None:
        validate_queue_name(queue)
        with self._store.write() as conn:
            conn.execute("DELETE FROM stem_messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_dead_letters WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_keys WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_lane_messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_purge_held WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_lanes WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_buckets WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM stem_queues WHERE name = ?", (queue,))
        self._known_queues.discard(queue)

    def stats(self, queue: str) -> QueueStats:
        validate_queue_name(queue)
        now = time.time()
        with self._store.connection() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM stem_messages WHERE queue = ?1 AND state = 0),"
                " (SELECT count(*) FROM stem_messages WHERE queue = ?1 AND state <> 0 AND available_at <= ?2),"
                " (SELECT count(*) FROM stem_messages WHERE queue = ?1 AND state <> 0 AND available_at > ?2"
                "  AND state = 2),"
                " (SELECT count(*) FROM stem_messages WHERE queue = ?1 AND state <> 0 AND available_at > ?2"
                "  AND state = 1),"
                " (SELECT count(*) FROM stem_dead_letters WHERE queue = ?1),"
                # lane messages: waiting (and those due again) are throttled; the others leased or delayed
                " (SELECT count(*) FROM stem_lane_messages WHERE queue = ?1 AND state = 0),"
                " (SELECT count(*) FROM stem_lane_messages WHERE queue = ?1 AND state <> 0 AND available_at <= ?2),"
                " (SELECT count(*) FROM stem_lane_messages WHERE queue = ?1 AND state <> 0 AND available_at > ?2"
                "  AND state = 2),"
                " (SELECT count(*) FROM stem_lane_messages WHERE queue = ?1 AND state <> 0 AND available_at > ?2"
                "  AND state = 1)", (queue, now)).fetchone()
        return QueueStats(queue, row[0] + row[1], row[2] + row[7], row[3] + row[8], row[4], row[5] + row[6])

    def lane_stats(self, queue: str, limit: int = 100) -> list[LaneStats]:
        validate_queue_name(queue)
        now = time.time()
        with self._store.connection() as conn:
            rows = conn.execute(
                "SELECT lane, rate_key, concurrency_key, sum(state = 0 OR available_at <= ?2) AS waiting, "
                " (SELECT count(*) FROM stem_lane_messages s WHERE s.queue = ?1 AND s.concurrency_key = "
                "  m.concurrency_key AND s.state = 2 AND s.available_at > ?2) AS running "
                "FROM stem_lane_messages m WHERE queue = ?1 GROUP BY lane "
                "HAVING waiting > 0 OR running > 0 ORDER BY waiting DESC, lane LIMIT ?3",
                (queue, now, max(limit, 0))).fetchall()
        return [LaneStats(queue, r[1], r[2], r[3], r[4]) for r in rows]

    def queues(self) -> list[str]:
        with self._store.connection() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM stem_queues ORDER BY name")]

    def ping(self) -> None:
        with self._store.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._closed = True
        self._store.wake.notify()
        self._store.close()


def _lane_delivery(r: tuple, now: float) -> Delivery:
    """A Delivery from a lane row as ``_LANE_RETURNING`` reads it."""
    return Delivery(r[1], r[2].decode("utf-8", "replace"), r[3], r[0], r[4], r[5], now, r[6],
                    Limit(r[7], float(r[8]), int(r[9]), r[10], int(r[11])))


class _SqliteLanes(_lanes.LaneOps):
    """``stem.brokers._lanes``' statements for SQLite, inside the claim's write transaction (the
    write lock serialises every claim and settle, so nothing more is locked)."""

    def __init__(self, conn, now: float, vt: float):
        self.conn, self.now, self.vt = conn, now, vt

    def due_lanes(self, queues, limit):
        return self.now, self.conn.execute(
            f"SELECT queue, lane, rate_key, concurrency_key FROM stem_lanes WHERE queue IN ({_marks(len(queues))}) "
            "AND next_eligible <= ? ORDER BY next_eligible, queue, lane LIMIT ?", (*queues, self.now, limit)).fetchall()

    def promote(self, queue, lane, now):
        self.conn.execute("UPDATE stem_lane_messages SET state = 0 WHERE queue = ? AND lane = ? AND state <> 0 "
                          "AND available_at <= ?", (queue, lane, now))

    def head(self, queue, lane, rate_key, concurrency_key, now):
        row = self.conn.execute("SELECT id, rate, burst, concurrency FROM stem_lane_messages "
                                "WHERE queue = ? AND lane = ? "
                                "AND state = 0 ORDER BY priority DESC, available_at, id LIMIT 1",
                                (queue, lane)).fetchone()
        if row is None:
            return None
        tat = live = first = None
        if rate_key is not None:
            found = self.conn.execute("SELECT tat FROM stem_buckets WHERE queue = ? AND rate_key = ?",
                                      (queue, rate_key)).fetchone()
            tat = None if found is None else found[0]
        if concurrency_key is not None:
            live, first = self.conn.execute(
                "SELECT count(*), min(available_at) FROM stem_lane_messages WHERE queue = ? AND concurrency_key = ? "
                "AND state = 2 AND available_at > ?", (queue, concurrency_key, now)).fetchone()
        return row[0], row[1], row[2], row[3], tat, live or 0, first

    def lease(self, row_id, queue, rate_key, tat, now):
        r = self.conn.execute(
            "UPDATE stem_lane_messages SET state = 2, delivery_count = delivery_count + 1, "
            f"available_at = ? + coalesce(visibility_timeout, ?) WHERE id = ? RETURNING {_LANE_RETURNING}",
            (now, self.vt, row_id, self.vt)).fetchone()
        if tat is not None:
            self.conn.execute("INSERT INTO stem_buckets (queue, rate_key, tat) VALUES (?, ?, ?) "
                              "ON CONFLICT (queue, rate_key) DO UPDATE SET tat = excluded.tat", (queue, rate_key, tat))
        return _lane_delivery(r, now)

    def reschedule(self, queue, lane, next_eligible, blocked):
        self.conn.execute("UPDATE stem_lanes SET next_eligible = ?, blocked = ? WHERE queue = ? AND lane = ?",
                          (next_eligible, int(blocked), queue, lane))

    def idle(self, queue, lane):
        due = self.conn.execute("SELECT min(available_at) FROM stem_lane_messages WHERE queue = ? AND lane = ? "
                                "AND state <> 0", (queue, lane)).fetchone()[0]
        if due is None:
            self.conn.execute("DELETE FROM stem_lanes WHERE queue = ? AND lane = ?", (queue, lane))
        else:
            self.reschedule(queue, lane, due, False)


def migrate(url: str) -> int:
    """Create or upgrade stem's tables in the SQLite file at ``url`` (for ``stem migrate``).  Returns the version."""
    with SqliteBroker.from_url(url) as broker:
        return broker.migrate()
