"""stem.metrics: Prometheus metrics fed from the signals, scraped over HTTP from a running worker."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stem import Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig, signals
from stem import metrics as stem_metrics
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.errors import BrokerConnectionError, ConfigurationError
from stem.retry import FixedRetryStrategy
from .support import wait_until


def lifecycle(**kw):
    return WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5, **kw)




@pytest.fixture
def metrics():
    m = stem_metrics.install()
    server = stem_metrics.start_http_server(0)
    m.server = server
    yield m
    server.close()
    stem_metrics.uninstall()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, fetched over HTTP."""
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def stack():
    registry = TaskRegistry()
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    workers = []

    class S:
        pass

    s = S()
    s.registry, s.broker, s.backend = registry, broker, backend
    s.stem = Stem(broker, backend, registry)

    def worker(**kw):
        kw.setdefault("concurrency", 2)
        kw.setdefault("isolation", "process")
        kw.setdefault("lifecycle", lifecycle())
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.0))
        w = Worker(kw.pop("broker", broker), backend, registry, **kw)
        workers.append(w)
        return w.run_in_background()

    s.worker = worker
    yield s
    for w in workers:
        w.shutdown(timeout=30)


def test_metrics_scraped_over_http_after_100_tasks_show_counts_histograms_and_worker_gauges(metrics, stack):
    stack.registry.task("add")(lambda ctx, a, b: a + b)
    w = stack.worker(worker_id="w-metrics")
    ids = stack.stem.enqueue_many([("add", {"a": i, "b": 1}) for i in range(100)])
    for tid in ids:
        assert stack.stem.wait_for_task(tid, timeout=30).result is not None
    # signals are sent after the ack, which is after the result is stored: wait for them
    assert wait_until(lambda: value(scrape(metrics.server), "stem_tasks_succeeded_total", task="add",
                                    queue="default") == 100)
    s = scrape(metrics.server)
    key = dict(task="add", queue="default")
    assert value(s, "stem_tasks_received_total", **key) == 100
    assert value(s, "stem_tasks_failed_total", reason="error", **key) == 0
    assert value(s, "stem_tasks_retried_total", **key) == 0
    assert value(s, "stem_task_runtime_seconds_count", **key) == 100
    assert 0 < value(s, "stem_task_runtime_seconds_sum", **key) < 100
    assert value(s, "stem_task_runtime_seconds_bucket", le="+Inf", **key) == 100
    assert value(s, "stem_task_queue_wait_seconds_count", **key) == 100
    assert value(s, "stem_worker_concurrency", worker="w-metrics") == 2
    assert value(s, "stem_worker_children", worker="w-metrics") == 2
    assert value(s, "stem_worker_in_flight", worker="w-metrics") == 0
    assert value(s, "stem_broker_reconnects_total", worker="w-metrics") == 0
    rss = {labels: v for (name, labels), v in s.items() if name == "stem_child_rss_bytes"}
    assert len(rss) == 2 and all(v > 1_000_000 for v in rss.values())
    assert w.stats()["succeeded"] == 100


def test_failed_and_retried_counters(metrics, stack):
    @stack.registry.task("flaky", options=TaskOptions(max_retries=2))
    def flaky(ctx, fail_until):
        if ctx.attempt < fail_until:
            raise ValueError("not yet")
        return ctx.attempt

    stack.worker()
    ok = stack.stem.enqueue("flaky", {"fail_until": 1})      # 1 retry, then succeeds
    bad = stack.stem.enqueue("flaky", {"fail_until": 99})    # 2 retries, then fails for good
    assert stack.stem.wait_for_task(ok, timeout=30).result == 1
    assert stack.stem.wait_for_task(bad, timeout=30).reason == "error"
    key = dict(task="flaky", queue="default")
    assert wait_until(lambda: value(scrape(metrics.server), "stem_tasks_failed_total", reason="error", **key) == 1)
    s = scrape(metrics.server)
    assert value(s, "stem_tasks_retried_total", **key) == 3
    assert value(s, "stem_tasks_succeeded_total", **key) == 1
    assert value(s, "stem_tasks_received_total", **key) == 5
    assert value(s, "stem_task_runtime_seconds_count", **key) == 5      # every attempt


def test_revoked_dead_lettered_and_recycled_counts(metrics, stack):
    stack.registry.task("work")(lambda ctx: 1)
    revoked = stack.stem.enqueue("work")
    stack.stem.revoke(revoked)
    blind = Stem(stack.broker, stack.backend)            # no registry: can publish unknown names
    blind.enqueue("no.such.task")
    ids = [stack.stem.enqueue("work") for _ in range(12)]
    # one child: it runs all 12 and is recycled after the 5th and the 10th (with two, a
    # 4/8 split recycles only once)
    stack.worker(concurrency=1, lifecycle=lifecycle(max_tasks_per_child=5))
    for tid in ids:
        stack.stem.wait_for_task(tid, timeout=30)
    assert wait_until(lambda: value(scrape(metrics.server), "stem_tasks_succeeded_total", task="work",
                                    queue="default") == 12)
    assert wait_until(lambda: value(scrape(metrics.server), "stem_child_recycles_total", reason="max-tasks") >= 2)
    s = scrape(metrics.server)
    assert value(s, "stem_tasks_revoked_total", task="work", queue="default", reason="revoked") == 1
    assert value(s, "stem_tasks_dead_lettered_total", queue="default", reason="unknown-task") == 1


class FlakyBroker(InMemoryBroker):
    """Fails its first ``failures`` consume calls as if the connection dropped."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def consume(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise BrokerConnectionError("connection reset (test)")
        return super().consume(*args, **kwargs)


def test_broker_reconnects_are_counted(metrics, stack, caplog):
    broker = FlakyBroker(failures=2)
    stack.registry.task("work")(lambda ctx: 1)
    stem = Stem(broker, stack.backend, stack.registry)
    stack.worker(broker=broker, isolation="inline", worker_id="w-flaky")
    stem.wait_for_task(stem.enqueue("work"), timeout=30)
    s = scrape(metrics.server)
    assert value(s, "stem_broker_reconnects_total", worker="w-flaky") == 1
    assert "broker unreachable" in caplog.text


def test_worker_gauges_disappear_when_the_worker_stops(metrics, stack):
    w = stack.worker(worker_id="w-gone", isolation="inline")
    assert value(scrape(metrics.server), "stem_worker_concurrency", worker="w-gone") == 2
    w.shutdown(timeout=30)
    assert ("stem_worker_concurrency", (("worker", "w-gone"),)) not in scrape(metrics.server)


def test_install_is_idempotent_and_uninstall_disconnects_every_receiver():
    before = {sig.name: sig.receivers for sig in signals}
    m = stem_metrics.install()
    try:
        assert stem_metrics.install() is m and stem_metrics.installed() is m
        from prometheus_client import CollectorRegistry
        with pytest.raises(ConfigurationError, match="another registry"):
            stem_metrics.install(CollectorRegistry())
        assert signals.task_postrun.receivers
    finally:
        stem_metrics.uninstall()
    assert {sig.name: sig.receivers for sig in signals} == before
    assert stem_metrics.installed() is None


def test_each_install_gets_its_own_registry_unless_given_one():
    from prometheus_client import REGISTRY, CollectorRegistry
    first = stem_metrics.install()
    stem_metrics.uninstall()
    second = stem_metrics.install()
    stem_metrics.uninstall()
    assert first.registry is not second.registry and REGISTRY not in (first.registry, second.registry)
    mine = CollectorRegistry()
    assert stem_metrics.install(mine).registry is mine
    stem_metrics.uninstall()


def test_start_http_server_rejects_a_bad_port():
    with pytest.raises(ConfigurationError, match="0..65535"):
        stem_metrics.start_http_server(70000)
    stem_metrics.uninstall()


def test_without_prometheus_client_install_names_the_extra():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import stem.metrics\n"
            "from stem.errors import ConfigurationError\n"
            "try:\n    stem.metrics.install()\nexcept ConfigurationError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'stem-queue[metrics]'" in out.stdout


def test_histogram_buckets_are_cumulative_and_include_their_upper_bound(metrics):
    from stem.envelope import Envelope
    from stem.results import TaskState
    env = Envelope(id="t", name="h", queue="q", enqueued_at=time.time())
    for started, finished in ((2.0, 2.0004), (2.0, 2.0007), (2.0, 2.5), (2.0, 1002.0)):   # 2.5 - 2.0 == 0.5 exactly
        signals.task_postrun.send(None, envelope=env, status=TaskState.SUCCEEDED, started_at=started,
                                  finished_at=finished)
    s = scrape(metrics.server)
    bucket = lambda le: value(s, "stem_task_runtime_seconds_bucket", task="h", queue="q", le=le)
    assert [bucket("0.0005"), bucket("0.001"), bucket("0.5"), bucket("300.0"), bucket("+Inf")] == [1, 2, 3, 3, 4]
    assert value(s, "stem_task_runtime_seconds_count", task="h", queue="q") == 4
    assert value(s, "stem_task_runtime_seconds_sum", task="h", queue="q") == pytest.approx(1000.5011, rel=1e-6)
