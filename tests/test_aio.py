"""AsyncStem on every adapter: what it publishes and reads, its errors, group commit, waits, restarts.

Each test is a plain function that runs its coroutine with ``asyncio.run`` (no
plugin).  ``kind`` runs a test on memory, SQLite, Redis and Postgres; the
Redis-only tests count round trips and connections, and restart a private
redis-server.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from stem import AsyncStem, PayloadSigner, Stem, TaskContext, TaskOptions, TaskRegistry, TaskState, TaskStatus
from stem.envelope import decode_frame
from stem.errors import (BackendError, BrokerConnectionError, ConfigurationError, DuplicateTaskError, EncodeError,
                         InvalidTaskOptionsError, TaskTimeoutError, UnknownTaskError)
from stem.keys import id_key
from stem.revocation import verify_proof

from .support import wait_until

registry = TaskRegistry()


@registry.task("aio.add")
def add(ctx: TaskContext, x: int, y: int = 0) -> int:
    return x + y


@registry.task("aio.unique", options=TaskOptions(unique=True, unique_for=60.0))
def unique_task(ctx: TaskContext, k: int) -> None:
    return None


KINDS = ["memory", "sqlite", "redis", "postgres"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def adapters(request, kind, tmp_path, namespace):
    """(broker, backend) of ``kind``, each in a namespace, schema or file of its own."""
    if kind == "memory":
        from stem.backends import InMemoryResultBackend
        from stem.brokers import InMemoryBroker
        pair = InMemoryBroker(), InMemoryResultBackend()
    elif kind == "sqlite":
        from stem.backends.sqlite import SqliteResultBackend
        from stem.brokers.sqlite import SqliteBroker
        pair = SqliteBroker(str(tmp_path / "q.db")), SqliteResultBackend(str(tmp_path / "r.db"))
    elif kind == "redis":
        from stem.backends import RedisResultBackend
        from stem.brokers import RedisBroker
        url = request.getfixturevalue("redis_url")
        request.getfixturevalue("raw")          # drops the namespace afterwards
        pair = RedisBroker(url, namespace=namespace), RedisResultBackend(url, namespace=namespace)
    else:
        from stem.backends.postgres import PostgresResultBackend
        from stem.brokers.postgres import PostgresBroker
        url = request.getfixturevalue("postgres_url")
        schema = f"{namespace}_{uuid.uuid4().hex[:6]}"

        def drop():
            import psycopg
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        request.addfinalizer(drop)
        pair = PostgresBroker(url, schema=schema), PostgresResultBackend(url, schema=schema)
    yield pair
    for a in pair:
        a.close()


def run(coro):
    return asyncio.run(coro)


def done(task_id: str, result=None, state=TaskState.SUCCEEDED) -> TaskStatus:
    return TaskStatus(id=task_id, state=state, result=result)


# -- publishing -------------------------------------------------------------------------

def test_enqueue_publishes_the_frame_the_sync_producer_builds(adapters):
    broker, backend = adapters
    signer = PayloadSigner({"k1": b"k" * 32}, "k1")

    async def main():
        async with AsyncStem(broker, backend, registry, signer) as s:
            tid = await s.enqueue("aio.add", {"x": 1}, meta={"m": 1}, headers={"h": "v"})
            return tid, broker.consume(["default"], 10, 2.0)

    tid, [d] = run(main())
    env = decode_frame(d.frame, signer)        # signed with the producer's key: verifies
    assert (env.id, env.name, env.args, env.meta, env.headers) == (tid, "aio.add", {"x": 1}, {"m": 1}, {"h": "v"})


def test_call_enqueues_a_typed_handle_and_its_ref_waits_for_the_result(adapters):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            ref = await s.call(add, 2, y=3)
            [d] = broker.consume(["default"], 1, 2.0)
            assert decode_frame(d.frame).args == {"x": 2, "y": 3}
            backend.store(done(ref.id, 5))
            return await ref.result(timeout=5)

    assert run(main()) == 5


def test_enqueue_many_publishes_a_batch_in_one_round_trip_with_keyed_items(adapters, kind):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            plain = await s.enqueue_many([("aio.add", {"x": i}) for i in range(50)])
            before = s.round_trips
            mixed = await s.enqueue_many([("aio.add", {"x": 1}), ("aio.unique", {"k": 1}), ("aio.unique", {"k": 1}),
                                          {"name": "aio.add", "args": {"x": 2}, "task_id": "explicit-1"}])
            return plain, mixed, s.round_trips - before, broker.stats("default").ready

    plain, mixed, trips, ready = run(main())
    assert len(set(plain)) == 50
    assert mixed[2] == mixed[1] and mixed.duplicates == [2] and mixed[3] == "explicit-1"
    assert trips == 1
    assert ready == 53


def test_concurrent_enqueues_share_round_trips_and_each_returns_once_stored(adapters, kind):
    broker, backend = adapters
    n = 300

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            async def one(i):
                tid = await s.enqueue("aio.add", {"x": i}, task_id=f"t-{i}")
                # its id comes back only once its task is stored (the key is claimed with it)
                return tid, broker.key_owner("default", id_key(tid))

            got = await asyncio.gather(*(one(i) for i in range(n)))
            plain = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(n)))
            return got, plain, s.round_trips, broker.stats("default").ready

    got, plain, trips, ready = run(main())
    assert all(owner == tid for tid, owner in got)
    assert len(set(plain)) == n
    assert trips <= 4, f"{2 * n} concurrent enqueues took {trips} round trips"
    assert ready == 2 * n


def test_unique_and_explicit_id_enqueues_keep_their_semantics(adapters):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            ids = await asyncio.gather(*(s.enqueue("aio.unique", {"k": 7}) for _ in range(5)))
            with pytest.raises(DuplicateTaskError) as e:
                await s.enqueue("aio.unique", {"k": 7}, on_duplicate="raise")
            first = await s.enqueue("aio.add", {"x": 1}, task_id="order-1")
            again = await s.enqueue("aio.add", {"x": 1}, task_id="order-1")
            with pytest.raises(DuplicateTaskError):
                await s.enqueue("aio.add", {"x": 1}, task_id="order-1", on_duplicate="raise")
            return ids, e.value, first, again, broker.stats("default").ready

    ids, error, first, again, ready = run(main())
    assert len(set(ids)) == 1 and error.existing_id == ids[0]
    assert first == again == "order-1"
    assert ready == 2


@pytest.mark.parametrize("call, error", [
    (lambda s: s.enqueue("aio.nope"), UnknownTaskError),
    (lambda s: s.enqueue("aio.add", {"x": object()}), EncodeError),
    (lambda s: s.enqueue("aio.add", ["x"]), EncodeError),
    (lambda s: s.enqueue("aio.add", {"x": 1}, countdown=-1), InvalidTaskOptionsError),
    (lambda s: s.enqueue("aio.add", {"x": 1}, on_duplicate="maybe"), InvalidTaskOptionsError),
    (lambda s: s.enqueue("aio.add", {"x": 1}, options=TaskOptions(rate_limit="1/s", rate_scope="worker")), InvalidTaskOptionsError),
    (lambda s: s.enqueue_many([("aio.add", {"x": 1}), ("aio.nope", {})]), UnknownTaskError),
    (lambda s: s.call(add, 1, z=2), InvalidTaskOptionsError),
    (lambda s: s.wait_for_task("", timeout=1), InvalidTaskOptionsError),
    (lambda s: s.wait_for_task("a", timeout=-1), InvalidTaskOptionsError),
    (lambda s: s.wait_many(["a"], return_when="SOMETIMES"), InvalidTaskOptionsError),
    (lambda s: s.wait_many("abc"), InvalidTaskOptionsError),
    (lambda s: s.get_status(""), InvalidTaskOptionsError),
    (lambda s: s.revoke([""]), ConfigurationError),
])
def test_bad_input_is_refused_before_anything_is_queued(adapters, call, error):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            with pytest.raises(error):
                await call(s)
            return broker.stats("default").ready

    assert run(main()) == 0


def test_gathered_calls_framed_together_each_get_their_own_id_or_error(adapters):
    """Calls of a name and args are framed in their round trip, one batch per name: a bad
    call among good ones gets its own error and publishes nothing; the others, of every
    kind (plain, unique, another name, a bad name), get what one call alone would get."""
    broker, backend = adapters
    signer = PayloadSigner({"k1": b"k" * 32}, "k1")

    async def main():
        async with AsyncStem(broker, backend, registry, signer) as s:
            await s.enqueue("aio.add", {"x": -1})          # opens the adapters: the next calls coalesce
            broker.consume(["default"], 10, 2.0)
            calls = [s.enqueue("aio.add", {"x": i}) for i in range(20)]
            calls += [s.enqueue("aio.add", {"x": object()}), s.enqueue("aio.add", {1: 2}), s.enqueue("aio.nope"),
                      s.enqueue("aio.unique", {"k": 3}), s.enqueue("aio.unique", {"k": 3}), s.enqueue("aio.add")]
            got = await asyncio.gather(*calls, return_exceptions=True)
            return got, broker.consume(["default"], 100, 2.0)

    got, deliveries = run(main())
    plain, (bad_value, bad_key, unknown, u1, u2, no_args) = got[:20], got[20:]
    assert isinstance(bad_value, EncodeError) and isinstance(bad_key, EncodeError)
    assert isinstance(unknown, UnknownTaskError)
    assert u1 == u2 and isinstance(u1, str)
    envs = {d.task_id: decode_frame(d.frame, signer) for d in deliveries}   # signed: verifies
    assert set(envs) == {*plain, u1, no_args}
    assert [envs[t].args for t in plain] == [{"x": i} for i in range(20)]
    assert envs[no_args].args == {} and envs[u1].args == {"k": 3}


def test_gathered_calls_match_the_sync_producers_frames(adapters):
    broker, backend = adapters
    sync = Stem(broker, backend, registry)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            await s.enqueue("aio.add", {"x": 0})
            await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(5)))
            return broker.consume(["default"], 10, 2.0)

    sync.enqueue("aio.add", {"x": 9})
    [d] = broker.consume(["default"], 1, 2.0)
    sync_env = decode_frame(d.frame)
    envs = [decode_frame(d.frame) for d in run(main())]
    assert len(envs) == 6
    for env in envs:    # every field but the id, args and time is the sync producer's
        assert {f: getattr(env, f) for f in env.__struct_fields__ if f not in ("id", "args", "enqueued_at")} == \
            {f: getattr(sync_env, f) for f in sync_env.__struct_fields__ if f not in ("id", "args", "enqueued_at")}


def test_a_call_cancelled_before_its_round_trip_publishes_nothing(adapters):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            await s.enqueue("aio.add", {"x": 0})
            broker.consume(["default"], 10, 2.0)
            tasks = [asyncio.ensure_future(s.enqueue("aio.add", {"x": i})) for i in range(4)]
            tasks.append(asyncio.ensure_future(s.enqueue("aio.add", {"x": 9}, meta={"m": 1})))
            await asyncio.sleep(0)             # every call has queued itself; the round trip has not started
            tasks[1].cancel()
            tasks[4].cancel()
            got = await asyncio.gather(*tasks, return_exceptions=True)
            return got, broker.consume(["default"], 10, 2.0)

    got, deliveries = run(main())
    assert isinstance(got[1], asyncio.CancelledError) and isinstance(got[4], asyncio.CancelledError)
    assert {d.task_id for d in deliveries} == {got[0], got[2], got[3]}


def test_a_cancelled_round_trip_cancels_its_callers_and_the_next_calls_go_through(adapters, kind, monkeypatch):
    broker, backend = adapters
    from stem.aio import _LocalPublisher
    from stem.brokers.postgres_async import AsyncPostgresPublisher
    from stem.brokers.redis_async import AsyncRedisPublisher
    publisher = {"redis": AsyncRedisPublisher, "postgres": AsyncPostgresPublisher}.get(kind, _LocalPublisher)
    real = publisher.publish
    calls, queued = [], []

    async def cancelled_once(self, *args):
        calls.append(len(args[0]) + len(args[1]) + sum(len(f[1]) for f in args[2]))
        if len(calls) == 2:         # two more calls queue for the next round trip, then this one is cancelled
            queued.extend(asyncio.ensure_future(stem.enqueue("aio.add", {"x": 9})) for _ in range(2))
            await asyncio.sleep(0)
            raise asyncio.CancelledError()     # as if the round trip's own task were cancelled
        return await real(self, *args)

    monkeypatch.setattr(publisher, "publish", cancelled_once)
    stem = AsyncStem(broker, backend, registry)

    async def main():
        async with stem as s:
            await s.enqueue("aio.add", {"x": -1})
            got = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(5)), return_exceptions=True)
            waiting = await asyncio.gather(*queued, return_exceptions=True)   # none is left waiting
            after = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(3)))
            return got + waiting, after, {d.task_id for d in broker.consume(["default"], 20, 2.0)}

    got, after, stored = run(main())
    assert len(got) == 7 and all(isinstance(r, asyncio.CancelledError) for r in got)
    assert set(after) < stored and len(stored) == 4      # the first call and the three after
    assert calls[1] == 5


def test_publish_signals_fire_for_gathered_calls(adapters):
    from stem import signals
    broker, backend = adapters
    before, after = [], []

    def on_before(sender, envelope, **kw):
        before.append(envelope.id)

    def on_after(sender, envelope, **kw):
        after.append(envelope.id)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            await s.enqueue("aio.add", {"x": 0})
            return await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(5)))

    signals.before_task_publish.connect(on_before)
    signals.after_task_publish.connect(on_after)
    try:
        ids = run(main())
    finally:
        signals.before_task_publish.disconnect(on_before)
        signals.after_task_publish.disconnect(on_after)
    assert set(ids) <= set(before) and set(ids) <= set(after) and len(after) == 6


def test_as_completed_checks_its_arguments_at_the_call(adapters):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            with pytest.raises(InvalidTaskOptionsError):
                s.as_completed(["a"], timeout=float("nan"))

    run(main())


def test_results_need_a_backend():
    from stem.brokers import InMemoryBroker

    async def main():
        async with AsyncStem(InMemoryBroker()) as s:
            await s.enqueue("any.name")
            for call in (s.get_status("a"), s.wait_for_task("a", 1), s.wait_many(["a"], 1), s.revoke("a")):
                with pytest.raises(ConfigurationError):
                    await call
            with pytest.raises(ConfigurationError):
                s.as_completed(["a"])

    run(main())


# -- results --------------------------------------------------------------------------------

def test_get_status_is_pending_until_a_status_is_stored(adapters):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            first = await s.get_status("t1")
            backend.store(done("t1", 42))
            return first, await s.get_status("t1")

    first, second = run(main())
    assert first.state is TaskState.PENDING
    assert second.state is TaskState.SUCCEEDED and second.result == 42


def test_wait_for_task_returns_a_result_stored_before_or_after_the_call(adapters):
    broker, backend = adapters
    backend.store(done("early", 1))

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            early = await s.wait_for_task("early", timeout=5)
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, lambda: backend.store(done("late", 2)))
            late = await s.wait_for_task("late", timeout=10)
            backend.store(TaskStatus(id="running", state=TaskState.RUNNING))
            with pytest.raises(TaskTimeoutError, match="RUNNING"):
                await s.wait_for_task("running", timeout=0.2)
            return early.result, late.result

    assert run(main()) == (1, 2)


def test_wait_many_and_as_completed_follow_the_sync_producer(adapters):
    broker, backend = adapters
    backend.store_many([done("a", 1), done("b", state=TaskState.FAILED)])

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            first = await s.wait_many(["a", "c"], timeout=5, return_when="FIRST_COMPLETED")
            failed = await s.wait_many(["c", "b"], timeout=5, return_when="FIRST_EXCEPTION")
            timed_out = await s.wait_many(["a", "c"], timeout=0.2)
            asyncio.get_running_loop().call_later(0.2, lambda: backend.store(done("c", 3)))
            seen = [st.id async for st in s.as_completed(["c", "a", "b"], timeout=10)]
            with pytest.raises(TaskTimeoutError) as e:
                async for _ in s.as_completed(["a", "never"], timeout=0.2):
                    pass
            return first, failed, timed_out, seen, e.value

    first, failed, timed_out, seen, error = run(main())
    assert list(first.done) == ["a"] and first.pending == ["c"]
    assert list(failed.done) == ["b"] and failed.pending == ["c"]
    assert list(timed_out.done) == ["a"] and timed_out.pending == ["c"]
    assert seen == ["a", "b", "c"]                  # those already finished first, in input order
    assert error.pending == ["never"]


def test_many_pending_waits_finish_when_their_results_land(adapters):
    broker, backend = adapters
    ids = [f"w{i}" for i in range(200)]

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            waits = asyncio.gather(*(s.wait_for_task(i, timeout=20) for i in ids))
            asyncio.get_running_loop().call_later(0.3, lambda: backend.store_many([done(i, i) for i in ids]))
            return [st.result for st in await waits]

    assert run(main()) == ids


def test_a_cancelled_wait_leaves_no_waiter_behind(adapters, kind):
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            task = asyncio.ensure_future(s.wait_for_task("stuck", timeout=30))
            await asyncio.sleep(0.2)
            hub = s._results.hub
            assert hub.waited_ids() == ["stuck"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not hub.has_waiters()
            if kind == "redis":          # and the channel is unsubscribed
                channel = backend.done_channel("stuck")
                deadline = time.monotonic() + 5
                while broker.store.client.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert broker.store.client.pubsub_numsub(channel)[0][1] == 0
            # the hub still serves new waits
            backend.store(done("next", 1))
            return (await s.wait_for_task("next", timeout=5)).result

    assert run(main()) == 1


def test_close_ends_pending_waits_with_backend_error(adapters):
    broker, backend = adapters

    async def main():
        s = AsyncStem(broker, backend, registry)
        task = asyncio.ensure_future(s.wait_for_task("stuck", timeout=30))
        await asyncio.sleep(0.2)
        await s.close()
        with pytest.raises(BackendError):
            await task

    run(main())


def test_revoke_stores_a_signed_revocation(adapters):
    broker, backend = adapters
    signer = PayloadSigner({"k1": b"k" * 32}, "k1")

    async def main():
        async with AsyncStem(broker, backend, registry, signer) as s:
            await s.revoke(["r1", "r2"], expires=60)
            await s.revoke("r3")
            return backend.revoked(["r1", "r2", "r3", "r4"]), backend.revocation_proofs(["r1"])

    revoked, proofs = run(main())
    assert revoked == {"r1", "r2", "r3"}
    assert verify_proof("r1", proofs["r1"], signer) is not None


def test_an_async_stem_is_bound_to_the_loop_of_its_first_call():
    from stem.brokers import InMemoryBroker
    s = AsyncStem(InMemoryBroker())
    run(s.enqueue("a.b"))
    with pytest.raises(ConfigurationError, match="event loop"):
        run(s.enqueue("a.b"))


# -- Redis: connections and restarts ---------------------------------------------------------

def _redis_pair(url: str, namespace: str, **kwargs):
    from stem.backends import RedisResultBackend
    from stem.brokers import RedisBroker
    return RedisBroker(url, namespace=namespace, **kwargs), RedisResultBackend(url, namespace=namespace)


def test_enqueues_and_waits_use_two_redis_connections(redis_server, namespace):
    import redis
    broker, backend = _redis_pair(redis_server.url, namespace)
    probe = redis.Redis.from_url(redis_server.url)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            ids = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(2000)))
            waits = asyncio.gather(*(s.wait_for_task(i, timeout=20) for i in ids))
            await asyncio.sleep(0.3)
            during = int(probe.info("clients")["connected_clients"]) - 1
            backend.store_many([done(i, 1) for i in ids])
            await waits
            await s.get_status(ids[0])
            await s.revoke(ids[0])
            return during

    assert run(main()) <= 2       # the command connection and the pub/sub one (the probe excluded)
    probe.close()


def test_enqueue_retries_through_a_redis_restart_as_the_sync_producer_does(redis_server, namespace):
    broker, backend = _redis_pair(redis_server.url, namespace, retry_attempts=6)
    sync = Stem(broker, backend, registry)

    def restart_soon():
        redis_server.kill()
        time.sleep(0.3)
        redis_server.start()

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            await s.enqueue("aio.add", {"x": 0})
            t = threading.Thread(target=restart_soon)
            t.start()
            await asyncio.sleep(0.05)
            tid = await s.enqueue("aio.add", {"x": 1})       # retried until the server is back
            await asyncio.to_thread(t.join)
            t = threading.Thread(target=restart_soon)       # the sync producer, the same way
            t.start()
            await asyncio.sleep(0.05)
            sync_tid = sync.enqueue("aio.add", {"x": 2})
            await asyncio.to_thread(t.join)
            return tid, sync_tid, {d.task_id for d in broker.consume(["default"], 10, 2.0)}

    tid, sync_tid, ids = run(main())
    assert {tid, sync_tid} <= ids


def test_enqueue_raises_the_sync_producers_error_when_redis_stays_down(redis_server, namespace):
    broker, backend = _redis_pair(redis_server.url, namespace, retry_attempts=2)
    sync = Stem(broker, backend, registry)
    redis_server.kill()
    with pytest.raises(BrokerConnectionError) as sync_error:
        sync.enqueue("aio.add", {"x": 1})

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            results = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(20)),
                                           return_exceptions=True)
            return results

    results = run(main())
    assert all(isinstance(r, BrokerConnectionError) for r in results)
    assert str(results[0]).split(" after ")[0] == str(sync_error.value).split(" after ")[0]


def test_a_wait_pending_across_a_redis_restart_gets_its_result(redis_server, namespace):
    broker, backend = _redis_pair(redis_server.url, namespace)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            task = asyncio.ensure_future(s.wait_for_task("across", timeout=30))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis_server.restart)
            assert await asyncio.to_thread(wait_until, lambda: _stores(backend, done("across", 9)), 10)
            return (await task).result

    assert run(main()) == 9


def _stores(backend, status) -> bool:
    try:
        backend.store(status)
        return True
    except Exception:   # noqa: BLE001 - the server is still coming back
        return False


def _sentinel_pair(request):
    """A broker and a backend through the contract suite's Sentinel factories (their own
    namespace on the session's master, replica and sentinel)."""
    from .contract.adapters_sentinel import BACKENDS, BROKERS
    broker, backend = BROKERS["sentinel"](request), BACKENDS["sentinel"](request)
    request.addfinalizer(broker.close)
    request.addfinalizer(backend.close)
    return broker, backend


def _stem_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stem-aio")]


def test_behind_sentinel_the_async_producer_talks_to_the_master_natively(request):
    broker, backend = _sentinel_pair(request)
    master = request.getfixturevalue("sentinel_setup").master.url
    import redis
    probe = redis.Redis.from_url(master)
    request.addfinalizer(probe.close)
    before = int(probe.info("clients")["connected_clients"])

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            tid = await s.enqueue("aio.add", {"x": 1})
            ids = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(50)))
            unique = await asyncio.gather(*(s.enqueue("aio.unique", {"k": 1}) for _ in range(3)))
            waits = asyncio.gather(s.wait_for_task(tid, timeout=10), *(s.wait_for_task(i, timeout=10) for i in ids))
            await asyncio.sleep(0.2)
            connections = int(probe.info("clients")["connected_clients"]) - before
            await asyncio.to_thread(backend.store_many, [done(i, 1) for i in [tid, *ids]])
            statuses = await waits
            return tid, ids, unique, statuses, connections, _stem_threads(), broker.stats("default").ready

    tid, ids, unique, statuses, connections, threads, ready = run(main())
    assert all(s.result == 1 for s in statuses) and len(set(ids)) == 50 and len(set(unique)) == 1
    assert ready == 52
    assert threads == []            # no executor: every call went through redis.asyncio
    assert connections <= 2         # the command connection and the pub/sub one


def test_on_a_redis_cluster_the_async_producer_runs_the_sync_adapters_on_its_executor(request):
    from .contract.adapters_cluster import BACKENDS, BROKERS
    broker, backend = BROKERS["cluster"](request), BACKENDS["cluster"](request)
    request.addfinalizer(broker.close)
    request.addfinalizer(backend.close)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            ids = await asyncio.gather(*(s.enqueue("aio.add", {"x": i}) for i in range(20)))
            await asyncio.to_thread(backend.store, done(ids[0], 3))
            return ids, await s.wait_for_task(ids[0], timeout=10), _stem_threads(), broker.stats("default").ready

    ids, status, threads, ready = run(main())
    assert len(set(ids)) == 20 and ready == 20 and status.result == 3
    assert threads                   # no asyncio cluster client: the sync adapters, on the producer's threads


def test_a_former_masters_readonly_reply_is_retried_behind_sentinel_and_an_error_elsewhere(sentinel_setup,
                                                                                           redis_url):
    import redis
    from stem.errors import BrokerError
    from stem.stores.redis_async import AsyncRedisStore

    async def attempt(url):
        store = AsyncRedisStore(url, retry_attempts=3)
        calls = []

        async def fn():
            calls.append(await store.execute([("PING",)]))
            if len(calls) == 1:
                raise redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica.")
            return "stored"
        try:
            return await store.call(fn, "publish"), len(calls)
        except BrokerError as exc:
            return exc, len(calls)
        finally:
            await store.close()

    assert run(attempt(sentinel_setup.url())) == ("stored", 2)     # dropped, asked the sentinels, sent again
    error, calls = run(attempt(redis_url))
    assert isinstance(error, BrokerError) and "READONLY" in str(error) and calls == 1


def _failover(setup, how: str) -> None:
    from .support import wait_for
    setup.wait_replicated()
    if how == "kill -9 of the master":
        setup.failover_by_kill()
        return
    old = setup.master.port          # the old master lives on, demoted: its connections answer READONLY
    with setup._sentinel_client() as client:
        client.execute_command("SENTINEL", "FAILOVER", setup.SERVICE)
    wait_for(lambda: setup.master_port() not in (None, old), 60, "the sentinel to fail over")
    import redis
    with redis.Redis(port=old) as demoted:   # what it takes before it refuses writes (until then they are lost)
        wait_for(lambda: demoted.info("replication")["role"] == "slave", 60, "the old master to be demoted")


@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [
    "kill -9 of the master",
    # slow: the demoted master keeps its pub/sub connections, and a notification published
    # while it resyncs never reaches the wait subscribed there, which then ends at its timeout
    # (60 s) with the status it reads then; under load that outlasts the test's 120 s
    pytest.param("SENTINEL FAILOVER", marks=pytest.mark.slow)])
def test_behind_sentinel_the_async_producer_follows_a_failover(own_sentinel, namespace, how):
    broker, backend = _redis_pair(own_sentinel.url(), namespace, retry_attempts=30)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            first = await s.enqueue("aio.add", {"x": 1})
            wait = asyncio.ensure_future(s.wait_for_task(first, timeout=60))
            await asyncio.to_thread(_failover, own_sentinel, how)
            after = await s.enqueue("aio.add", {"x": 2})      # retried until the promoted replica answers
            assert await asyncio.to_thread(wait_until, lambda: _stores(backend, done(first, 7)), 30)
            return after, (await wait).result, _stem_threads()

    after, result, threads = run(main())
    assert result == 7 and threads == []
    assert after in {d.task_id for d in broker.consume(["default"], 10, 2.0)}


@registry.task("aio.limited", options=TaskOptions(rate_limit="1/h", rate_key=["tenant"]))
def limited(ctx: TaskContext, tenant: str) -> str:
    return tenant


def test_limited_tasks_go_into_their_lanes_on_every_async_path(adapters):
    """enqueue (coalesced), enqueue_many and a keyed enqueue of a rate-limited task: each
    waits in its lane (throttled), none among the ready messages."""
    broker, backend = adapters

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            await asyncio.gather(*(s.enqueue("aio.limited", {"tenant": t}) for t in ("a", "b", "a")))
            await s.enqueue_many([("aio.limited", {"tenant": "c"}), ("aio.add", {"x": 1})])
            await s.enqueue("aio.limited", {"tenant": "d"}, task_id="limited-explicit")
            await s.call(limited, tenant="e")

    run(main())
    stats = broker.stats("default")
    assert (stats.ready, stats.throttled) == (1, 6)
    lanes = {lane.rate_key: lane.waiting for lane in broker.lane_stats("default")}
    assert lanes == {"aio.limited[tenant='a']": 2, "aio.limited[tenant='b']": 1, "aio.limited[tenant='c']": 1,
                     "aio.limited[tenant='d']": 1, "aio.limited[tenant='e']": 1}


# -- canvases: AsyncStem.apply's handle ------------------------------------------------------------
@registry.task("aio.total")
def total(ctx: TaskContext) -> int:
    return sum(ctx.previous)


@registry.task("aio.boom")
def boom(ctx: TaskContext) -> None:
    raise ValueError("boom")


def _canvas_worker(broker, backend):
    from stem import Worker, WorkerLifecycleConfig
    worker = Worker(broker, backend, registry, concurrency=2, isolation="inline",
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5,
                                                    force_shutdown_after=5))
    worker.run_in_background()
    return worker


def _no_sync_reads(backend, monkeypatch):
    """On Redis and Postgres the async handle must not touch the sync backend's reads."""
    def refused(*a, **kw):
        raise AssertionError("an async canvas handle read through the sync backend")

    for name in ("group_get", "group_outcomes", "get", "get_many"):
        monkeypatch.setattr(backend, name, refused)


def test_apply_returns_an_async_handle_that_waits_and_reads_natively(adapters, kind, monkeypatch):
    from stem.canvas import Signature, chain, chord, group
    from stem.canvas_aio import AsyncCanvasHandle
    broker, backend = adapters
    mine = backend                     # the producer's backend; on Redis and Postgres one of its own,
    if kind in ("redis", "postgres"):  # whose sync reads are then refused (the worker keeps its own)
        from stem.backends import from_url
        url, options = backend.reopen_recipe()
        mine = from_url(url, **options)

    async def main():
        s = AsyncStem(broker, mine, registry)
        worker = _canvas_worker(broker, backend)
        try:
            h = await s.apply(chord(group(Signature("aio.add", {"x": i}) for i in range(5)), Signature("aio.total")))
            c = await s.apply(chain(Signature("aio.add", {"x": 1}), Signature("aio.add", {"x": 2}, previous_as="y")))
            g = await s.apply(group(Signature("aio.add", {"x": i, "y": 1}) for i in range(3)))
            assert isinstance(h, AsyncCanvasHandle) and (h.kind, c.kind, g.kind) == ("chord", "chain", "group")
            if kind in ("redis", "postgres"):
                _no_sync_reads(mine, monkeypatch)      # from here on: the async clients alone
            assert (await h.wait(20)).state is TaskState.SUCCEEDED
            assert await h.get(5) == 10 and await h.results() == [0, 1, 2, 3, 4]
            assert await c.get(20) == 3 and await c.results() == [1, 3]
            assert await g.results(timeout=20) == [1, 2, 3]
            assert str(await h.progress()) == "5 of 5 done" and await c.progress() == (2, 2)
            assert (await g.status()).state is TaskState.SUCCEEDED
            again = await s.canvas_handle(h.id)
            assert again.kind == "chord" and await again.results() == [0, 1, 2, 3, 4]
            task = await s.canvas_handle(c.id)
            assert task.kind == "task" and await task.results() == [3] and await task.progress() == (1, 1)
        finally:
            _stop(worker)
            monkeypatch.undo()
            await s.close()

    run(main())


def _stop(worker) -> None:
    from stem import ShutdownMode
    worker.shutdown(ShutdownMode.HARD, timeout=15)


def test_an_async_handle_reports_failures_timeouts_and_gone_results(adapters):
    from stem.canvas import MemberFailure, Signature, chord, group
    from stem.canvas_aio import AsyncCanvasHandle
    from stem.errors import StemError, TaskFailedError
    broker, backend = adapters

    async def main():
        s = AsyncStem(broker, backend, registry)
        worker = None
        try:
            pending = await s.apply(group([Signature("aio.add", {"x": 1})]))
            with pytest.raises(TaskTimeoutError):
                await pending.wait(0.2)                  # no worker yet
            assert (await pending.status()).state is TaskState.PENDING
            assert await pending.progress() == (0, 1)
            worker = _canvas_worker(broker, backend)
            failed = await s.apply(chord(group([Signature("aio.add", {"x": 1}), Signature("aio.boom")]),
                                         Signature("aio.total")))
            with pytest.raises(TaskFailedError, match="dependency-failed"):
                await failed.get(20)
            deadline = time.monotonic() + 20
            while (await failed.progress()).done < 2:    # the chord failed at its first failure
                assert time.monotonic() < deadline, "the other member did not end"
                await asyncio.sleep(0.02)
            results = await failed.results()
            assert results[0] == 1 and isinstance(results[1], MemberFailure)
            with pytest.raises(InvalidTaskOptionsError):
                await s.canvas_handle("")
            gone = await s.canvas_handle("no-such-canvas")
            assert gone.kind == "task" and await gone.results() == [None]
            with pytest.raises(StemError, match="unknown or expired"):
                await AsyncCanvasHandle(s, "no-such-group", "group").results()
        finally:
            if worker is not None:
                _stop(worker)
            await s.close()

    run(main())
