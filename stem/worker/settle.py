"""Settling: turning each outcome into durable state, in the order at-least-once needs.

Results are stored before the delivery is acked (in one round trip where
broker and backend share a store); a retry (new frame with attempt + 1 and
``not_before``) and its ack are one broker call, and so is dead-lettering.
Failures of the store or the broker are retried with backoff, so a settled
task is never forgotten while the process lives; if the process dies in
between, the delivery comes back after its lease (a duplicate, never a loss).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..brokers import Delivery
from ..envelope import with_delivery
from ..errors import StemError
from ..logs import task_extra
from ..results import TaskState, TaskStatus
from ..retry import ExponentialJitterRetryStrategy
from ..signals import signals
from .engine import Job
from .execution import OK, Outcome
from .lifecycle import ShutdownMode

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["Settler"]

log = logging.getLogger("stem.worker")

task_log = logging.getLogger("stem.task")

#: Dead-letter reasons of a task that never ran to an outcome of its own: it ends DEAD.
DEAD_REASONS = frozenset({"poison", "decode-error", "unknown-task", "signature-invalid", "max-deliveries"})
#: Failures that another attempt cannot fix.
NOT_RETRYABLE = DEAD_REASONS | {"result-not-encodable", "bad-arguments"}
#: ``retry_backoff_max`` when a handler gives only ``retry_backoff``.
DEFAULT_BACKOFF_MAX = 600.0


def _label(env) -> str:
    return f"{env.name}[{env.id}]"


class Settler:
    def __init__(self, worker: "Worker"):
        self.w = worker

    def dead_unrun(self, d: Delivery, reason: str, error: str, env=None) -> None:
        task_log.error("task %s dead-lettered without running: %s (%s)",
                       _label(env) if env is not None else d.task_id, reason, error,
                       extra=task_extra(env) if env is not None else None)
        if self.w.store_results:
            self.store([TaskStatus(id=d.task_id, state=TaskState.DEAD, name=env.name if env else "",
                                   queue=d.queue, attempt=env.attempt if env else 0, error=error, reason=reason,
                                   finished_at=time.time(), worker=self.w.id)])
        self.broker_call(self.w.broker.dead_letter, d, reason)
        self.w._counters["dead_lettered"] += 1
        if signals.task_dead_lettered.receivers:
            signals.task_dead_lettered.send(self.w, task_id=d.task_id, queue=d.queue, reason=reason)

    def finish_unrun(self, d: Delivery, env, state: TaskState, reason: str) -> None:
        task_log.info("task %s %s without running (%s)", _label(env), state.value, reason, extra=task_extra(env))
        if self.w.store_results:
            self.store([TaskStatus(id=env.id, state=state, name=env.name, queue=env.queue, attempt=env.attempt,
                                   reason=reason, meta=env.meta, finished_at=time.time(), worker=self.w.id)])
        self.broker_call(self.w.broker.ack, [d])
        self.w._counters["revoked"] += 1
        if signals.task_revoked.receivers:
            signals.task_revoked.send(self.w, envelope=env, reason=reason)

    # -- settling ---------------------------------------------------------------------
    def settle(self, batch: list[tuple[Job, Outcome]]) -> None:
        w = self.w
        w._observe_run_times(batch)
        now = time.time()
        statuses: list[TaskStatus] = []
        acks: list[Job] = []
        later: list[tuple[Job, Outcome]] = []
        store = w.store_results
        worker_id = w.id
        succeeded = TaskState.SUCCEEDED
        for job, out in batch:
            if job.settled:
                continue
            if out.kind == OK:
                if store:
                    env = job.envelope
                    statuses.append(TaskStatus(id=env.id, state=succeeded, name=env.name, queue=env.queue,
                                               attempt=env.attempt, result=out.result, meta=env.meta,
                                               started_at=out.started_at, finished_at=out.finished_at,
                                               updated_at=now, worker=worker_id))
                acks.append(job)
            else:
                later.append((job, out))
        w._counters["succeeded"] += len(acks)
        deliveries = [j.delivery for j in acks]
        combined = bool(statuses) and w._combined_settle
        # a refill can ride along when the results go in the same round trip, or there are none
        can_refill = bool(acks) and (combined or not statuses)
        if not (can_refill and self.settle_and_refill(statuses, acks, deliveries)):
            if not (combined and self.store_and_ack(statuses, deliveries)):
                if statuses:
                    self.store(statuses)
                if deliveries:
                    self.broker_call(w.broker.ack, deliveries)
            if acks:
                w._forget(acks)
        if acks:
            if task_log.isEnabledFor(logging.INFO):
                outs = {id(j): o for j, o in batch}
                for j in acks:
                    o = outs[id(j)]
                    task_log.info("task %s succeeded in %.3fs", _label(j.envelope), o.finished_at - o.started_at,
                                  extra=task_extra(j.envelope))
            if signals.task_succeeded.receivers or signals.task_postrun.receivers:
                outs = {id(j): o for j, o in batch}
                for j in acks:
                    o = outs[id(j)]
                    signals.task_succeeded.send(self.w, envelope=j.envelope, result=o.result,
                                                runtime=o.finished_at - o.started_at)
                    signals.task_postrun.send(self.w, envelope=j.envelope, status=TaskState.SUCCEEDED,
                                              started_at=o.started_at, finished_at=o.finished_at)
        for job, out in later:
            self.failure(job, out)
        w._counters["processed"] += len(acks) + len(later)

    def failure(self, job: Job, out: Outcome) -> None:
        env = job.envelope
        reason = out.reason or "error"
        w = self.w
        if reason == "revoked":  # revoke --terminate stopped it
            task_log.warning("task %s revoked while running (terminated)", _label(env), extra=task_extra(env))
            if w.store_results:
                self.store([TaskStatus(id=env.id, state=TaskState.REVOKED, name=env.name, queue=env.queue,
                                       attempt=env.attempt, reason="revoked", error=out.error, meta=env.meta,
                                       started_at=out.started_at, finished_at=out.finished_at, worker=w.id)])
            self.broker_call(w.broker.ack, [job.delivery])
            w._counters["revoked"] += 1
            if signals.task_revoked.receivers:
                signals.task_revoked.send(w, envelope=env, reason="revoked")
            w._forget([job])
            return
        if reason in ("shutdown", "child-crashed"):
            # Asked to stop by a soft shutdown, or its process was killed from outside (the OOM
            # killer, kill -9): not the task's own failure.  Give it back without counting an
            # attempt; the delivery count (broker) and the pool's crash count still make a task
            # that keeps killing its child poison (dead-lettered, never retried forever).
            if reason == "child-crashed":
                task_log.warning("task %s: %s; redelivering it (not counted against max_retries)",
                                 _label(env), out.error, extra=task_extra(env))
            self.broker_call(w.broker.nack, job.delivery, requeue=True)
            w._forget([job])
            return
        retryable = out.retryable and reason not in NOT_RETRYABLE
        if retryable and env.attempt < env.max_retries:
            delay = out.countdown if out.countdown is not None else self.retry_delay(job)
            not_before = time.time() + max(0.0, delay)
            frame = with_delivery(job.delivery.frame, attempt=env.attempt + 1, not_before=not_before)
            task_log.warning("task %s failed (%s: %s); retry %d of %d in %.2fs", _label(env), out.error_type,
                             out.error, env.attempt + 1, env.max_retries, delay, extra=task_extra(env))
            if w.store_results:
                self.store([TaskStatus(id=env.id, state=TaskState.RETRYING, name=env.name, queue=env.queue,
                                       attempt=env.attempt, error=out.error, error_type=out.error_type,
                                       reason=out.reason, traceback=out.traceback, meta=env.meta,
                                       started_at=out.started_at, finished_at=out.finished_at, worker=w.id)])
            self.broker_call(w.broker.retry, job.delivery, frame, not_before)
            w._counters["retried"] += 1
            if signals.task_retry.receivers:
                signals.task_retry.send(w, envelope=env, error=out.error, delay=delay)
        else:
            dead = reason in DEAD_REASONS
            state = TaskState.DEAD if dead else TaskState.FAILED
            task_log.error("task %s %s (%s): %s: %s%s", _label(env), "dead-lettered" if dead else "failed", reason,
                           out.error_type, out.error, "\n" + out.traceback.rstrip() if out.traceback else "",
                           extra=task_extra(env))
            if w.store_results:
                self.store([TaskStatus(id=env.id, state=state, name=env.name, queue=env.queue,
                                       attempt=env.attempt, error=out.error, error_type=out.error_type,
                                       reason=reason, traceback=out.traceback, meta=env.meta,
                                       started_at=out.started_at, finished_at=out.finished_at, worker=w.id)])
            self.broker_call(w.broker.dead_letter, job.delivery, reason)
            w._counters["dead_lettered" if dead else "failed"] += 1
            if dead:
                if signals.task_dead_lettered.receivers:
                    signals.task_dead_lettered.send(w, task_id=env.id, queue=env.queue, reason=reason)
            elif signals.task_failed.receivers:
                signals.task_failed.send(w, envelope=env, error=out.error, reason=reason)
        if signals.task_postrun.receivers:
            signals.task_postrun.send(w, envelope=env, status=TaskState.FAILED, started_at=out.started_at,
                                      finished_at=out.finished_at)
        w._forget([job])

    def retry_delay(self, job: Job) -> float:
        """Seconds before the next attempt: the handler's own backoff, else the worker's strategy."""
        options = job.handler.options
        attempt = job.envelope.attempt
        if options.retry_backoff is not None:
            cap = options.retry_backoff_max if options.retry_backoff_max is not None else DEFAULT_BACKOFF_MAX
            return ExponentialJitterRetryStrategy(options.retry_backoff, max(cap, options.retry_backoff)).next_delay(
                attempt)
        return self.w.retry_strategy.next_delay(attempt)

    def settle_and_refill(self, statuses: list[TaskStatus], acks: list[Job], deliveries: list[Delivery]) -> bool:
        """When the fetcher waits for the room these acks free: store (when there are
        results), ack and lease the refill in one round trip (results before acks) and
        take the new deliveries in here (``Fetcher.claim_refill``).  Tried once: False
        when not done, and the caller then settles the usual way, retrying until it is
        durable."""
        claim = self.w._fetcher.claim_refill(acks)
        if claim is None:
            return False
        queues, count = claim
        leased = None
        try:
            if statuses:
                leased = self.w.backend.store_many_ack_and_consume(statuses, self.w.broker, deliveries, queues,
                                                                   count, self.w.id)
            else:
                leased = self.w.broker.ack_and_consume(deliveries, queues, count, consumer=self.w.id)
            if leased is None:
                self.w._fetcher.refill_on_settle = False   # not this backend or broker: never asked again
        except StemError as exc:
            log.warning("settling %d outcomes with a refill failed (%s); settling without the refill",
                        len(acks), exc)
        finally:
            self.w._fetcher.end_refill(acks, leased)
        return leased is not None

    def store_and_ack(self, statuses: list[TaskStatus], deliveries: list[Delivery]) -> bool:
        """One round trip for results and acks where broker and backend share a store;
        False when they do not (then never asked again)."""
        done = self.retrying(lambda: self.w.backend.store_many_and_ack(statuses, self.w.broker, deliveries),
                             f"storing {len(statuses)} results with their acks")
        if done is False:
            self.w._combined_settle = False
            return False
        return True

    def store(self, statuses: list[TaskStatus]) -> None:
        """Results must be durable before the ack: retried until stored (or a hard shutdown)."""
        self.retrying(lambda: self.w.backend.store_many(statuses), f"storing {len(statuses)} results")

    def broker_call(self, fn, *args, **kwargs) -> None:
        self.retrying(lambda: fn(*args, **kwargs), f"broker {getattr(fn, '__name__', fn)}")

    def retrying(self, fn, what: str):
        """Run ``fn`` until it succeeds, backing off; one error line per outage and one when it
        recovers.  Under a hard shutdown it gives up (returns None): the delivery then comes
        back after its lease, a duplicate at worst."""
        delay = 0.05
        failures = 0
        while True:
            try:
                result = fn()
            except StemError as exc:
                failures += 1
                if failures == 1:
                    log.error("%s failed (%s); retrying with backoff", what, exc)
                else:
                    log.debug("%s failed again (%s)", what, exc)
                if self.w._stop_mode is ShutdownMode.HARD:
                    log.error("giving up on %s: hard shutdown; the delivery comes back after its lease", what)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                if failures:
                    log.warning("%s succeeded after %d failed attempts", what, failures)
                return result
