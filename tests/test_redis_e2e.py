"""The producer and the worker end to end on Redis, across processes, through crashes.

Worker processes run ``_WORKER`` (below) in their own session so a test can
SIGKILL the whole process group.  Every task leaves a side effect in Redis
(``INCR`` / ``SADD`` keyed by task id) so "ran at least once" and "ran exactly
once" are checked against Redis itself, not against the worker's word.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from stem import PayloadSigner, ShutdownMode, Stem, TaskOptions, TaskRegistry, TaskState, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker
from tests.test_redis_faults import redis_server  # noqa: F401  (fixture)
from tests.support import drop_namespace, wait_for as wait_until

pytestmark = pytest.mark.redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = b"e2e-test-signing-key-0123456789"
NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


def _registry(url: str, namespace: str, task_sleep: float = 0.0) -> TaskRegistry:
    """The tasks both the test process and the worker processes know."""
    registry = TaskRegistry()
    # side effects ride out a Redis restart (up to ~20 s) instead of failing the task
    side = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])

    @registry.task("add")
    def add(ctx, a, b):
        return a + b

    @registry.task("effect", options=TaskOptions(max_retries=3))
    def effect(ctx, n):
        pipe = side.pipeline(transaction=False)
        pipe.incr(f"{namespace}:side:taken")
        pipe.sadd(f"{namespace}:side:done", ctx.id)
        pipe.execute()
        if task_sleep:
            time.sleep(task_sleep)
        return n

    @registry.task("long")
    def long(ctx, seconds):
        side.incr(f"{namespace}:side:runs:{ctx.id}")
        time.sleep(seconds)
        return "done"

    return registry


_WORKER = """
import faulthandler, logging, signal, sys
faulthandler.register(signal.SIGUSR1)
sys.path.insert(0, {root!r})
from stem import ExponentialJitterRetryStrategy, PayloadSigner, Worker, WorkerLifecycleConfig
from stem.backends.redis import RedisResultBackend
from stem.brokers.redis import RedisBroker
from tests.test_redis_e2e import _registry
url, namespace, vt, concurrency, task_sleep = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
broker = RedisBroker.from_url(url, namespace=namespace, default_visibility_timeout=vt)
backend = RedisResultBackend.from_url(url, namespace=namespace)
worker = Worker(broker, backend, _registry(url, namespace, task_sleep), concurrency=concurrency,
                signer=PayloadSigner({{"k1": {key!r}}}), heartbeat_interval=1.0,
                retry_strategy=ExponentialJitterRetryStrategy(base=0.1, max=0.5),
                lifecycle=WorkerLifecycleConfig(install_signal_handlers=True, soft_grace_period=5,
                                                force_shutdown_after=5))
worker.start()
"""


class Procs:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def worker(self, url, namespace, *, vt=30.0, concurrency=4, task_sleep=0.0) -> subprocess.Popen:
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")  # see Procs.log
        p = subprocess.Popen([sys.executable, "-c", _WORKER.format(root=str(ROOT), key=KEY), url, namespace,
                              str(vt), str(concurrency), str(task_sleep)],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def log(self, p: subprocess.Popen) -> pathlib.Path:
        return self.tmp_path / f"worker-{self.procs.index(p)}.log"

    @staticmethod
    def kill9(p: subprocess.Popen) -> None:
        """SIGKILL the worker's whole process group (supervisor and any children)."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9(p)


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture
def cleanup(redis_url, namespace):
    yield
    client = redis.Redis.from_url(redis_url)
    drop_namespace(client, namespace)
    client.close()


def _producer(url, namespace, signed=True, **broker_kwargs) -> Stem:
    broker = RedisBroker.from_url(url, namespace=namespace, **broker_kwargs)
    backend = RedisResultBackend.from_url(url, namespace=namespace)
    signer = PayloadSigner({"k1": KEY}) if signed else None
    return Stem(broker, backend, _registry(url, namespace), signer)




def all_succeeded(stem: Stem, ids: list[str]) -> bool:
    for i in range(0, len(ids), 1000):
        statuses = stem.backend.get_many(ids[i:i + 1000])
        if not all(s is not None and s.state is TaskState.SUCCEEDED for s in statuses):
            return False
    return True


def test_wait_for_task_in_the_producer_returns_the_result_of_a_worker_process(redis_url, namespace, procs,
                                                                              cleanup):
    stem = _producer(redis_url, namespace)
    procs.worker(redis_url, namespace, concurrency=2)
    task_id = stem.enqueue("add", args={"a": 2, "b": 3})
    status = stem.wait_for_task(task_id, timeout=30)
    assert status.state is TaskState.SUCCEEDED and status.result == 5
    stem.close()


@pytest.mark.timeout(120)
def test_a_killed_workers_tasks_are_completed_by_a_second_worker(redis_url, namespace, procs, cleanup):
    """kill -9 after 500 of 2,000 tasks; a second worker (2 s visibility timeout) completes all."""
    side = redis.Redis.from_url(redis_url)
    stem = _producer(redis_url, namespace)
    ids = stem.enqueue_many([("effect", {"n": i}) for i in range(2000)])
    first = procs.worker(redis_url, namespace, vt=2.0, concurrency=4, task_sleep=0.004)
    wait_until(lambda: int(side.get(f"{namespace}:side:taken") or 0) >= 500, 60, "500 tasks taken")
    procs.kill9(first)
    taken_by_first = int(side.get(f"{namespace}:side:taken"))
    assert taken_by_first < 2000, "the first worker finished everything before it was killed"
    assert stem.broker.stats("default").in_flight > 0, "nothing was left leased to the dead worker"
    procs.worker(redis_url, namespace, vt=2.0, concurrency=4)
    wait_until(lambda: all_succeeded(stem, ids), 90, "every task SUCCEEDED")
    assert side.smembers(f"{namespace}:side:done") == {i.encode() for i in ids}
    assert stem.broker.stats("default")[1:] == (0, 0, 0, 0)
    side.close()
    stem.close()


def _redis_restart_mid_run(redis_server, procs, n_tasks):
    namespace = "e2e"
    side = redis.Redis.from_url(redis_server.url)
    stem = _producer(redis_server.url, namespace, socket_timeout=5.0)
    worker = procs.worker(redis_server.url, namespace, vt=5.0, concurrency=4, task_sleep=0.002)
    ids = stem.enqueue_many([("effect", {"n": i}) for i in range(n_tasks)])
    wait_until(lambda: int(side.get(f"{namespace}:side:taken") or 0) >= n_tasks // 5, 60, "a fifth taken")
    redis_server.kill()
    log = procs.log(worker)
    wait_until(lambda: "Redis unreachable" in log.read_text(), 30, "the worker to notice the outage")
    redis_server.start()
    assert side.scard(f"{namespace}:side:done") < n_tasks, "the run finished before Redis was killed"
    wait_until(lambda: all_succeeded(stem, ids), 120, "every task SUCCEEDED after the restart", interval=0.2)
    assert side.scard(f"{namespace}:side:done") == n_tasks
    wait_until(lambda: stem.broker.stats("default")[1:] == (0, 0, 0, 0), 30, "the queue to drain")
    assert worker.poll() is None, "the worker died instead of resuming"
    side.close()
    stem.close()


@pytest.mark.timeout(120)
def test_the_worker_resumes_by_itself_after_redis_is_killed_and_restarted(redis_server, procs):
    _redis_restart_mid_run(redis_server, procs, 1000)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_worker_resumes_after_redis_is_killed_and_restarted_mid_5000_task_run(redis_server, procs):
    _redis_restart_mid_run(redis_server, procs, 5000)


@pytest.mark.timeout(60)
def test_a_long_task_runs_exactly_once_while_its_lease_is_renewed(redis_url, namespace, cleanup):
    """The task runs for 3x its visibility timeout while a second worker keeps asking for work."""
    side = redis.Redis.from_url(redis_url)
    registry = _registry(redis_url, namespace)
    workers = []
    for _ in range(2):
        broker = RedisBroker.from_url(redis_url, namespace=namespace, default_visibility_timeout=1.0)
        backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
        workers.append(Worker(broker, backend, registry, concurrency=1, lifecycle=NO_SIGNALS).run_in_background())
    stem = _producer(redis_url, namespace, signed=False)
    try:
        task_id = stem.enqueue("long", args={"seconds": 3.0})
        status = stem.wait_for_task(task_id, timeout=30)
        assert status.state is TaskState.SUCCEEDED and status.result == "done"
        assert int(side.get(f"{namespace}:side:runs:{task_id}")) == 1
        assert stem.broker.stats("default")[1:] == (0, 0, 0, 0)
    finally:
        for w in workers:
            w.shutdown(ShutdownMode.HARD, timeout=15)
            w.broker.close()
            w.backend.close()
        side.close()
        stem.close()


def _flip_a_byte_of_the_stored_frame(client, namespace) -> None:
    """Streams are append-only: rewrite the entry with one byte of its signed body flipped."""
    lane = f"{namespace}:{{q:default}}:lane:0"
    [(entry_id, fields)] = client.xrange(lane)
    frame = bytearray(fields[b"f"])
    frame[-1] ^= 0x01
    client.xadd(lane, {**fields, b"f": bytes(frame)})
    client.xdel(lane, entry_id)


@pytest.mark.parametrize("tamper", ["flipped-byte", "unsigned"])
def test_a_tampered_or_unsigned_frame_ends_in_the_dead_letter_queue(redis_url, namespace, tamper, cleanup):
    client = redis.Redis.from_url(redis_url)
    stem = _producer(redis_url, namespace, signed=(tamper == "flipped-byte"))
    task_id = stem.enqueue("add", args={"a": 1, "b": 2})
    if tamper == "flipped-byte":
        _flip_a_byte_of_the_stored_frame(client, namespace)
    broker = RedisBroker.from_url(redis_url, namespace=namespace)
    backend = RedisResultBackend.from_url(redis_url, namespace=namespace)
    worker = Worker(broker, backend, _registry(redis_url, namespace), concurrency=1,
                    signer=PayloadSigner({"k1": KEY}), lifecycle=NO_SIGNALS).run_in_background()
    try:
        status = stem.wait_for_task(task_id, timeout=20)
        assert (status.state, status.reason) == (TaskState.DEAD, "signature-invalid")
        # the DEAD status is stored before the dead-letter copy is made: wait for the copy
        wait_until(lambda: broker.dead_letters("default"), what="the dead letter")
        [dl] = broker.dead_letters("default")
        assert (dl.task_id, dl.reason) == (task_id, "signature-invalid")
        assert broker.stats("default")[1:] == (0, 0, 0, 1)
    finally:
        worker.shutdown(ShutdownMode.HARD, timeout=15)
        broker.close()
        backend.close()
        client.close()
        stem.close()
