"""Group commit (``stem.stores.redis_group``): threads sending single commands at once share
round trips; each gets its own reply only once its command was answered, and only its own
error."""

from __future__ import annotations

import os
import threading

import pytest
import redis

from stem import PayloadSigner, Stem, TaskRegistry
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker
from stem.stores import redis_group
from stem.stores.redis_pipe import pack_command

from .support import wait_for

pytestmark = pytest.mark.redis

registry = TaskRegistry()


@registry.task("grp.echo")
def echo(ctx, i: int = 0) -> int:
    return i


class _Gate:
    """Holds the first round trip of ``redis_group`` in flight until ``open``; records
    every round trip's size (1 for the lone leader, n for a pipeline of n)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        real_one, real_packed = redis_group._execute_one, redis_group.execute_packed

        def one(client, packed, raise_error=False):
            self.sizes.append(1)
            if len(self.sizes) == 1:
                self.entered.set()
                assert self.opened.wait(30)
            return real_one(client, packed, raise_error)

        def packed_(client, packed, n):
            self.sizes.append(n)
            return real_packed(client, packed, n)
        monkeypatch.setattr(redis_group, "_execute_one", one)
        monkeypatch.setattr(redis_group, "execute_packed", packed_)

    def open(self) -> None:
        self.opened.set()

    def round(self, call, followers: int, client) -> None:
        """The scenario: ``call(0)`` leads and is held in flight; ``call(1)`` ... ``call(followers)``
        queue behind it; then the round trip goes and every caller returns."""
        threads = _run(1, call)
        assert self.entered.wait(10)
        threads += _run(followers, lambda i: call(i + 1))
        wait_for(lambda: _pending(client) == followers, 10, f"{followers} callers queued behind the leader")
        self.open()
        for t in threads:
            t.join(30)
            assert not t.is_alive()


def _pending(client) -> int:
    g = redis_group._groups.get(client.connection_pool)
    return 0 if g is None else len(g.pending)


@pytest.fixture
def broker(redis_url, namespace):
    broker = RedisBroker(redis_url, namespace=namespace)
    yield broker
    broker.close()


@pytest.fixture
def stem(redis_url, namespace):
    """A producer whose queue is declared (one task enqueued)."""
    stem = Stem(RedisBroker(redis_url, namespace=namespace), RedisResultBackend(redis_url, namespace=namespace),
                registry, PayloadSigner({"k": b"k" * 32}, "k"))
    stem.enqueue("grp.echo")
    yield stem
    stem.close()


def _run(n: int, target) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_callers_that_arrive_while_one_is_in_flight_share_the_next_round_trip(stem, redis_url, monkeypatch):
    key = stem.broker.queue_keys("default")[0]
    with redis.Redis.from_url(redis_url) as raw:
        gate = _Gate(monkeypatch)
        ids: dict[int, str] = {}
        stored_on_return: dict[int, bool] = {}

        def enqueue(i: int) -> None:
            ids[i] = stem.enqueue("grp.echo", {"i": i})
            # its id only once its task is stored
            stored_on_return[i] = any(f[b"t"].decode() == ids[i] for _, f in raw.xrange(key))

        gate.round(enqueue, 7, stem.broker._client)
        assert gate.sizes == [1, 7]                   # eight tasks, two round trips
        assert all(stored_on_return.values()) and len(stored_on_return) == 8
        assert len(set(ids.values())) == 8
        assert {f[b"t"].decode() for _, f in raw.xrange(key)} >= set(ids.values())


def test_an_error_reply_reaches_only_the_caller_whose_command_failed(broker, redis_url, namespace, monkeypatch):
    client = broker._client
    with redis.Redis.from_url(redis_url) as raw:
        raw.set(f"{namespace}:str", "x")
        gate = _Gate(monkeypatch)
        got: dict[int, object] = {}

        def call(i: int) -> None:
            cmd = (pack_command("XADD", f"{namespace}:str", "*", "a", i) if i % 3 == 1       # WRONGTYPE
                   else pack_command("ECHO", f"r{i}"))
            try:
                got[i] = redis_group.execute_one(client, cmd, raise_error=True)
            except redis.ResponseError as exc:
                got[i] = exc

        gate.round(call, 6, client)
        assert gate.sizes == [1, 6]
        for i in range(7):
            if i % 3 == 1:
                assert isinstance(got[i], redis.ResponseError) and "WRONGTYPE" in str(got[i])
            else:
                assert got[i] == f"r{i}".encode()


def test_a_failed_round_trip_reaches_each_of_its_callers_and_stem_retries_each(stem, redis_url, monkeypatch):
    key = stem.broker.queue_keys("default")[0]
    gate = _Gate(monkeypatch)
    real_packed = redis_group.execute_packed
    failed: list[int] = []

    def failing(client, packed, n):                 # the shared pipeline dies once
        if not failed:
            failed.append(n)
            raise redis.ConnectionError("connection lost mid-pipeline")
        return real_packed(client, packed, n)
    monkeypatch.setattr(redis_group, "execute_packed", failing)
    ids: dict[int, str] = {}
    errors: list[BaseException] = []

    def enqueue(i: int) -> None:
        try:
            ids[i] = stem.enqueue("grp.echo", {"i": i})
        except BaseException as exc:   # pragma: no cover - asserted empty
            errors.append(exc)

    gate.round(enqueue, 5, stem.broker._client)
    assert failed == [5] and not errors and len(ids) == 6
    with redis.Redis.from_url(redis_url) as raw:
        stored = [f[b"t"].decode() for _, f in raw.xrange(key)]
    assert set(ids.values()) <= set(stored)
    assert len(stored) == 7                      # each retried once, none written twice


def test_the_failed_callers_each_raise_an_exception_of_their_own(broker, monkeypatch):
    client = broker._client
    gate = _Gate(monkeypatch)
    monkeypatch.setattr(redis_group, "execute_packed",
                        lambda c, p, n: (_ for _ in ()).throw(redis.TimeoutError("slow")))
    got: dict[int, BaseException] = {}

    def call(i: int) -> None:
        try:
            redis_group.execute_one(client, pack_command("PING"))
        except redis.TimeoutError as exc:
            got[i] = exc

    gate.round(call, 3, client)
    assert 0 not in got and len(got) == 3
    assert len({id(e) for e in got.values()}) == 3 and all(str(e) == "slow" for e in got.values())
    assert redis_group.execute_one(client, pack_command("PING")) in (b"PONG", "PONG")   # not stuck


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_a_leader_is_in_flight_starts_with_no_leader(broker, monkeypatch):
    client = broker._client
    redis_group.execute_one(client, pack_command("PING"))
    gate = _Gate(monkeypatch)
    leader = _run(1, lambda i: redis_group.execute_one(client, pack_command("PING")))
    assert gate.entered.wait(10)
    assert redis_group._groups[client.connection_pool].busy
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            gate.opened.set()      # the child's copy of the gate: its own calls pass
            ok = redis_group.execute_one(client, pack_command("ECHO", "child")) == b"child"
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.open()
    leader[0].join(30)
    assert not redis_group._groups[client.connection_pool].busy


class _Wake:
    """A slot's wake lock that raises KeyboardInterrupt, as Ctrl-C does to a main thread waiting
    in ``acquire``: at once ("now": nobody handed it anything), or once woken ("after": it was
    just handed the lead)."""

    def __init__(self, real, mode: str):
        self.real, self.mode = real, mode

    def acquire(self, *a):
        if self.mode == "now":
            raise KeyboardInterrupt
        got = self.real.acquire(*a)
        if self.mode == "after":
            raise KeyboardInterrupt
        return got

    def release(self):
        self.real.release()


@pytest.mark.parametrize("when", ["now", "after"])
def test_a_caller_interrupted_in_its_wait_leaves_no_one_stuck(broker, monkeypatch, when):
    client = broker._client
    gate = _Gate(monkeypatch)
    got: dict[int, object] = {}
    modes = [when, "normal", "normal"]

    class Slot(redis_group._Slot):
        __slots__ = ()

        def __init__(self, packed):
            super().__init__(packed)
            self.wake = _Wake(self.wake, modes.pop(0))
    monkeypatch.setattr(redis_group, "_Slot", Slot)

    def call(i: int) -> None:
        try:
            got[i] = redis_group.execute_one(client, pack_command("ECHO", f"r{i}"))
        except KeyboardInterrupt as exc:
            got[i] = exc

    threads = _run(1, call)
    assert gate.entered.wait(10)
    threads += _run(1, lambda i: call(1))
    if when == "now":
        wait_for(lambda: 1 in got, 10, "the first follower interrupted")
    else:
        wait_for(lambda: _pending(client) == 1, 10, "the first follower queued")
    threads += _run(1, lambda i: call(2))
    wait_for(lambda: _pending(client) == (1 if when == "now" else 2), 10, "the second follower queued")
    threads += _run(1, lambda i: call(3))
    wait_for(lambda: _pending(client) == (2 if when == "now" else 3), 10, "the third follower queued")
    gate.open()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert got[0] == b"r0" and isinstance(got[1], KeyboardInterrupt)
    assert got[2] == b"r2" and got[3] == b"r3"
    # interrupted before anyone took it: withdrawn; handed the lead: it still sent all three
    assert gate.sizes == ([1, 2] if when == "now" else [1, 3])
    g = redis_group._groups[client.connection_pool]
    assert not g.busy and not g.pending


def test_an_interruption_of_the_sending_thread_reaches_the_others_as_a_connection_error(broker, monkeypatch):
    client = broker._client
    gate = _Gate(monkeypatch)
    monkeypatch.setattr(redis_group, "execute_packed",
                        lambda c, p, n: (_ for _ in ()).throw(KeyboardInterrupt()))
    got: dict[int, BaseException] = {}

    def call(i: int) -> None:
        try:
            redis_group.execute_one(client, pack_command("PING"))
        except BaseException as exc:
            got[i] = exc

    leader = _run(1, call)
    assert gate.entered.wait(10)
    followers = []
    for i in (1, 2, 3):      # in order: the first queued leads the flush
        followers += _run(1, lambda _, i=i: call(i))
        wait_for(lambda i=i: _pending(client) == i, 10, f"follower {i} queued")
    gate.open()
    for t in leader + followers:
        t.join(30)
    assert 0 not in got and isinstance(got[1], KeyboardInterrupt)
    assert all(isinstance(got[i], redis.ConnectionError) and isinstance(got[i].__cause__, KeyboardInterrupt)
               for i in (2, 3))
