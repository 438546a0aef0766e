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
* **Limits** (schema version 5; ``docs/design.md``, "Brokers and backends"): a
  limited message is a row of ``stem_lane_jobs``, which the unlimited claim
  never reads; the claim statement only probes ``stem_lanes`` for a due lane
  of its queues (a one-time filter) and, when there is one, leases nothing: a
  consume whose claim found nothing asks why (``after_empty_claim``: a due
  lane, a ready row, the next due time, in one query, the one an idle
  consume ran anyway) and, for a due lane, serves the lanes in one transaction
  (``stem.brokers._lanes``, ``_PgLanes``: lanes locked ``FOR UPDATE SKIP
  LOCKED``, their rate and concurrency keys by advisory locks taken without
  waiting, time from ``now()``), then claims the unlimited rows.  Settles of
  lane jobs free their slot in the same statement and wake the lanes waiting
  on it (``postgres_schema.wake_ctes``, with a notification).
* **Waiting**: a per-broker listener thread LISTENs on ``stem.<schema>.jobs``;
  an idle ``consume`` sleeps on a condition variable until a notification for
  one of its queues, the next due time of a delayed row or lease or of a
  lane (its next token or slot), or its timeout -- no polling while the
  listener is up.
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
from ..stores.postgres_schema import LIMIT_COLUMNS, NOW, quote_schema, release_ctes, wake_ctes
from . import _lanes
from .base import (DEFAULT_MAX_DELIVERIES, DEFAULT_VISIBILITY_TIMEOUT, Broker, DeadLetter, Delivery, Held, Keyed,
                   LaneStats, Limit, Message, QueueStats, check_consume, check_frame_batch, check_keyed, check_limit,
                   lane_of, validate_queue_name)

__all__ = ["PostgresBroker", "migrate"]

_FALLBACK_POLL_S = 1.0       # only while the listener is reconnecting
_KEY_SWEEP_EVERY_S = 60.0
_KEY_SWEEP_ROWS = 10_000

_COLUMNS = "queue, task_id, priority, state, available_at, visibility_timeout, frame"
_KEY_COLUMNS = "key, key_ttl, key_linger"
_DEAD_COLUMNS = f"queue, task_id, reason, failed_at, priority, visibility_timeout, frame, {_KEY_COLUMNS}"
_LANE_COLUMNS = f"{_COLUMNS}, {_KEY_COLUMNS}, delivery_count, lane, {LIMIT_COLUMNS}"
_CONTENDED_RETRY_S = 0.005   # a due lane another consume holds: look again this soon
_BUCKET_SWEEP_EVERY_S = 60.0


def _lanes_in(s: str, source: str, due: str) -> str:
    """An upsert of the lanes of the lane jobs in ``source`` (columns q, lane, rk, ck, and the
    due-time expression ``due``): each lane created, or made due at its earliest newcomer unless
    it is ``blocked`` (see ``stem.brokers._lanes``).  Lanes in key order, as settles lock them."""
    return f"""
        INSERT INTO {s}.stem_lanes AS l (queue, lane, rate_key, concurrency_key, next_eligible, blocked)
        SELECT q, lane, min(rk), min(ck), min({due}), false FROM {source} GROUP BY q, lane ORDER BY q, lane
        ON CONFLICT (queue, lane) DO UPDATE SET next_eligible = EXCLUDED.next_eligible
        WHERE NOT l.blocked AND l.next_eligible > EXCLUDED.next_eligible"""


def _claim_sql(jobs: str) -> str:
    """The unlimited claim (a ``str.format`` template: ``guard`` filters the consumed queues)."""
    return f"""
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
                {{guard}}
                ORDER BY c.priority DESC, c.id LIMIT %(n)s)
            UPDATE {jobs} j
            SET state = 2, delivery_count = j.delivery_count + 1,
                available_at = {NOW} + coalesce(j.visibility_timeout, %(vt)s)
            FROM cand
            WHERE j.id = cand.id
            RETURNING j.id, j.queue, j.task_id, j.frame, j.delivery_count,
                      coalesce(j.visibility_timeout, %(vt)s), cand.priority, j.key"""


def _publish_keyed(s: str, due: str, free: str, *, limited: bool) -> str:
    """``publish_keyed``'s statement; ``limited``: its items may carry limits (more arrays), and
    those go into their lanes."""
    jobs, keys = f"{s}.stem_jobs", f"{s}.stem_keys"
    arrays, names, lanes = "", "", ""
    if limited:
        arrays = (", %(lane)s::text[], %(rk)s::text[], %(r)s::float8[], %(b)s::int4[], %(ck)s::text[], "
                  "%(c)s::int4[]")
        names = ", lane, rk, r, b, ck, c"
        lanes = f""",
            won_lanes AS (SELECT m.* FROM m JOIN claimed c ON c.queue = m.q AND c.key = m.k
                          WHERE c.won AND m.lane IS NOT NULL),
            ins_lanes AS (
                INSERT INTO {s}.stem_lane_jobs ({_LANE_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f, m.k, m.ttl, m.lg, 0, m.lane, m.rk, m.r, m.b, m.ck, m.c
                FROM won_lanes m ORDER BY m.n),
            lanes_in AS ({_lanes_in(s, "won_lanes", f"CASE WHEN nb > {NOW} THEN nb ELSE {NOW} END")})"""
    # the batch's distinct keys, in key order (concurrent batches lock them alike); a live
    # key is "updated" to itself, so that RETURNING names its holder (claimed_in: who won)
    return f"""
            WITH m AS (
                SELECT * FROM unnest(%(q)s::text[], %(k)s::text[], %(t)s::text[], %(ttl)s::float8[],
                                     %(lg)s::float8[], %(p)s::int4[], %(nb)s::float8[], %(v)s::float8[],
                                     %(f)s::bytea[]{arrays})
                     WITH ORDINALITY AS m(q, k, t, ttl, lg, p, nb, v, f{names}, n)),
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
                WHERE c.won{" AND m.lane IS NULL" if limited else ""}
                ORDER BY m.n){lanes}
            SELECT queue, key, CASE WHEN won THEN NULL ELSE owner END,
                   CASE WHEN won THEN pg_notify(%(ch)s, queue) END
            FROM claimed"""


def _queries(s: str) -> dict[str, str]:
    jobs, dead, keys = f"{s}.stem_jobs", f"{s}.stem_dead_letters", f"{s}.stem_keys"
    lane_jobs, lanes, buckets = f"{s}.stem_lane_jobs", f"{s}.stem_lanes", f"{s}.stem_buckets"
    held = f"{s}.stem_purge_held"
    due = f"CASE WHEN m.nb > {NOW} THEN 1 ELSE 0 END, CASE WHEN m.nb > {NOW} THEN m.nb ELSE {NOW} END"
    lane_due = f"CASE WHEN nb > {NOW} THEN nb ELSE {NOW} END"
    free = f"k.expires_at <= {NOW}"
    claim = _claim_sql(jobs)
    return {
        "publish": f"""
            WITH ins AS (
                INSERT INTO {jobs} ({_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f
                FROM unnest(%s::text[], %s::text[], %s::int4[], %s::float8[], %s::float8[], %s::bytea[])
                     WITH ORDINALITY AS m(q, t, p, nb, v, f, n)
                ORDER BY m.n)
            SELECT pg_notify(%s, q) FROM unnest(%s::text[]) AS q""",
        # one unlimited message (a single enqueue): scalar parameters, no arrays to build and unnest
        "publish_one": f"""
            WITH m AS (SELECT %s::text AS q, %s::text AS t, %s::int4 AS p, %s::float8 AS nb, %s::float8 AS v,
                              %s::bytea AS f),
            ins AS (
                INSERT INTO {jobs} ({_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f FROM m)
            SELECT pg_notify(%s, m.q) FROM m""",
        "publish_keyed": _publish_keyed(s, due, free, limited=False),
        "publish_keyed_lanes": _publish_keyed(s, due, free, limited=True),
        "publish_lanes": f"""
            WITH m AS (
                SELECT * FROM unnest(%(q)s::text[], %(t)s::text[], %(p)s::int4[], %(nb)s::float8[], %(v)s::float8[],
                                     %(f)s::bytea[], %(lane)s::text[], %(rk)s::text[], %(r)s::float8[],
                                     %(b)s::int4[], %(ck)s::text[], %(c)s::int4[])
                     WITH ORDINALITY AS m(q, t, p, nb, v, f, lane, rk, r, b, ck, c, n)),
            ins AS (
                INSERT INTO {lane_jobs} ({_LANE_COLUMNS})
                SELECT m.q, m.t, m.p, {due}, m.v, m.f, NULL, NULL, NULL, 0, m.lane, m.rk, m.r, m.b, m.ck, m.c
                FROM m ORDER BY m.n),
            lanes_in AS ({_lanes_in(s, "m", lane_due)})
            SELECT pg_notify(%(ch)s, q) FROM unnest(%(queues)s::text[]) AS q""",
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
        # the unlimited claim, behind the one step it pays for limits: an index probe of the
        # lanes table (a one-time filter); when a lane of the queues is due it leases nothing,
        # and the consume, finding nothing, asks "after_empty_claim" and serves the lanes first
        "claim": claim.format(guard=f"""
                WHERE NOT EXISTS (
                    SELECT 1 FROM unnest(%(queues)s::text[]) AS lq(name) CROSS JOIN LATERAL (
                        SELECT 1 FROM {lanes} WHERE queue = lq.name AND next_eligible <= {NOW} LIMIT 1) l)"""),
        "claim_plain": claim.format(guard=""),
        # after a claim that leased nothing: (a lane is due, an unlimited row is ready or due,
        # seconds until the next delayed row, lease deadline or lane is due)
        "after_empty_claim": f"""
            SELECT EXISTS (
                       SELECT 1 FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL (
                           SELECT 1 FROM {lanes} WHERE queue = q.name AND next_eligible <= {NOW} LIMIT 1) l),
                   EXISTS (
                       SELECT 1 FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL (
                           SELECT 1 FROM {jobs} WHERE queue = q.name AND state = 0 LIMIT 1) r),
                   (SELECT min(w.available_at) - {NOW}
                    FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL (
                        (SELECT available_at FROM {jobs} WHERE queue = q.name AND state <> 0
                         ORDER BY available_at LIMIT 1)
                        UNION ALL
                        (SELECT next_eligible FROM {lanes} WHERE queue = q.name ORDER BY next_eligible LIMIT 1)) w)""",
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
        # settles of lane jobs (deliveries with a limit): the slot is the row, so removing or
        # requeueing it frees the slot; the lanes that may lease sooner for it are woken
        "ack_lanes": f"""
            WITH d AS (DELETE FROM {lane_jobs} WHERE id = ANY(%s::int8[])
                       RETURNING queue, task_id, key, key_linger, lane, concurrency_key),
            {release_ctes(s, "d")}, {wake_ctes(s, "d")}
            SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM woken) w""",
        "requeue_lanes": f"""
            WITH u AS (UPDATE {lane_jobs} SET state = 0, available_at = {NOW} WHERE id = %s AND state = 2
                       RETURNING queue, lane, concurrency_key), {wake_ctes(s, "u")}
            SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM woken) w""",
        # (id, only a leased one?, reason, channel)
        "dead_letter_lanes": f"""
            WITH d AS (DELETE FROM {lane_jobs} WHERE id = %s AND (state = 2 OR NOT %s) RETURNING *),
            {release_ctes(s, "d")}, {wake_ctes(s, "d")},
            ins AS (
                INSERT INTO {dead} ({_DEAD_COLUMNS}, lane, {LIMIT_COLUMNS})
                SELECT queue, task_id, %s, {NOW}, priority, visibility_timeout, frame, {_KEY_COLUMNS}, lane,
                       {LIMIT_COLUMNS} FROM d)
            SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM woken) w""",
        "retry_lanes": f"""
            WITH old AS (DELETE FROM {lane_jobs} WHERE id = %s
                         RETURNING queue, task_id, priority, visibility_timeout, {_KEY_COLUMNS}, lane,
                                   {LIMIT_COLUMNS}),
            ins AS (
                INSERT INTO {lane_jobs} ({_LANE_COLUMNS})
                SELECT old.queue, old.task_id, old.priority, {due}, old.visibility_timeout, %s,
                       old.key, old.key_ttl, old.key_linger, 0, old.lane, old.rate_key, old.rate, old.burst,
                       old.concurrency_key, old.concurrency
                FROM old, (SELECT %s::float8 AS nb) m),
            {wake_ctes(s, "old")}
            SELECT pg_notify(%s, queue) FROM old""",
        "extend_lanes": f"""
            UPDATE {lane_jobs} j SET available_at = {NOW} + m.vt
            FROM unnest(%s::int8[], %s::float8[]) AS m(id, vt)
            WHERE j.id = m.id AND j.state = 2""",
        # route_limited: (source id, delivery count, its limit's lane and columns, channel); the
        # next lease counts as the routed delivery did (routing is not a delivery)
        "route": f"""
            WITH old AS (DELETE FROM {jobs} WHERE id = %(id)s AND state = 2 AND delivery_count = %(dc)s RETURNING *),
            m AS (SELECT old.*, %(lane)s::text AS lane_, %(rk)s::text AS rk, %(ck)s::text AS ck FROM old),
            ins AS (
                INSERT INTO {lane_jobs} ({_LANE_COLUMNS})
                SELECT queue, task_id, priority, 0, {NOW}, visibility_timeout, frame, {_KEY_COLUMNS},
                       delivery_count - 1, lane_, rk, %(r)s, %(b)s, ck, %(c)s FROM m),
            lanes_in AS ({_lanes_in(s, "(SELECT queue AS q, lane_ AS lane, rk, ck FROM m) x", NOW)})
            SELECT pg_notify(%(ch)s, queue) FROM old""",
        "route_lanes": f"""
            WITH old AS (DELETE FROM {lane_jobs} WHERE id = %(id)s AND state = 2 AND delivery_count = %(dc)s
                         RETURNING *),
            {wake_ctes(s, "old")},
            m AS (SELECT old.*, %(lane)s::text AS lane_, %(rk)s::text AS rk, %(ck)s::text AS ck FROM old),
            ins AS (
                INSERT INTO {lane_jobs} ({_LANE_COLUMNS})
                SELECT queue, task_id, priority, 0, {NOW}, visibility_timeout, frame, {_KEY_COLUMNS},
                       delivery_count - 1, lane_, rk, %(r)s, %(b)s, ck, %(c)s FROM m)
            SELECT pg_notify(%(ch)s, queue) FROM old""",
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
                FROM d WHERE lane IS NULL ORDER BY id
                RETURNING 1),
            ins_lanes AS (       -- a limited dead letter goes back into its lane
                INSERT INTO {lane_jobs} ({_LANE_COLUMNS})
                SELECT queue, task_id, priority, 0, {NOW}, visibility_timeout, frame, {_KEY_COLUMNS}, 0, lane,
                       {LIMIT_COLUMNS}
                FROM d WHERE lane IS NOT NULL ORDER BY id
                RETURNING 1),
            lanes_in AS ({_lanes_in(s, "(SELECT queue AS q, lane, rate_key AS rk, concurrency_key AS ck FROM d "
                                       "WHERE lane IS NOT NULL) x", NOW)})
            SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM ins_lanes), pg_notify(%s, %s)""",
        # lanes left empty are dropped by the next consume that finds them due
        "purge": f"""
            WITH dj AS (DELETE FROM {jobs} WHERE queue = %(q)s AND state IN (0, 1)
                        RETURNING queue, task_id, key, key_linger),
            dl AS (DELETE FROM {lane_jobs} WHERE queue = %(q)s AND state IN (0, 1)
                   RETURNING queue, task_id, key, key_linger),
            d AS (SELECT * FROM dj UNION ALL SELECT * FROM dl), {release_ctes(s, "d")},
            lz AS (UPDATE {lanes} SET next_eligible = {NOW}, blocked = false
                   WHERE queue = %(q)s AND EXISTS (SELECT 1 FROM dl))
            SELECT count(*) FROM d""",
        # purge's deletes, their frames copied into the holding area in the same statement
        "purge_hold": f"""
            WITH dj AS (DELETE FROM {jobs} WHERE queue = %(q)s AND state IN (0, 1)
                        RETURNING queue, task_id, key, key_linger, frame, 0 AS src, id),
            dl AS (DELETE FROM {lane_jobs} WHERE queue = %(q)s AND state IN (0, 1)
                   RETURNING queue, task_id, key, key_linger, frame, 1 AS src, id),
            d AS (SELECT * FROM dj UNION ALL SELECT * FROM dl), {release_ctes(s, "d")},
            lz AS (UPDATE {lanes} SET next_eligible = {NOW}, blocked = false
                   WHERE queue = %(q)s AND EXISTS (SELECT 1 FROM dl)),
            ins AS (INSERT INTO {held} (queue, task_id, frame)
                    SELECT queue, task_id, frame FROM d ORDER BY src, id)
            SELECT count(*) FROM d""",
        "purge_held": f"SELECT id, task_id, frame FROM {held} WHERE queue = %s ORDER BY id LIMIT %s",
        "purge_drop": f"DELETE FROM {held} WHERE queue = %s AND id = ANY(%s::bigint[])",
        "purge_dead": f"DELETE FROM {dead} WHERE queue = %s",
        "stats": f"""
            SELECT (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state = 0),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at <= {NOW}),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 2),
                   (SELECT count(*) FROM {jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 1),
                   (SELECT count(*) FROM {dead} WHERE queue = %(q)s),
                   (SELECT count(*) FROM {lane_jobs} WHERE queue = %(q)s AND state = 0),
                   (SELECT count(*) FROM {lane_jobs} WHERE queue = %(q)s AND state <> 0 AND available_at <= {NOW}),
                   (SELECT count(*) FROM {lane_jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 2),
                   (SELECT count(*) FROM {lane_jobs} WHERE queue = %(q)s AND state <> 0 AND available_at > {NOW}
                        AND state = 1)""",
        "lane_stats": f"""
            SELECT m.lane, min(m.rate_key), min(m.concurrency_key),
                   count(*) FILTER (WHERE m.state = 0 OR m.available_at <= {NOW}) AS waiting,
                   coalesce((SELECT count(*) FROM {lane_jobs} s WHERE s.queue = %(q)s
                             AND s.concurrency_key = min(m.concurrency_key) AND s.state = 2
                             AND s.available_at > {NOW}), 0) AS running
            FROM {lane_jobs} m WHERE m.queue = %(q)s
            GROUP BY m.lane
            HAVING count(*) FILTER (WHERE m.state = 0 OR m.available_at <= {NOW}) > 0
                OR coalesce((SELECT count(*) FROM {lane_jobs} s WHERE s.queue = %(q)s
                             AND s.concurrency_key = min(m.concurrency_key) AND s.state = 2
                             AND s.available_at > {NOW}), 0) > 0
            ORDER BY waiting DESC, m.lane LIMIT %(n)s""",
        "delete_queue": f"""
            WITH j AS (DELETE FROM {jobs} WHERE queue = %(q)s), d AS (DELETE FROM {dead} WHERE queue = %(q)s),
            k AS (DELETE FROM {keys} WHERE queue = %(q)s), lj AS (DELETE FROM {lane_jobs} WHERE queue = %(q)s),
            l AS (DELETE FROM {lanes} WHERE queue = %(q)s), b AS (DELETE FROM {buckets} WHERE queue = %(q)s),
            h AS (DELETE FROM {held} WHERE queue = %(q)s)
            DELETE FROM {s}.stem_queues WHERE name = %(q)s""",
        "enter_lane": _lanes_in(s, "(SELECT %(q)s::text AS q, %(lane)s::text AS lane, %(rk)s::text AS rk, "
                                   "%(ck)s::text AS ck) x", NOW),
        "sweep_buckets": f"""
            DELETE FROM {buckets} WHERE (queue, rate_key) IN (
                SELECT queue, rate_key FROM {buckets} WHERE tat < {NOW} LIMIT %s FOR UPDATE SKIP LOCKED)""",
        # the lane-serving statements (``_PgLanes``), inside one transaction
        "due_lanes": f"""
            SELECT {NOW}, queue, lane, rate_key, concurrency_key FROM {lanes}
            WHERE queue = ANY(%s::text[]) AND next_eligible <= {NOW}
            ORDER BY next_eligible, queue, lane LIMIT %s FOR UPDATE SKIP LOCKED""",
        "lock_keys": "SELECT bool_and(pg_try_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest(%s::text[]) k",
        "promote": f"""
            UPDATE {lane_jobs} SET state = 0 WHERE id IN (
                SELECT id FROM {lane_jobs} WHERE queue = %s AND lane = %s AND state <> 0 AND available_at <= %s
                FOR UPDATE SKIP LOCKED)""",
        "head": f"""
            SELECT h.id, h.rate, h.burst, h.concurrency,
                   (SELECT tat FROM {buckets} WHERE queue = %(q)s AND rate_key = %(rk)s),
                   (SELECT count(*) FROM {lane_jobs} WHERE queue = %(q)s AND concurrency_key = %(ck)s AND state = 2
                        AND available_at > %(now)s),
                   (SELECT min(available_at) FROM {lane_jobs} WHERE queue = %(q)s AND concurrency_key = %(ck)s
                        AND state = 2 AND available_at > %(now)s)
            FROM (SELECT id, rate, burst, concurrency FROM {lane_jobs}
                  WHERE queue = %(q)s AND lane = %(lane)s AND state = 0
                  ORDER BY priority DESC, available_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) h""",
        "lease": f"""
            WITH l AS (
                UPDATE {lane_jobs} SET state = 2, delivery_count = delivery_count + 1,
                    available_at = %(now)s + coalesce(visibility_timeout, %(vt)s)
                WHERE id = %(id)s
                RETURNING id, queue, task_id, frame, delivery_count, coalesce(visibility_timeout, %(vt)s), key,
                          {LIMIT_COLUMNS}),
            b AS (
                INSERT INTO {buckets} (queue, rate_key, tat) SELECT %(q)s, %(rk)s, %(tat)s::float8
                WHERE %(tat)s::float8 IS NOT NULL
                ON CONFLICT (queue, rate_key) DO UPDATE SET tat = EXCLUDED.tat)
            SELECT * FROM l""",
        "reschedule": f"UPDATE {lanes} SET next_eligible = %s, blocked = %s WHERE queue = %s AND lane = %s",
        "idle": f"""
            WITH due AS (SELECT min(available_at) AS t FROM {lane_jobs}
                         WHERE queue = %(q)s AND lane = %(lane)s AND state <> 0),
            up AS (UPDATE {lanes} SET next_eligible = due.t, blocked = false FROM due
                   WHERE due.t IS NOT NULL AND queue = %(q)s AND lane = %(lane)s)
            DELETE FROM {lanes} WHERE queue = %(q)s AND lane = %(lane)s AND (SELECT t FROM due) IS NULL
                AND NOT EXISTS (SELECT 1 FROM {lane_jobs} WHERE queue = %(q)s AND lane = %(lane)s AND state = 0)""",
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
        self._next_bucket_sweep = 0.0
        self._closed = False

    def reopen_recipe(self) -> tuple[str, dict[str, Any]] | None:
        return (self.url, {"schema": self.schema})

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
        """One message.  An unlimited one to a queue this broker registered (a single
        ``enqueue``) is ``publish_one``: the statement of ``publish_many`` for one row, with
        scalar parameters (prepared, like every statement here: one round trip)."""
        queue = message.queue
        if message.limit is not None or queue not in self._known_queues:
            self.publish_many((message,))
            return
        vt = message.visibility_timeout
        params = (queue, message.task_id, int(message.priority), message.not_before,
                  float(vt) if vt else None, bytes(message.frame), self.channel)
        self._pg.run(lambda conn: conn.execute(self._sql["publish_one"], params))
        self._on_notify(queue)

    def publish_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        queues = list(dict.fromkeys(m.queue for m in messages))
        for q in queues:
            validate_queue_name(q)
        limited = [m for m in messages if m.limit is not None]
        if limited:
            for m in limited:
                check_limit(m.limit)
            messages = [m for m in messages if m.limit is None]
        self._register(queues)
        params = self.publish_params(messages, queues)
        if not limited:
            self._pg.run(lambda conn: conn.execute(self._sql["publish"], params))
        else:
            lane_params = self.lane_publish_params(limited)

            def publish(conn) -> None:
                with conn.transaction():
                    if messages:
                        conn.execute(self._sql["publish"], params)
                    conn.execute(self._sql["publish_lanes"], lane_params)

            self._pg.run(publish)
        for q in queues:            # consumers of this instance need not wait for the round trip
            self._on_notify(q)

    def publish_frames(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                       priority: int = 0, visibility_timeout: float | None = None) -> None:
        params = self.frames_params(queue, task_ids, frames, priority=priority, visibility_timeout=visibility_timeout)
        if params is None:
            return
        self._pg.run(lambda conn: conn.execute(self._sql["publish"], params))
        self.published(queue)

    def frames_params(self, queue: str, task_ids: Sequence[str], frames: Sequence[bytes], *,
                      priority: int = 0, visibility_timeout: float | None = None) -> tuple | None:
        """The parameters of the publish statement (``sql("publish")``) for a ``publish_frames``
        batch, the queue registered; None for an empty batch.  A result backend on this
        database runs the statement in the transaction that creates a group (then calls
        ``published``)."""
        n = check_frame_batch(task_ids, frames)
        if not n:
            return None
        validate_queue_name(queue)
        self._register([queue])
        vt = float(visibility_timeout) if visibility_timeout else None
        return ([queue] * n, list(task_ids), [int(priority)] * n, [None] * n, [vt] * n, [bytes(f) for f in frames],
                self.channel, [queue])

    def published(self, queue: str) -> None:
        """Messages of ``queue`` were committed: this instance's consumers need not wait for
        the notification's round trip."""
        self._on_notify(queue)

    def publish_params(self, messages: Sequence[Message], queues: list[str]) -> tuple:
        """The parameters of the publish statement (``sql("publish")``) for unlimited
        ``messages`` of ``queues``."""
        return ([m.queue for m in messages], [m.task_id for m in messages], [int(m.priority) for m in messages],
                [m.not_before for m in messages],
                [float(m.visibility_timeout) if m.visibility_timeout else None for m in messages],
                [bytes(m.frame) for m in messages], self.channel, queues)

    def lane_publish_params(self, limited: Sequence[Message]) -> dict[str, Any]:
        """The parameters of ``sql("publish_lanes")`` for ``limited`` messages (limits checked)."""
        return {**self._lane_arrays(limited), "q": [m.queue for m in limited],
                "t": [m.task_id for m in limited], "p": [int(m.priority) for m in limited],
                "nb": [m.not_before for m in limited],
                "v": [float(m.visibility_timeout) if m.visibility_timeout else None for m in limited],
                "f": [bytes(m.frame) for m in limited], "ch": self.channel,
                "queues": list(dict.fromkeys(m.queue for m in limited))}

    def sql(self, name: str) -> str:
        """One of this broker's statements (for the async producer, ``stem.brokers.postgres_async``)."""
        return self._sql[name]

    @staticmethod
    def _lane_arrays(messages: Sequence[Message]) -> dict[str, list]:
        """The limit columns of ``messages`` as the lane statements take them (None: no limit)."""
        limits = [m.limit for m in messages]
        return {"lane": [None if x is None else lane_of(x) for x in limits],
                "rk": [None if x is None else x.rate_key for x in limits],
                "r": [None if x is None else float(x.rate) for x in limits],
                "b": [None if x is None else int(x.burst) for x in limits],
                "ck": [None if x is None else x.concurrency_key for x in limits],
                "c": [None if x is None else int(x.concurrency) for x in limits]}

    def publish_keyed(self, items: Sequence[Keyed]) -> list[str | None]:
        items = check_keyed(items)
        if not items:
            return []
        params, first, queues, statement = self.keyed_params(items)
        self._register(queues)
        rows = self._pg.run(lambda conn: conn.execute(self._sql[statement], params).fetchall())
        out = self.keyed_holders(items, first, rows)
        if time.monotonic() >= self._next_key_sweep:
            self._next_key_sweep = time.monotonic() + _KEY_SWEEP_EVERY_S
            self._fast.run(lambda conn: conn.execute(self._sql["sweep_keys"], (_KEY_SWEEP_ROWS,)))
        return out

    def keyed_params(self, items: list[Keyed]) -> tuple[dict[str, Any], dict[tuple[str, str], int], list[str], str]:
        """``publish_keyed``'s statement parameters for checked ``items``, the index of each
        key's first item, the queues (to register), and the statement's name (``sql``: the
        lanes' variant when a message has a limit)."""
        first: dict[tuple[str, str], int] = {}      # (queue, key) -> index of its first item
        for n, item in enumerate(items):
            first.setdefault((item.message.queue, item.key), n)
        batch = [items[n] for n in first.values()]
        msgs = [i.message for i in batch]
        limited = False
        for m in msgs:
            if m.limit is not None:
                check_limit(m.limit)
                limited = True
        queues = list(dict.fromkeys(m.queue for m in msgs))
        params = {"q": [m.queue for m in msgs], "k": [i.key for i in batch], "t": [m.task_id for m in msgs],
                  "ttl": [float(i.ttl) for i in batch],
                  "lg": [float(i.linger) for i in batch], "p": [int(m.priority) for m in msgs],
                  "nb": [m.not_before for m in msgs],
                  "v": [float(m.visibility_timeout) if m.visibility_timeout else None for m in msgs],
                  "f": [bytes(m.frame) for m in msgs], "ch": self.channel}
        statement = "publish_keyed"
        if limited:
            params.update(self._lane_arrays(msgs))
            statement = "publish_keyed_lanes"
        return params, first, queues, statement

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
            out, contended, next_due = self._claim(queues, max_count)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            listening = self._listener.listening
            if not listening and self._listener.ensure(min(2.0, remaining)):
                continue        # listening from now on: claim again, a publish may have come first
            # the next due time of a delayed row or lease, or of a lane (its next token or slot)
            wait = remaining
            if next_due is not None:
                wait = min(wait, max(next_due, 0.001))
            if contended:       # a due lane another consume is serving: look again once it is done
                wait = min(wait, _CONTENDED_RETRY_S)
            if not listening:
                wait = min(wait, _FALLBACK_POLL_S)
            with self._cond:
                if self._seen(queues) == seen and not self._closed:
                    self._cond.wait(wait)
        return []

    def _claim(self, queues: list[str], max_count: int) -> tuple[list[Delivery], bool, float | None]:
        """(the deliveries leased, whether a due lane was skipped because another consume held
        it, and when nothing was leased: seconds until something of the queues is next due)."""
        params = {"queues": queues, "n": max_count, "vt": self.default_visibility_timeout}
        for _ in range(3):
            rows = self._fast.run(lambda conn: conn.execute(self._sql["claim"], params, binary=True).fetchall())
            if rows:
                return self._deliveries(rows), False, None
            # nothing: idle, or a lane is due (the claim then leases nothing: lanes come first)
            lanes_due, ready, next_due = self._fast.run(
                lambda conn: conn.execute(self._sql["after_empty_claim"], params).fetchone())
            if lanes_due:
                out, contended = self._fast.run(lambda conn: self._serve(conn, queues, max_count))
                rows = []
                if len(out) < max_count:
                    params["n"] = max_count - len(out)
                    rows = self._fast.run(lambda conn: conn.execute(self._sql["claim_plain"], params,
                                                                    binary=True).fetchall())
                # nothing leased from a due lane: look again at once (or, held elsewhere, soon)
                return out + self._deliveries(rows), contended, None if out or rows or contended else 0.0
            if not ready and (next_due is None or next_due > 0):
                return [], False, next_due
            # a lane was due when the claim ran and no longer is: claim again
        return [], False, 0.0

    @staticmethod
    def _deliveries(rows: list) -> list[Delivery]:
        now = time.time()
        rows.sort(key=lambda r: (-r[6], r[0]))
        return [Delivery(r[1], r[2], r[3], r[0], r[4], r[5], now, r[7]) for r in rows]

    def _serve(self, conn, queues: list[str], max_count: int) -> tuple[list[Delivery], bool]:
        with conn.transaction():
            served = _lanes.serve(_PgLanes(conn, self._sql, self.default_visibility_timeout, self.schema),
                                  queues, max_count)
        if time.monotonic() >= self._next_bucket_sweep:
            self._next_bucket_sweep = time.monotonic() + _BUCKET_SWEEP_EVERY_S
            conn.execute(self._sql["sweep_buckets"], (_KEY_SWEEP_ROWS,))
        return served

    # -- settling ---------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        if not any(d.key is not None or d.limit is not None for d in deliveries):
            ids = [d.receipt for d in deliveries]
            self._fast.run(lambda conn: conn.execute(self._sql["ack"], (ids,)))
            return
        plain = [d for d in deliveries if d.limit is None]
        ids = [d.receipt for d in plain]
        sql = self._sql["ack_keyed" if any(d.key is not None for d in plain) else "ack"]
        lane_ids = [d.receipt for d in deliveries if d.limit is not None]

        def ack(conn) -> None:
            if ids:
                conn.execute(sql, (ids,))
            if lane_ids:
                conn.execute(self._sql["ack_lanes"], (lane_ids, self.channel))

        self._fast.run(ack)

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        limited = delivery.limit is not None
        if requeue:
            sql = self._sql["requeue_lanes" if limited else "requeue"]
            self._fast.run(lambda conn: conn.execute(sql, (delivery.receipt, self.channel)))
        elif limited:
            self._pg.run(lambda conn: conn.execute(self._sql["dead_letter_lanes"],
                                                   (delivery.receipt, True, "rejected", self.channel)))
        else:
            self._pg.run(lambda conn: conn.execute(self._sql["reject"], (delivery.receipt,)))

    def retry(self, delivery: Delivery, frame: bytes, not_before: float | None) -> None:
        sql = self._sql["retry_lanes" if delivery.limit is not None else "retry"]
        self._pg.run(lambda conn: conn.execute(sql, (delivery.receipt, bytes(frame), not_before, self.channel)))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if delivery.limit is not None:
            self._pg.run(lambda conn: conn.execute(self._sql["dead_letter_lanes"],
                                                   (delivery.receipt, False, reason, self.channel)))
        else:
            self._pg.run(lambda conn: conn.execute(self._sql["dead_letter"], (delivery.receipt, reason)))

    def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float | None = None) -> None:
        if not deliveries:
            return
        for limited, sql in ((False, "extend"), (True, "extend_lanes")):
            some = [d for d in deliveries if (d.limit is not None) is limited]
            if some:
                params = ([d.receipt for d in some], [float(visibility_timeout or d.visibility_timeout) for d in some])
                self._fast.run(lambda conn: conn.execute(self._sql[sql], params))

    def route_limited(self, delivery: Delivery, limit: Limit) -> None:
        check_limit(limit)
        params = {"id": delivery.receipt, "dc": delivery.delivery_count, "q": delivery.queue, "lane": lane_of(limit),
                  "rk": limit.rate_key, "r": float(limit.rate), "b": int(limit.burst), "ck": limit.concurrency_key,
                  "c": int(limit.concurrency), "ch": self.channel}
        if delivery.limit is None:
            self._pg.run(lambda conn: conn.execute(self._sql["route"], params))
            return

        def route(conn) -> None:
            with conn.transaction():
                if conn.execute(self._sql["route_lanes"], params).fetchone() is not None:
                    conn.execute(self._sql["enter_lane"], params)

        self._pg.run(route)

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
        return int(self._pg.run(lambda conn: conn.execute(self._sql["purge"], {"q": queue}).fetchone()[0]))

    def purge_hold(self, queue: str) -> int:
        validate_queue_name(queue)
        return int(self._pg.run(lambda conn: conn.execute(self._sql["purge_hold"], {"q": queue}).fetchone()[0]))

    def purge_held(self, queue: str, limit: int = 1000) -> list[Held]:
        validate_queue_name(queue)
        checks.integer("limit", limit)
        rows = self._pg.run(lambda conn: conn.execute(self._sql["purge_held"], (queue, limit)).fetchall())
        return [Held(str(i), t, bytes(f)) for i, t, f in rows]

    def purge_drop(self, queue: str, ids: Sequence[str]) -> int:
        validate_queue_name(queue)
        numbers = [int(i) for i in ids if str(i).isdigit()]
        if not numbers:
            return 0
        return self._pg.run(lambda conn: conn.execute(self._sql["purge_drop"], (queue, numbers)).rowcount)

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
        return QueueStats(queue, r[0] + r[1], r[2] + r[7], r[3] + r[8], r[4], r[5] + r[6])

    def lane_stats(self, queue: str, limit: int = 100) -> list[LaneStats]:
        validate_queue_name(queue)
        rows = self._fast.run(lambda conn: conn.execute(self._sql["lane_stats"],
                                                        {"q": queue, "n": max(limit, 0)}).fetchall())
        return [LaneStats(queue, r[1], r[2], r[3], r[4]) for r in rows]

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


class _PgLanes(_lanes.LaneOps):
    """``stem.brokers._lanes``' statements for Postgres, inside one transaction.  The due lanes
    are locked ``FOR UPDATE SKIP LOCKED`` (one consume serves a lane at a time); the buckets and
    slots of their keys, which lanes share, with transaction advisory locks taken without
    waiting (a lane whose key another consume holds is skipped this time) and *before* the
    statement that reads the TAT and counts the slots, so that it sees every lease committed
    under them: never two grants of one token or one slot."""

    def __init__(self, conn, sql: dict[str, str], vt: float, schema: str):
        self.conn, self.sql, self.vt, self.schema = conn, sql, vt, schema

    def due_lanes(self, queues, limit):
        rows = self.conn.execute(self.sql["due_lanes"], (queues, limit)).fetchall()
        return (rows[0][0] if rows else 0.0), [tuple(r[1:]) for r in rows]

    def lock_keys(self, queue, rate_key, concurrency_key):
        keys = [f"stem-{kind}:{self.schema}:{len(queue)}:{queue}:{key}"
                for kind, key in (("rate", rate_key), ("slots", concurrency_key)) if key is not None]
        return bool(self.conn.execute(self.sql["lock_keys"], (keys,)).fetchone()[0])

    def promote(self, queue, lane, now):
        self.conn.execute(self.sql["promote"], (queue, lane, now))

    def head(self, queue, lane, rate_key, concurrency_key, now):
        return self.conn.execute(self.sql["head"], {"q": queue, "lane": lane, "rk": rate_key, "ck": concurrency_key,
                                                    "now": now}).fetchone()

    def lease(self, row_id, queue, rate_key, tat, now):
        r = self.conn.execute(self.sql["lease"], {"id": row_id, "now": now, "vt": self.vt, "q": queue,
                                                  "rk": rate_key, "tat": tat}).fetchone()
        return Delivery(r[1], r[2], r[3], r[0], r[4], r[5], now, r[6],
                        Limit(r[7], float(r[8]), int(r[9]), r[10], int(r[11])))

    def reschedule(self, queue, lane, next_eligible, blocked):
        self.conn.execute(self.sql["reschedule"], (next_eligible, blocked, queue, lane))

    def idle(self, queue, lane):
        self.conn.execute(self.sql["idle"], {"q": queue, "lane": lane})


def migrate(url: str, *, schema: str | None = None) -> int:
    """Create or upgrade stem's Postgres tables at ``url`` (for ``stem migrate``).  Returns the version."""
    with PostgresBroker(url, schema=schema) as broker:
        return broker.migrate()
