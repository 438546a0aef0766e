"""RedisWorkflowStore beyond the shared contract: it answers as the in-memory reference does on
random sequences (single Redis and Cluster), its keys share one slot per run, a child's
cross-slot end reaches its parent even when the client dies between the steps, and a
redis-server killed with SIGKILL mid-sequence loses no acknowledged write and strands no run."""

from __future__ import annotations

import random
import threading
import uuid
import zlib

import pytest
import redis
from redis.crc import key_slot

from stem.backends.redis import RedisResultBackend
from stem.errors import BackendConnectionError, BackendError, ConfigurationError
from stem.workflows.store import PARKED, PENDING, RUNNING, RunRecord, open_store
from stem.workflows.store_memory import MemoryWorkflowStore
from stem.workflows.store_redis import SHARDS, RedisWorkflowStore

from .support import drop_namespace, raw_client, wait_for

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.123


def stores_on(url: str):
    """A factory of stores, each in a namespace of its own, all closed and dropped at the end."""
    made: list[RedisWorkflowStore] = []

    def make() -> RedisWorkflowStore:
        made.append(RedisWorkflowStore.from_url(url, namespace="stemtest_" + uuid.uuid4().hex[:12]))
        return made[-1]

    yield make
    client = raw_client(url)
    try:
        for s in made:
            s.close()
            drop_namespace(client, s.namespace)
    finally:
        client.close()


@pytest.fixture
def make_store(redis_url):
    yield from stores_on(redis_url)


@pytest.fixture
def make_cluster_store(redis_cluster):
    yield from stores_on(redis_cluster.url())


@pytest.fixture
def store(make_store):
    return make_store()


@pytest.fixture
def cluster_store(make_cluster_store):
    return make_cluster_store()


@pytest.fixture
def raw(redis_url):
    with redis.Redis.from_url(redis_url) as client:
        yield client


def shard(run_id: str) -> int:
    return zlib.crc32(run_id.encode()) % SHARDS


def ids_in_two_shards() -> tuple[str, str]:
    a = "parent-0"
    b = next(f"child-{i}" for i in range(1000) if shard(f"child-{i}") != shard(a))
    return a, b


# -- the reference, on random sequences ------------------------------------------------------
def expected_reason(run: RunRecord, now: float) -> str | None:
    if run.status == PENDING and run.wake_at is not None and run.wake_at <= now:
        return "start"
    if run.status == PARKED and run.wake_at is not None and run.wake_at <= now:
        return "timer"
    if run.status == PARKED and run.inbox_count > run.inbox_seen:
        return "inbox"
    if run.status == RUNNING and run.lease_until is not None and run.lease_until <= now:
        return "lease"
    return None


def random_step(rng: random.Random, ref: MemoryWorkflowStore, ids: list[str], now: float):
    """One operation with arguments that succeed often (the run's current epoch, the journal's
    length) and fail sometimes (stale epochs, taken positions, unknown runs)."""
    op = rng.choice(["create", "claim", "claim", "renew", "append", "append", "append", "append", "park", "park",
                     "park", "finish", "attention", "continue", "release", "cancel", "reset", "send", "send"])
    rid = rng.choice(ids)
    if rng.random() < 0.85:      # mostly a run the operation can act on
        if op in ("renew", "append", "park", "finish", "attention", "continue", "release"):
            fit = [r.id for r in ref.runs(status=RUNNING)]
        elif op == "claim":
            fit = [r.id for r in ref.runs() if r.status in (PENDING, PARKED)
                   or r.status == RUNNING and r.lease_until <= now]
        else:
            fit = [r.id for r in ref.runs()]
        rid = rng.choice(fit) if fit else rid
    run = ref.get(rid)
    epoch = run.epoch if run and rng.random() < 0.85 else rng.randrange(4)
    if op == "create":
        parent = rng.choice([None, None, *ids, "nobody"])
        return op, (rid, "wf.order", "v1", rng.randbytes(rng.randrange(4))), {"now": now, "parent": parent}
    if op == "claim":
        return op, (rid, f"w{rng.randrange(3)}"), {"now": now, "lease": rng.choice([0.5, 3.0, 30.0])}
    if op == "renew":
        return op, (rid, epoch), {"now": now, "lease": 10.0}
    if op == "append":
        length = len(ref.journal(rid))
        position = length if rng.random() < 0.8 else rng.randrange(length + 2)
        return op, (rid, epoch, position, rng.choice(["step", "sleep", "wait"]), f"s{position}"), {
            "output": rng.choice([None, b"", rng.randbytes(8)]), "error": rng.choice([None, None, b"boom"]),
            "attempt": rng.randrange(1, 4), "now": now}
    if op == "park":
        seen = run.inbox_count if run and rng.random() < 0.8 else rng.randrange(3)
        waits_for = rng.choice([None, None, f"task-{rng.randrange(9)}"])
        return op, (rid, epoch), {"wake_at": rng.choice([None, now + rng.choice([-1.0, 0.25, 7.5])]),
                                  "waiting": rng.choice([None, b"", b"topic"]), "waits_for": waits_for,
                                  "waits_kind": waits_for and rng.choice(["task", "child"]),
                                  "inbox_seen": seen, "now": now}
    if op == "release":
        return op, (rid, epoch), {"now": now}
    if op == "finish":
        status = rng.choice(["SUCCEEDED", "FAILED"])
        return op, (rid, epoch, status), {"result": rng.choice([None, b"r"]), "error": rng.choice([None, b"e"]),
                                          "now": now}
    if op == "attention":
        return op, (rid, epoch, "position 2: step 'a' != sleep 'b'"), {"now": now}
    if op == "continue":
        seqs = [e.seq for e in ref.events(rid)] if run else []
        drop = rng.sample(seqs, rng.randrange(len(seqs) + 1)) if seqs else []
        return "continue_as_new", (rid, epoch, rng.randbytes(3)), {"drop_events": drop, "now": now}
    if op == "cancel":
        return op, (rid,), {"now": now}
    if op == "reset":
        return op, (rid, rng.randrange(4)), {"now": now}
    return op, (rid, rng.choice(["review", "pay", "__child__"]), f"ev{rng.randrange(6)}", rng.randbytes(5)), {
        "now": now}


def same_state(ref: MemoryWorkflowStore, store, ids: list[str], now: float) -> None:
    for rid in ids:
        assert store.get(rid) == ref.get(rid), rid
        assert store.journal(rid) == ref.journal(rid), rid
        assert store.events(rid) == ref.events(rid), rid
        for topic in ("review", "__child__"):
            assert store.events(rid, topic, after_seq=1, limit=2) == ref.events(rid, topic, after_seq=1, limit=2)
    for at in (now - 20, now, now + 1000):
        assert sorted(store.due(now=at)) == sorted(ref.due(now=at))
    assert store.parked_on() == ref.parked_on()
    assert store.parked_on(limit=2, after=ids[1]) == ref.parked_on(limit=2, after=ids[1])
    for status in (None, PENDING, RUNNING, PARKED, "SUCCEEDED", "NEEDS_ATTENTION", "CANCELLED"):
        assert store.runs(status=status) == ref.runs(status=status)
    assert store.runs(limit=3, after=ids[2]) == ref.runs(limit=3, after=ids[2])
    assert store.runs(name="wf.order", limit=2) == ref.runs(name="wf.order", limit=2)
    assert store.runs(name="other") == []


def run_random_sequences(make, seeds: range, steps: int) -> None:
    for seed in seeds:
        store = make()
        rng = random.Random(seed)
        ref = MemoryWorkflowStore()
        tag = uuid.uuid4().hex[:6]
        ids = [f"{tag}-{i}" for i in range(7)]
        now = T0
        for i, rid in enumerate(ids[:-1]):       # the last one is created (or not) by the sequence
            parent = rng.choice([None, *ids[:i]])
            assert store.create(rid, "wf.order", "v1", b"in", now=now, parent=parent) == \
                ref.create(rid, "wf.order", "v1", b"in", now=now, parent=parent)
        for _ in range(steps):
            now += rng.choice([0.0, 0.1, 1.7, 6.0])
            op, args, kwargs = random_step(rng, ref, ids, now)
            want = getattr(ref, op)(*args, **kwargs)
            got = getattr(store, op)(*args, **kwargs)
            assert got == want, (seed, op, args, kwargs)
        same_state(ref, store, ids, now)


def test_random_sequences_answer_as_the_reference_store_does(make_store):
    run_random_sequences(make_store, range(12), steps=120)


def test_random_sequences_answer_as_the_reference_store_does_on_a_cluster(make_cluster_store):
    run_random_sequences(make_cluster_store, range(4), steps=120)


# -- layout -------------------------------------------------------------------------------------
def test_every_key_of_a_run_shares_its_shards_slot_and_the_shards_spread_over_the_slots():
    s = RedisWorkflowStore.__new__(RedisWorkflowStore)
    s.namespace = "stem"
    from stem.workflows import store_redis
    s._bases = tuple(f"stem:{{{t}}}:" for t in store_redis._TAGS)
    for rid in ("a", "order-42", "x}{y", "é" * 40):
        slots = {key_slot(k.encode()) for k in s._keys(rid)}
        assert len(slots) == 1, rid
    ranges = [key_slot(b.encode()) // (16384 // SHARDS) for b in s._bases]
    assert ranges == list(range(SHARDS))


def test_a_run_and_its_indexes_change_in_one_script(store, raw):
    """The due and parked entries follow the run (no repair step left for the sweeper)."""
    store.create("r", "wf", "1", b"", now=T0)
    base = store._base("r")
    assert raw.zscore(base + "due", "r") == T0
    run = store.claim("r", "w", now=T0 + 1, lease=30)
    assert raw.zscore(base + "due", "r") == T0 + 31
    assert store.park("r", run.epoch, wake_at=None, waiting=b"t", waits_for="task", waits_kind="task", inbox_seen=0,
                      now=T0 + 2) == "parked"
    assert raw.zscore(base + "due", "r") is None
    assert raw.zrange(base + "parked", 0, -1) == [b"r"]
    assert store.send("r", "t", "e1", b"x", now=T0 + 3)[0]
    assert raw.zscore(base + "due", "r") == float("-inf")
    assert store.due(now=0.0) == [("r", "inbox", run.epoch, float("-inf"))]
    assert store.release("r", run.epoch, now=T0 + 4) is False      # parked: nothing to hand back
    run = store.claim("r", "w", now=T0 + 5, lease=30)
    assert raw.zrange(base + "parked", 0, -1) == [] and raw.zscore(base + "due", "r") == T0 + 35
    assert store.release("r", run.epoch, now=T0 + 6)
    assert raw.zscore(base + "due", "r") == T0 + 6 and raw.zrange(base + "s:PENDING", 0, -1) == [b"r"]


# -- a child's end across slots -------------------------------------------------------------------
def test_a_childs_end_reaches_a_parent_in_another_slot(cluster_store):
    parent, child = ids_in_two_shards()
    cluster_store.create(parent, "p", "1", b"", now=T0)
    run = cluster_store.claim(parent, "w", now=T0, lease=30)
    assert cluster_store.park(parent, run.epoch, wake_at=None, waiting=None, waits_for=child, waits_kind="child",
                              inbox_seen=0, now=T0) == "parked"
    cluster_store.create(child, "c", "1", b"", now=T0, parent=parent)
    c = cluster_store.claim(child, "w", now=T0, lease=30)
    assert cluster_store.finish(child, c.epoch, "SUCCEEDED", result=b"ok", now=T0 + 1)
    assert [(e.topic, e.event_id, e.created_at) for e in cluster_store.events(parent)] == [
        ("__child__", child, T0 + 1)]
    assert [d[:2] for d in cluster_store.due(now=T0 + 1)] == [(parent, "inbox")]


@pytest.mark.parametrize("dies", ["before the parent's event", "before the note is removed"])
def test_a_client_that_dies_between_a_childs_end_and_its_parents_event_strands_no_parent(
        cluster_store, monkeypatch, dies):
    parent, child = ids_in_two_shards()
    cluster_store.create(parent, "p", "1", b"", now=T0)
    run = cluster_store.claim(parent, "w", now=T0, lease=30)
    cluster_store.park(parent, run.epoch, wake_at=None, waiting=None, waits_for=child, waits_kind="child",
                       inbox_seen=0, now=T0)
    cluster_store.create(child, "c", "1", b"", now=T0, parent=parent)
    c = cluster_store.claim(child, "w", now=T0, lease=30)
    real_run = cluster_store._run

    def crashing_run(keys, op, *args):
        if (op, dies) in (("notify", "before the parent's event"), ("notified", "before the note is removed")):
            raise KeyboardInterrupt("the client dies here")
        return real_run(keys, op, *args)

    monkeypatch.setattr(cluster_store, "_run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        cluster_store.finish(child, c.epoch, "SUCCEEDED", now=T0 + 1)
    monkeypatch.setattr(cluster_store, "_run", real_run)
    assert cluster_store.get(child).status == "SUCCEEDED"
    delivered = dies == "before the note is removed"
    assert len(cluster_store.events(parent)) == int(delivered)
    # the next sweep sends what the note says (once), and the one after lists the parent
    cluster_store.due(now=T0 + 2)
    assert [(e.topic, e.event_id, e.created_at) for e in cluster_store.events(parent)] == [
        ("__child__", child, T0 + 1)]
    assert [d[:2] for d in cluster_store.due(now=T0 + 2)] == [(parent, "inbox")]
    notes = cluster_store._client.zrange(cluster_store._base(child) + "notify", 0, -1)
    assert notes == []


def test_a_cancelled_child_in_another_slot_wakes_its_parent(cluster_store):
    parent, child = ids_in_two_shards()
    cluster_store.create(parent, "p", "1", b"", now=T0)
    cluster_store.create(child, "c", "1", b"", now=T0, parent=parent)
    assert cluster_store.cancel(child, now=T0 + 1).status == "CANCELLED"
    assert cluster_store.get(parent).inbox_count == 1


# -- errors and wiring -------------------------------------------------------------------------
def test_the_store_beside_a_redis_backend_is_one_per_backend_in_its_namespace(redis_url, raw):
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
    try:
        s = open_store(backend)
        assert isinstance(s, RedisWorkflowStore) and s is RedisWorkflowStore.for_backend(backend)
        s.create("r", "wf", "1", b"", now=T0)
        assert raw.exists(s._base("r") + "r:r") and s._base("r").startswith(namespace + ":{wf")
        s.close()          # the backend's connections stay open: they are the backend's
        assert s.get("r").status == PENDING
    finally:
        backend.close()
        drop_namespace(raw, namespace)


def test_a_store_not_beside_a_redis_backend_is_refused():
    with pytest.raises(ConfigurationError, match="RedisResultBackend"):
        RedisWorkflowStore.for_backend(object())
    with pytest.raises(ConfigurationError, match="RedisStore"):
        RedisWorkflowStore(object())  # type: ignore[arg-type]


def test_redis_errors_become_backend_errors(store, raw):
    store.create("r", "wf", "1", b"", now=T0)
    raw.delete(store._base("r") + "j:r")
    raw.set(store._base("r") + "j:r", "not a list")
    run = store.claim("r", "w", now=T0, lease=30)
    with pytest.raises(BackendError, match="WRONGTYPE"):
        store.append("r", run.epoch, 0, "step", "a", now=T0)


def test_an_unreachable_server_is_a_backend_connection_error():
    from stem.workflows.store_redis import RedisWorkflowStore as S
    from .support import free_port
    s = S.from_url(f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1, socket_connect_timeout=0.5)
    try:
        with pytest.raises(BackendConnectionError):
            s.get("r")
    finally:
        s.close()


def test_bad_arguments_store_nothing(store, raw):
    with pytest.raises(ConfigurationError):
        store.create("r", "wf", "1", "not bytes", now=T0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        store.runs(after=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        store.parked_on(after=3)  # type: ignore[arg-type]
    assert store.get("r") is None and store.runs() == []


def test_the_largest_limits_positions_and_seqs_are_answered_not_refused_by_redis(store):
    """Lua numbers are doubles: a limit or position of 2**63 - 1 must never reach a Redis
    command as a number (it would print as 9.2233720368547758e+18 and be refused)."""
    big = 2**63 - 1
    rec = store.claim(store.create("r", "wf", "1", b"", now=T0)[1].id, "w", now=T0, lease=30)
    assert store.append("r", rec.epoch, 0, "step", "a", now=T0)
    assert store.due(now=T0 + 60, limit=big) == [("r", "lease", rec.epoch, T0 + 30)]
    assert store.runs(limit=big)[0].id == "r" and store.runs(name="wf", limit=big)[0].id == "r"
    assert store.parked_on(limit=big) == [] and store.events("r", "t", after_seq=big, limit=big) == []
    assert not store.append("r", rec.epoch, big, "step", "b", now=T0)
    assert store.park("r", rec.epoch, wake_at=None, waiting=None, waits_for=None, inbox_seen=big,
                      now=T0) == "inbox"
    assert not store.continue_as_new("r", big, b"", drop_events=[big], now=T0)
    assert store.reset("r", big, now=T0).status == PENDING and len(store.journal("r")) == 1


def test_a_script_cache_emptied_under_the_store_is_loaded_again(private_redis_url):
    """A restart or SCRIPT FLUSH empties the cache: the call that met NOSCRIPT (which ran
    nothing) is sent again once the scripts are loaded."""
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    s = RedisWorkflowStore.from_url(private_redis_url, namespace=namespace)
    try:
        s.create("r", "wf", "1", b"", now=T0)
        with redis.Redis.from_url(private_redis_url) as r:
            r.script_flush()
        rec = s.claim("r", "w", now=T0, lease=30)
        assert rec.epoch == 1 and s.get("r").epoch == 1
    finally:
        s.close()
        with redis.Redis.from_url(private_redis_url) as r:
            drop_namespace(r, namespace)


# -- a server killed mid-sequence -------------------------------------------------------------
def test_a_server_killed_mid_sequence_loses_no_acknowledged_write_and_strands_no_run(redis_server):
    """A driver runs activations (create, claim, append, park on a timer or an event, send,
    finish) until the server is SIGKILLed under it; after a restart from its AOF every write
    the driver saw acknowledged is there as it was, the write in flight is there whole or not
    at all, and ``due`` lists exactly the runs whose records say they need an activation."""
    namespace = "stemtest_" + uuid.uuid4().hex[:12]
    s = RedisWorkflowStore.from_url(redis_server.url, namespace=namespace, retry_attempts=1,
                                    socket_timeout=2.0, socket_connect_timeout=0.5)
    acked: list[tuple] = []        # (op, args, result) the server answered
    in_flight: list[tuple] = []
    stop = threading.Event()

    def call(op, *args, **kwargs):
        in_flight[:] = [(op, args)]
        got = getattr(s, op)(*args, **kwargs)
        acked.append((op, args, kwargs, got))
        in_flight.clear()
        return got

    def drive():
        rng = random.Random(7)
        now = T0
        i = 0
        try:
            while not stop.is_set():
                rid = f"run-{i}"
                i += 1
                now += 0.5
                call("create", rid, "wf", "1", b"in", now=now)
                if rng.random() < 0.2:
                    continue                               # left PENDING: due by "start"
                run = call("claim", rid, "w", now=now, lease=30.0)
                for pos in range(rng.randrange(4)):
                    call("append", rid, run.epoch, pos, "step", f"s{pos}", output=rng.randbytes(16), now=now)
                fate = rng.random()
                if fate < 0.15:
                    continue                               # left RUNNING: due by "lease"
                if fate < 0.6:
                    call("park", rid, run.epoch, wake_at=now + 60, waiting=None, waits_for=None, inbox_seen=0,
                         now=now)
                elif fate < 0.8:
                    call("park", rid, run.epoch, wake_at=None, waiting=b"review", waits_for=None, inbox_seen=0,
                         now=now)
                    if rng.random() < 0.5:
                        call("send", rid, "review", "e1", b"5 stars", now=now)
                else:
                    call("finish", rid, run.epoch, "SUCCEEDED", result=b"done", now=now)
        except BackendConnectionError:
            return

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        wait_for(lambda: len(acked) >= 400, timeout=30, what="400 acknowledged writes")
        redis_server.kill()
        driver.join(15)
        assert not driver.is_alive()
    finally:
        stop.set()
    redis_server.start()
    s.close()
    s = RedisWorkflowStore.from_url(redis_server.url, namespace=namespace)
    try:
        created = [args[0] for op, args, _, _ in acked if op == "create"]
        assert created, "the driver acknowledged no create"
        journal: dict[str, list] = {}
        for op, args, kwargs, got in acked:
            if op == "append" and got:
                journal.setdefault(args[0], []).append((args[2], args[3], args[4], kwargs["output"], args[1]))
        for rid, entries in journal.items():
            stored = s.journal(rid)
            for pos, kind, name, output, epoch in entries:
                e = stored[pos]
                assert (e.position, e.kind, e.name, e.output, e.epoch) == (pos, kind, name, output, epoch)
        far = T0 + 10_000_000
        due = {d.run_id: d.reason for d in s.due(now=far, limit=100_000)}
        for rid in created:
            run = s.get(rid)
            assert run is not None, f"{rid}: an acknowledged create is lost"
            assert due.get(rid) == expected_reason(run, far), rid
        status = {}
        for op, args, _, got in acked:
            if op in ("create", "claim", "park", "finish"):
                status[args[0]] = {"create": PENDING, "claim": RUNNING, "park": PARKED, "finish": "SUCCEEDED"}[op]
        unsure = in_flight[0][1][0] if in_flight else None   # its write may or may not have landed
        assert all(s.get(rid).status == want for rid, want in status.items() if rid != unsure)
    finally:
        s.close()
        with redis.Redis.from_url(redis_server.url) as r:
            drop_namespace(r, namespace)
