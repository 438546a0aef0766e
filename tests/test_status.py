"""stem.status: the workers table from the heartbeat store (data for ``stem worker status``)."""

from __future__ import annotations

import io
import json
import os
import socket
import time

import pytest
from rich.console import Console

from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig
from stem import status as stem_status
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


def wait_until(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def heartbeat(**over):
    data = {"id": "w1", "host": "h1", "pid": 123, "queues": ["default"], "concurrency": 2, "in_flight": 1,
            "running": 1, "processed": 10, "succeeded": 9, "failed": 1, "retried": 0, "paused": [],
            "isolation": "process", "uptime": 5.0, "heartbeat_interval": 1.0,
            "children": [{"pid": 200, "state": "ready", "rss": 30 * 2**20, "tasks_done": 5, "running": 1},
                         {"pid": 201, "state": "ready", "rss": 20 * 2**20, "tasks_done": 5, "running": 0}]}
    data.update(over)
    return data


def render(renderable) -> str:
    console = Console(record=True, width=220, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_rows_come_from_a_running_workers_heartbeats():
    registry = TaskRegistry()
    registry.task("ok")(lambda ctx: 1)

    @registry.task("bad", options=TaskOptions(max_retries=0))
    def bad(ctx):
        raise ValueError("no")

    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    stem = Stem(broker, backend, registry)
    w = Worker(broker, backend, registry, concurrency=2, isolation="process", lifecycle=NO_SIGNALS,
               heartbeat_interval=0.1, worker_id="w-status", queues=["default", "mail"]).run_in_background()
    try:
        for tid in [stem.enqueue("ok") for _ in range(5)] + [stem.enqueue("bad")]:
            stem.wait_for_task(tid, timeout=30)
        assert wait_until(lambda: [r["processed"] for r in stem_status.worker_rows(backend)] == [6])
        (row,) = stem_status.worker_rows(backend)
    finally:
        w.shutdown(timeout=30)
    assert row["id"] == "w-status" and row["host"] == socket.gethostname() and row["pid"] == os.getpid()
    assert row["queues"] == ["default", "mail"] and row["concurrency"] == 2 and row["isolation"] == "process"
    assert (row["succeeded"], row["failed"], row["in_flight"]) == (5, 1, 0)
    assert len(row["children"]) == 2 and all(c["rss"] > 1_000_000 for c in row["children"])
    assert row["rss"] == sum(c["rss"] for c in row["children"])
    assert row["heartbeat_interval"] == 0.1 and 0 <= row["last_heartbeat_age"] < 5
    assert row["state"] == "alive" and row["lost"] is False
    assert stem_status.worker_rows(backend) == []     # a clean shutdown removes the heartbeat


def test_a_heartbeat_older_than_three_intervals_is_lost():
    backend = InMemoryResultBackend()
    backend.put_heartbeat("w1", heartbeat(heartbeat_interval=1.0), ttl=60)
    now = time.time()
    (fresh,) = stem_status.worker_rows(backend, now=now + 2.9)
    (stale,) = stem_status.worker_rows(backend, now=now + 3.5)
    assert (fresh["state"], fresh["lost"]) == ("alive", False)
    assert (stale["state"], stale["lost"]) == ("lost", True)
    assert stale["last_heartbeat_age"] == pytest.approx(3.5, abs=0.5)


def test_heartbeats_without_an_interval_use_the_default():
    backend = InMemoryResultBackend()
    data = heartbeat()
    del data["heartbeat_interval"]
    backend.put_heartbeat("old", data, ttl=600)
    (row,) = stem_status.worker_rows(backend, now=time.time() + 20)
    assert row["heartbeat_interval"] == stem_status.DEFAULT_HEARTBEAT_INTERVAL and not row["lost"]


def test_the_snapshot_is_plain_json():
    backend = InMemoryResultBackend()
    backend.put_heartbeat("w1", heartbeat(), ttl=60)
    backend.put_heartbeat("w2", heartbeat(host="h0", pid=7, children=[]), ttl=60)
    snap = json.loads(json.dumps(stem_status.snapshot(backend)))
    assert [w["id"] for w in snap["workers"]] == ["w2", "w1"]      # sorted by host, then id
    assert snap["workers"][1]["rss"] == 50 * 2**20
    assert isinstance(snap["generated_at"], float)


def test_the_table_shows_every_column_and_marks_lost_workers():
    backend = InMemoryResultBackend()
    backend.put_heartbeat("w-alive", heartbeat(), ttl=60)
    backend.put_heartbeat("w-stale", heartbeat(host="h2", paused=["default"]), ttl=60)
    rows = stem_status.worker_rows(backend)
    rows[1] = {**rows[1], "lost": True, "state": "lost", "last_heartbeat_age": 75.0}
    text = render(stem_status.render_table(rows))
    for column in ("worker", "host", "pid", "queues", "conc.", "in-flight", "processed", "failed",
                   "children (RSS)", "last beat", "state"):
        assert column in text
    assert "w-alive" in text and "alive" in text
    assert "w-stale" in text and "lost" in text and "1m15s" in text and "(paused: default)" in text
    assert "200 (30.0 MiB)" in text


def test_an_empty_table_says_why():
    assert "no live workers" in render(stem_status.render_table([]))


def test_the_live_board_keeps_a_vanished_worker_as_lost_until_forgotten():
    backend = InMemoryResultBackend()
    board = stem_status.StatusBoard(backend, forget_after=60)
    backend.put_heartbeat("w1", heartbeat(), ttl=60)
    now = time.time()
    assert [(r["id"], r["state"]) for r in board.rows(now)] == [("w1", "alive")]
    backend.remove_heartbeat("w1")     # expired (or shut down): no longer listed
    assert [(r["id"], r["state"]) for r in board.rows(now + 10)] == [("w1", "lost")]
    assert board.rows(now + 10)[0]["last_heartbeat_age"] >= 10
    assert board.rows(now + 100) == []


def test_watch_draws_the_table():
    backend = InMemoryResultBackend()
    backend.put_heartbeat("w-watch", heartbeat(), ttl=60)
    out = io.StringIO()
    stem_status.watch(backend, console=Console(file=out, width=200, force_terminal=False), iterations=2,
                      refresh=0.01)
    assert "w-watch" in out.getvalue()
