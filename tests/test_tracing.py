"""stem.tracing: trace context in the envelope headers, publish and process spans on both engines."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from stem import PayloadSigner, Stem, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig, signals
from stem import logs as stem_logs
from stem import tracing as stem_tracing
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.retry import FixedRetryStrategy

NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


def wait_until(predicate, timeout=20.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def hex_ids(span_context) -> list[str]:
    return [format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")]


@pytest.fixture(params=["inline", "process"])
def isolation(request):
    return request.param


@pytest.fixture
def otel():
    """An SDK provider with an in-memory exporter (not the global provider), stem.tracing installed on it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stem_tracing.install(provider)

    class O:
        pass

    o = O()
    o.exporter, o.tracer = exporter, provider.get_tracer("tests")
    o.spans = lambda name=None: [s for s in exporter.get_finished_spans() if name is None or s.name == name]
    yield o
    stem_tracing.uninstall()
    provider.shutdown()


@pytest.fixture
def stack(isolation, otel):
    registry = TaskRegistry()
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    signer = PayloadSigner({"k1": b"s" * 32})   # headers are part of the signed body
    workers = []

    class S:
        pass

    s = S()
    s.registry, s.isolation, s.signer = registry, isolation, signer
    s.stem = Stem(broker, backend, registry, signer)

    def worker(**kw):
        w = Worker(broker, backend, registry, concurrency=2, isolation=isolation, lifecycle=NO_SIGNALS,
                   retry_strategy=FixedRetryStrategy(0.0), signer=signer, **kw)
        workers.append(w)
        return w.run_in_background()

    s.worker = worker
    yield s
    for w in workers:
        w.shutdown(timeout=30)


def current_ids(ctx):
    """A task body: the span current inside the task (thread or child process)."""
    return hex_ids(trace.get_current_span().get_span_context())


def test_a_span_created_in_the_producer_is_the_parent_of_the_workers_task_span(stack, otel):
    stack.registry.task("traced")(current_ids)
    stack.worker()
    with otel.tracer.start_as_current_span("http request") as request:
        tid = stack.stem.enqueue("traced")
    inside = stack.stem.wait_for_task(tid, timeout=30).result
    assert wait_until(lambda: otel.spans("process default"))
    (publish,) = otel.spans("publish default")
    (process,) = otel.spans("process default")
    trace_id = request.get_span_context().trace_id
    assert publish.parent.span_id == request.get_span_context().span_id
    assert process.parent.span_id == publish.context.span_id
    assert publish.context.trace_id == process.context.trace_id == trace_id
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    for span, operation in ((publish, "publish"), (process, "process")):
        attrs = dict(span.attributes)
        assert attrs["messaging.system"] == "stem"
        assert attrs["messaging.operation"] == operation
        assert attrs["messaging.destination.name"] == "default"
        assert attrs["messaging.message.id"] == tid
        assert attrs["stem.task.name"] == "traced"
    assert dict(process.attributes)["stem.task.outcome"] == "succeeded"
    assert process.status.status_code is StatusCode.UNSET
    assert process.start_time <= process.end_time
    assert publish.start_time <= process.start_time
    # inside the task: same trace; the current span is the process span (inline)
    # or the producer's publish span (process engine: the process span lives in the supervisor)
    assert inside[0] == format(trace_id, "032x")
    expected_parent = process if stack.isolation == "inline" else publish
    assert inside[1] == format(expected_parent.context.span_id, "016x")


def test_spans_a_task_creates_join_the_trace(stack, otel):
    @stack.registry.task("nested")
    def nested(ctx):
        # the provider is not global: a user tracer from the same provider, inherited by the child
        with stem_tracing.installed().tracer.start_as_current_span("user work") as span:
            return hex_ids(span.get_span_context()) + [format(span.parent.span_id, "016x")]

    stack.worker()
    with otel.tracer.start_as_current_span("request") as request:
        tid = stack.stem.enqueue("nested")
    trace_id, _, parent = stack.stem.wait_for_task(tid, timeout=30).result
    assert wait_until(lambda: otel.spans("process default"))
    assert trace_id == format(request.get_span_context().trace_id, "032x")
    (process,) = otel.spans("process default")
    (publish,) = otel.spans("publish default")
    if stack.isolation == "inline":
        assert parent == format(process.context.span_id, "016x")
        assert [s.parent.span_id for s in otel.spans("user work")] == [process.context.span_id]
    else:  # recorded in the child's copy of the provider; parented to the publish span
        assert parent == format(publish.context.span_id, "016x")


def test_retried_and_failed_attempts_get_error_spans(stack, otel):
    @stack.registry.task("fails", options=TaskOptions(max_retries=1))
    def fails(ctx):
        raise ValueError(f"bad attempt {ctx.attempt}")

    stack.worker()
    tid = stack.stem.enqueue("fails")
    assert stack.stem.wait_for_task(tid, timeout=30).reason == "error"
    assert wait_until(lambda: len(otel.spans("process default")) == 2)
    spans = sorted(otel.spans("process default"), key=lambda s: s.attributes["stem.task.attempt"])
    assert [s.attributes["stem.task.outcome"] for s in spans] == ["retry", "failed"]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert spans[1].status.description == "bad attempt 1"
    (publish,) = otel.spans("publish default")
    assert {s.parent.span_id for s in spans} == {publish.context.span_id}


def test_the_trace_context_travels_in_signed_headers_without_touching_the_callers_dict(stack, otel):
    seen = []
    receiver = signals.task_received.connect(lambda s, envelope, **kw: seen.append(dict(envelope.headers)))
    try:
        stack.registry.task("h")(lambda ctx: dict(ctx.headers))
        stack.worker()
        mine = {"tenant": "acme"}
        with otel.tracer.start_as_current_span("request"):
            tid = stack.stem.enqueue("h", headers=mine)
        headers = stack.stem.wait_for_task(tid, timeout=30).result
    finally:
        signals.task_received.disconnect(receiver)
    assert mine == {"tenant": "acme"}
    assert headers["tenant"] == "acme" and headers["traceparent"].startswith("00-")
    assert seen == [headers]      # verified by the worker's signer, then decoded


def test_without_a_current_span_the_publish_span_starts_a_trace(stack, otel):
    stack.registry.task("root")(lambda ctx: 1)
    stack.worker()
    stack.stem.wait_for_task(stack.stem.enqueue("root"), timeout=30)
    assert wait_until(lambda: otel.spans("process default"))
    (publish,) = otel.spans("publish default")
    (process,) = otel.spans("process default")
    assert publish.parent is None and process.parent.span_id == publish.context.span_id


def test_install_is_idempotent_and_uninstall_removes_receivers_and_hook(otel):
    tracing = stem_tracing.installed()
    assert stem_tracing.install() is tracing
    hooks = stem_logs.task_hooks()
    assert len(hooks) == 1 and getattr(hooks[0], "__self__", None) is tracing
    stem_tracing.uninstall()
    assert stem_tracing.installed() is None
    assert stem_logs.task_hooks() == ()
    assert all(r.__self__ is not tracing for sig in signals for r in sig.receivers if hasattr(r, "__self__"))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_nothing_from_opentelemetry_or_prometheus_is_imported_when_not_installed():
    out = _run("""
        import sys
        from stem import Stem, TaskRegistry, Worker, WorkerLifecycleConfig
        from stem.brokers import InMemoryBroker
        from stem.backends import InMemoryResultBackend
        import stem.logs, stem.metrics, stem.tracing, stem.status
        r = TaskRegistry()
        r.task("t")(lambda ctx: 1)
        b, be = InMemoryBroker(), InMemoryResultBackend()
        s = Stem(b, be, r)
        w = Worker(b, be, r, concurrency=1, isolation="inline",
                   lifecycle=WorkerLifecycleConfig(install_signal_handlers=False)).run_in_background()
        assert s.wait_for_task(s.enqueue("t"), timeout=20).result == 1
        w.shutdown(timeout=20)
        print(sorted(m for m in sys.modules if m.startswith(("opentelemetry", "prometheus_client"))))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_opentelemetry_install_names_the_extra_and_install_if_available_is_a_no_op():
    out = _run("""
        import sys
        sys.modules["opentelemetry"] = None
        import stem.tracing
        from stem.errors import ConfigurationError
        print(stem.tracing.install_if_available())
        try:
            stem.tracing.install()
        except ConfigurationError as e:
            print(e)
    """)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "False" and "pip install 'stem-queue[otel]'" in second
