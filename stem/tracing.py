"""OpenTelemetry: the trace context travels with each task; a span per publish and per attempt.

``pip install 'stem-queue[otel]'`` (the API; configure an SDK as usual), then
call :func:`install` in the producer and in the worker process (before the
worker starts: its children are forked from it).  Importing this module
imports nothing from OpenTelemetry; :func:`install` does, and
:func:`install_if_available` is a no-op when the package is absent.

What happens once installed:

- Producer: ``before_task_publish`` starts a PRODUCER span ``publish <queue>``
  (child of the current span) and injects its context into
  ``Envelope.headers`` through the global propagator (W3C ``traceparent``
  by default).  Headers are part of the signed body, so they are injected
  before the frame is encoded and signed; ``after_task_publish`` ends the span.
- Worker: a CONSUMER span ``process <queue>`` per attempt, child of the
  publish span, with ``messaging.system=stem``, ``messaging.operation=process``,
  ``messaging.destination.name``, ``messaging.message.id`` (the task id),
  ``stem.task.name``, ``stem.task.attempt`` and ``stem.task.outcome``
  (succeeded / retry / failed, with an ERROR status and the error text).

Where the worker span lives:

- Inline engine: the span starts in the task's thread and is the current span
  while the handler runs, so spans the handler creates are its children.
- Process engine: the span is created in the supervisor from the outcome's
  start and end timestamps (children stay lean: no exporter, no SDK work, and
  nothing lost when a child is killed or recycled with ``os._exit``).  Inside
  the child the producer's context (the publish span) is made current while
  the task runs, so spans the handler creates join the same trace as
  siblings of the ``process`` span, not as its children.  This needs the
  child to have been forked after :func:`install` (the default ``fork``
  start method with ``install()`` before ``Worker.start()``); spawned
  children do not get it.
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import ConfigurationError
from .signals import signals

__all__ = ["install", "uninstall", "install_if_available", "installed", "StemTracing"]

_MAX_OPEN = 10_000   # spans waiting for an end that may never come (failed publish, hard shutdown)


def _otel():
    try:
        from opentelemetry import context, propagate, trace
    except ImportError:
        raise ConfigurationError("stem.tracing needs opentelemetry-api: pip install 'stem-queue[otel]'") from None
    return context, propagate, trace


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class StemTracing:
    """The tracer and the receivers (see the module doc)."""

    def __init__(self, tracer_provider: Any = None):
        self._context, self._propagate, self._trace = _otel()
        from . import __version__
        self.tracer = self._trace.get_tracer("stem", __version__, tracer_provider=tracer_provider)
        self._kind = self._trace.SpanKind
        self._status = self._trace.Status
        self._error_code = self._trace.StatusCode.ERROR
        self._lock = threading.Lock()
        self._publishing: dict[str, Any] = {}                # task id -> publish span
        self._running: dict[tuple[str, int], Any] = {}       # (id, attempt) -> process span (inline engine)
        self._outcomes: dict[tuple[str, int], tuple[str, str | None, str | None]] = {}
        self._receivers = (
            (signals.before_task_publish, self._on_before_publish),
            (signals.after_task_publish, self._on_after_publish),
            (signals.task_prerun, self._on_prerun),
            (signals.task_retry, self._on_retry),
            (signals.task_failed, self._on_failed),
            (signals.task_postrun, self._on_postrun),
            (signals.task_revoked, self._on_revoked),
            (signals.worker_shutdown, self._on_worker_shutdown),
        )

    def connect(self) -> None:
        from .logs import add_task_hook
        for signal, receiver in self._receivers:
            signal.connect(receiver)
        add_task_hook(self._attach_parent)

    def disconnect(self) -> None:
        from .logs import remove_task_hook
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        remove_task_hook(self._attach_parent)
        self._end_all("tracing uninstalled")

    # -- producer ---------------------------------------------------------------------
    def _on_before_publish(self, sender, envelope, **kw) -> None:
        span = self.tracer.start_span(f"publish {envelope.queue}", kind=self._kind.PRODUCER, attributes={
            "messaging.system": "stem", "messaging.operation": "publish", "messaging.operation.name": "publish",
            "messaging.destination.name": envelope.queue, "messaging.message.id": envelope.id,
            "stem.task.name": envelope.name})
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        if carrier:
            # a new dict: the caller's headers dict may be reused for other tasks
            envelope.headers = {**envelope.headers, **carrier}
        with self._lock:
            self._remember(self._publishing, envelope.id, span)

    def _on_after_publish(self, sender, envelope, **kw) -> None:
        with self._lock:
            span = self._publishing.pop(envelope.id, None)
        if span is not None:
            span.end()

    # -- worker -----------------------------------------------------------------------
    def _parent(self, envelope) -> Any:
        return self._propagate.extract(envelope.headers) if envelope.headers else None

    def _attach_parent(self, envelope) -> None:
        """Task hook, inside the task's own context: the producer's span is current
        (the context is a copy, discarded when the task returns)."""
        if envelope.headers:
            self._context.attach(self._propagate.extract(envelope.headers))

    def _start(self, envelope, start_time: int | None = None) -> Any:
        return self.tracer.start_span(f"process {envelope.queue}", context=self._parent(envelope),
                                      kind=self._kind.CONSUMER, start_time=start_time, attributes={
            "messaging.system": "stem", "messaging.operation": "process", "messaging.operation.name": "process",
            "messaging.destination.name": envelope.queue, "messaging.message.id": envelope.id,
            "stem.task.name": envelope.name, "stem.task.attempt": envelope.attempt})

    def _on_prerun(self, sender, envelope, context=None, **kw) -> None:
        if context is None:
            return  # process engine: the supervisor builds the span from the outcome
        span = self._start(envelope)
        self._context.attach(self._trace.set_span_in_context(span))  # the task's context copy: no detach
        with self._lock:
            self._remember(self._running, (envelope.id, envelope.attempt), span)

    def _on_retry(self, sender, envelope, error=None, **kw) -> None:
        with self._lock:
            self._remember(self._outcomes, (envelope.id, envelope.attempt), ("retry", error, "retry"))

    def _on_failed(self, sender, envelope, error=None, reason=None, **kw) -> None:
        with self._lock:
            self._remember(self._outcomes, (envelope.id, envelope.attempt), ("failed", error, reason))

    def _on_postrun(self, sender, envelope, started_at=None, finished_at=None, **kw) -> None:
        key = (envelope.id, envelope.attempt)
        with self._lock:
            span = self._running.pop(key, None)
            outcome = self._outcomes.pop(key, None)
        if span is None:
            span = self._start(envelope, _ns(started_at) if started_at else None)
        self._finish(span, outcome, _ns(finished_at) if finished_at else None)

    def _on_revoked(self, sender, envelope, reason=None, **kw) -> None:
        """Revoked while running (terminate): no postrun follows."""
        key = (envelope.id, envelope.attempt)
        with self._lock:
            span = self._running.pop(key, None)
            self._outcomes.pop(key, None)
        if span is not None:
            self._finish(span, ("revoked", reason, reason), None)

    def _on_worker_shutdown(self, sender, **kw) -> None:
        self._end_all("worker shut down before the task settled")

    def _finish(self, span, outcome, end_time: int | None) -> None:
        if outcome is None:
            span.set_attribute("stem.task.outcome", "succeeded")
        else:
            kind, error, reason = outcome
            span.set_attribute("stem.task.outcome", kind)
            if reason:
                span.set_attribute("stem.task.reason", reason)
            span.set_status(self._status(self._error_code, error or kind))
        span.end(end_time=end_time)

    def _remember(self, table: dict, key, value) -> None:
        """Add with the lock held; past _MAX_OPEN the oldest entry goes (its span ended)."""
        table[key] = value
        if len(table) > _MAX_OPEN:
            old = table.pop(next(iter(table)))
            if hasattr(old, "end"):
                old.end()

    def _end_all(self, why: str) -> None:
        with self._lock:
            spans = list(self._running.values()) + list(self._publishing.values())
            self._running.clear()
            self._publishing.clear()
            self._outcomes.clear()
        for span in spans:
            span.set_status(self._status(self._error_code, why))
            span.end()


_lock = threading.Lock()
_installed: StemTracing | None = None


def install(tracer_provider: Any = None) -> StemTracing:
    """Propagate trace context through the envelopes and open spans (see the module doc).

    ``tracer_provider`` defaults to the global one.  Installing again returns
    the installed instance; ConfigurationError when opentelemetry-api is missing.
    """
    global _installed
    with _lock:
        if _installed is None:
            tracing = StemTracing(tracer_provider)
            tracing.connect()
            _installed = tracing
        return _installed


def install_if_available(tracer_provider: Any = None) -> bool:
    """``install()`` when opentelemetry-api is importable; False (and nothing imported) otherwise."""
    try:
        install(tracer_provider)
    except ConfigurationError:
        return False
    return True


def uninstall() -> None:
    """Disconnect the receivers and end spans still open."""
    global _installed
    with _lock:
        if _installed is not None:
            _installed.disconnect()
            _installed = None


def installed() -> StemTracing | None:
    return _installed
