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
from typing import Any, Callable

from ..brokers import Broker, Delivery
from ..canvas import next_step_id
from ..envelope import decode_frame, with_delivery
from ..errors import ConfigurationError, StemError
from ..logs import task_extra
from ..redact import shown_args
from ..results import Reason, TaskState, TaskStatus
from ..retry import ExponentialJitterRetryStrategy, RetryStrategy
from ..signals import signals
from ..workflows.wake import RUN_HEADER
from .engine import Job
from .execution import OK, Outcome, check_result_options
from .lifecycle import ShutdownMode
from .progress import StatusBoard
from .state import WorkerState

__all__ = ["Settler", "DEAD_REASONS", "NOT_RETRYABLE", "retry_delay"]

log = logging.getLogger("stem.worker")
task_log = logging.getLogger("stem.task")

#: Dead-letter reasons of a task that never ran to an outcome of its own: it ends DEAD.
DEAD_REASONS = frozenset({Reason.POISON, Reason.DECODE_ERROR, Reason.UNKNOWN_TASK, Reason.SIGNATURE_INVALID,
                          Reason.MAX_DELIVERIES})
#: Failures that another attempt cannot fix.
NOT_RETRYABLE = DEAD_REASONS | {Reason.RESULT_NOT_ENCODABLE, Reason.BAD_ARGUMENTS}
#: ``retry_backoff_max`` when a handler gives only ``retry_backoff``.
DEFAULT_BACKOFF_MAX = 600.0


def retry_delay(options: Any, attempt: int, fallback: RetryStrategy) -> float:
    """Seconds before attempt ``attempt + 1``: the handler's own backoff (``retry_backoff``,
    ``retry_backoff_max``), else the worker's strategy."""
    if options.retry_backoff is not None:
        cap = options.retry_backoff_max if options.retry_backoff_max is not None else DEFAULT_BACKOFF_MAX
        return ExponentialJitterRetryStrategy(options.retry_backoff, max(cap, options.retry_backoff)).next_delay(
            attempt)
    return fallback.next_delay(attempt)


def _unverified(frame: bytes) -> Any:
    """The envelope in a frame whose signature or body failed the checks, or None."""
    try:
        return decode_frame(frame, None)
    except Exception:  # noqa: BLE001 - best effort
        return None


def _label(env) -> str:
    return f"{env.name}[{env.id}]"


def _with_next_step(job: Job) -> list[str] | None:
    """A canvas task's children on success: what it enqueued, and the chain step its
    success starts (``stem.canvas.next_step_id``)."""
    step = next_step_id(job.envelope.canvas)
    if step is None:
        return job.children
    return [*(job.children or ()), step]


class Settler:
    """Stores outcomes and settles deliveries (the settle thread, or the main loop without one)."""

    def __init__(self, *, state: WorkerState, broker: Broker, backend: Any, worker_id: str, store_results: bool,
                 retry_strategy: RetryStrategy, board: StatusBoard | None,
                 take_in: Callable[[list[Delivery], set[str], list[Job]], None], sender: Any = None,
                 canvas: Callable[[], Any] | None = None, workflows: Callable[[], Any] | None = None,
                 registry: Any = None):
        self.state = state
        self.broker = broker
        self.backend = backend
        self.worker_id = worker_id
        self.store_results = store_results
        self.retry_strategy = retry_strategy
        self.board = board
        self.take_in = take_in          # leased deliveries of a refill -> the fetcher (see settle_and_refill)
        self.sender = sender            # what signals are sent from (the Worker)
        self.combined = store_results   # store and ack in one round trip, until the store says it cannot
        self.canvas = canvas            # -> the stem.canvas.Runner carrying canvases on (None: no backend)
        self.workflows = workflows      # -> the stem.workflows.wake.CallNotifier (None: no backend)
        self.registry = registry        # the handlers' redact options, for tasks that end without a Job

    def workflow_tasks_ended(self, envs: list[Any]) -> None:
        """Tasks run by a workflow's ``ctx.call`` (their ``RUN_HEADER``) ended and their statuses
        are stored: ring their runs' doorbells.  Best effort: the workflows' sweeper finds the
        ended tasks of parked runs in the backend if this process dies first."""
        if self.workflows is None:
            return
        called = [env for env in envs if env is not None and env.headers and RUN_HEADER in env.headers]
        if called:
            try:
                self.workflows().finished(called)
            except Exception:  # noqa: BLE001 - a bug here must not stop the settle thread
                log.exception("could not tell %d workflow runs that their tasks ended", len(called))

    def shown_args(self, env: Any, d: Delivery) -> dict[str, Any] | None:
        """The shown arguments (``Job.shown_args``) of a task that ends without running: its
        handler's ``redact`` when this worker has the handler, else the default rule."""
        handler = None
        if self.registry is not None and env.name in self.registry:
            handler = self.registry.get(env.name)
        return shown_args(env.args, None if handler is None else handler.options.redact, size_hint=len(d.frame))

    def canvas_finished(self, env: Any, status: TaskStatus) -> None:
        """A task of a canvas reached ``status``: record it in its group (or start the next
        chain step) before its delivery is acked, retried like a store.  Every call is
        idempotent, so a crash before the ack only repeats it on the redelivery."""
        if self.canvas is None or not env.canvas:
            return
        def carry_on() -> None:
            try:
                self.canvas().finished(env, status)
            except ConfigurationError as exc:   # not an outage: retrying cannot help
                log.error("cannot carry the canvas of task %s on: %s", env.id, exc)

        try:
            self.retrying(carry_on, f"carrying the canvas of task {env.id} on")
        except Exception:  # noqa: BLE001 - a bug here must not stop the settle thread
            log.exception("carrying the canvas of task %s on failed", env.id)

    def forget(self, jobs: list[Job], *, wake: bool = True) -> None:
        """These jobs are settled: their running notes and their place in the window go."""
        if self.board is not None:
            self.board.forget([j.envelope.id for j in jobs])
        self.state.forget(jobs, wake=wake)

    def dead_unrun(self, d: Delivery, reason: str, error: str, env=None) -> None:
        """Dead-letter a delivery that never ran (a DEAD status first)."""
        reason = str(reason)   # a plain str for the stores (a Reason is one, by value)
        task_log.error("task %s dead-lettered without running: %s (%s)",
                       _label(env) if env is not None else d.task_id, reason, error,
                       extra=task_extra(env) if env is not None else None)
        if env is not None:
            check_result_options(env)   # a lifetime the backend would refuse falls back to its default
        if env is not None:
            status = TaskStatus.of(env, TaskState.DEAD, error=error, reason=reason, finished_at=time.time(),
                                   worker=self.worker_id, args=self.shown_args(env, d))
            status.queue = d.queue
        else:
            status = TaskStatus(id=d.task_id, state=TaskState.DEAD, queue=d.queue, error=error, reason=reason,
                                finished_at=time.time(), worker=self.worker_id)
        if self.store_results:
            self.store([status])
        if self.canvas is not None:
            # a frame that failed its check still counts DEAD in its group, or the group would
            # wait forever; read unverified for that alone (it can only fail a group, never
            # make it succeed)
            member = env if env is not None else _unverified(d.frame)
            if member is not None and member.id == d.task_id:
                self.canvas_finished(member, status)
        self.broker_call(self.broker.dead_letter, d, reason)
        if env is not None:
            self.workflow_tasks_ended([env])
        self.state.count("dead_lettered")
        if signals.task_dead_lettered.receivers:
            signals.task_dead_lettered.send(self.sender, task_id=d.task_id, queue=d.queue, reason=reason)

    def finish_unrun(self, d: Delivery, env, state: TaskState, reason: str) -> None:
        """End a delivery that will not run (revoked, expired) in ``state``."""
        reason = str(reason)
        task_log.info("task %s %s without running (%s)", _label(env), state.value, reason, extra=task_extra(env))
        status = TaskStatus.of(env, state, reason=reason, finished_at=time.time(), worker=self.worker_id,
                               args=self.shown_args(env, d))
        if self.store_results:
            self.store([status])
        if env.canvas:
            self.canvas_finished(env, status)
        self.broker_call(self.broker.ack, [d])
        self.workflow_tasks_ended([env])
        self.state.count("revoked")
        if signals.task_revoked.receivers:
            signals.task_revoked.send(self.sender, envelope=env, reason=reason)

    # -- settling ---------------------------------------------------------------------
    def settle(self, batch: list[tuple[Job, Outcome]]) -> None:
        state = self.state
        state.observe_run_times(batch)
        now = time.time()
        statuses: list[TaskStatus] = []
        acks: list[Job] = []
        later: list[tuple[Job, Outcome]] = []
        store = self.store_results
        worker_id = self.worker_id
        succeeded_with = TaskStatus.succeeded_with
        in_canvas: list[tuple[Job, Outcome]] = []
        for job, out in batch:
            if job.settled:
                continue
            if out.kind == OK:
                if job.envelope.canvas is not None:
                    in_canvas.append((job, out))
                    continue
                if store and not job.envelope.ignore_result:
                    statuses.append(succeeded_with(job.envelope, out.result, out.started_at, out.finished_at, now,
                                                   worker_id, job.shown_args(), job.children))
                acks.append(job)
            else:
                later.append((job, out))
        if acks:   # counted before the results are stored: whoever sees a result sees it counted
            state.count("succeeded", len(acks))
        deliveries = [j.delivery for j in acks]
        combined = bool(statuses) and self.combined
        # a refill can ride along when the results go in the same round trip, or there are none
        can_refill = bool(acks) and (combined or not statuses)
        if not (can_refill and self.settle_and_refill(statuses, acks, deliveries)):
            if not (combined and self.store_and_ack(statuses, deliveries)):
                if statuses:
                    self.store(statuses)
                if deliveries:
                    self.broker_call(self.broker.ack, deliveries)
            if acks:
                self.forget(acks)
        if acks:
            self._announce_successes(batch, acks)
            if self.workflows is not None:
                called = [j.envelope for j in acks if j.envelope.headers and RUN_HEADER in j.envelope.headers]
                if called:
                    self.workflow_tasks_ended(called)
        if in_canvas:
            self.canvas_successes(in_canvas, now)
        for job, out in later:
            self.failure(job, out)
        state.count("processed", len(acks) + len(later) + len(in_canvas))

    def canvas_successes(self, done: list[tuple[Job, Outcome]], now: float) -> None:
        """The successes of canvas tasks in a batch: stored, carried on (recorded in their
        groups: one round trip for the batch; next chain steps started), then acked."""
        succeeded_with, worker_id = TaskStatus.succeeded_with, self.worker_id
        ended = [(job.envelope, succeeded_with(job.envelope, out.result, out.started_at, out.finished_at, now,
                                               worker_id, job.shown_args(), _with_next_step(job)))
                 for job, out in done]
        jobs = [job for job, _ in done]
        self.state.count("succeeded", len(jobs))
        statuses = [status for env, status in ended if not env.ignore_result] if self.store_results else []
        if self.canvas is not None and self.record_and_ack(ended, statuses, jobs):
            self._announce_successes(done, jobs)
            return
        if self.canvas is None:
            if statuses:
                self.store(statuses)
        else:
            def carry_on() -> None:
                try:
                    self.canvas().finished_many(ended, statuses)
                except ConfigurationError as exc:   # not an outage: retrying cannot help
                    log.error("cannot carry %d canvas tasks on: %s", len(ended), exc)
                    if statuses:
                        self.store(statuses)

            try:
                self.retrying(carry_on, f"storing {len(ended)} results of canvas tasks and carrying them on")
            except Exception:  # noqa: BLE001 - a bug here must not stop the settle thread
                log.exception("carrying the canvas of %d tasks on failed", len(ended))
                if statuses:
                    self.store(statuses)
        deliveries = [job.delivery for job in jobs]
        # the acks (and the refill the fetcher waits for) in one round trip where the broker can
        if not self.settle_and_refill([], jobs, deliveries):
            self.broker_call(self.broker.ack, deliveries)
            self.forget(jobs)
        self._announce_successes(done, jobs)

    def record_and_ack(self, ended: list[tuple[Any, TaskStatus]], statuses: list[TaskStatus], jobs: list[Job]
                       ) -> bool:
        """Group members' successes: statuses, counts, acks (and the refill the fetcher waits
        for) in one round trip (``Runner.record_and_ack``), then the completions they caused,
        retried like a store; a completion that never runs here (the process dies, a hard
        shutdown) was noted with its count, and the sweep runs it.  Tried once: False when
        not done (not possible: a chain step or a reader in the batch, a backend that cannot),
        and the caller records, completes, then acks, as every canvas task was before."""
        runner = self.canvas()
        deliveries = [job.delivery for job in jobs]
        turn = self.state.turn
        claim = turn.settle_claim(jobs)
        queues, count = claim if claim is not None else ((), 0)
        done = None
        try:
            done = runner.record_and_ack(ended, statuses, self.broker, deliveries, queues, count, self.worker_id)
        except ConfigurationError:    # a member the backend refuses: the usual way logs it
            pass
        except StemError as exc:      # it may have run in part: every part is safe to do again
            log.warning("recording and acking %d canvas tasks in one round trip failed (%s); settling them the "
                        "usual way", len(jobs), exc)
        finally:
            if claim is not None:
                leased = None if done is None else done[1]
                turn.settle_release(None if leased is None else lambda paused: self.take_in(leased, paused, jobs))
        if done is None:
            return False
        completed, leased = done
        if claim is None or leased is None:
            self.forget(jobs)
        if completed:
            try:
                self.retrying(lambda: runner.complete(completed), f"completing {len(completed)} groups")
            except Exception:  # noqa: BLE001 - a bug here must not stop the settle thread; the sweep runs it
                log.exception("completing %d groups failed; the sweep runs them", len(completed))
        return True

    def _announce_successes(self, batch: list[tuple[Job, Outcome]], acks: list[Job]) -> None:
        """The INFO lines and the signals of a batch's successes (nothing when nobody listens)."""
        logged = task_log.isEnabledFor(logging.INFO)
        signalled = signals.task_succeeded.receivers or signals.task_postrun.receivers
        if not (logged or signalled):
            return
        outs = {id(j): o for j, o in batch}
        for j in acks:
            o = outs[id(j)]
            if logged:
                task_log.info("task %s succeeded in %.3fs", _label(j.envelope), o.finished_at - o.started_at,
                              extra=task_extra(j.envelope))
            if signalled:
                signals.task_succeeded.send(self.sender, envelope=j.envelope, result=o.result,
                                            runtime=o.finished_at - o.started_at)
                signals.task_postrun.send(self.sender, envelope=j.envelope, status=TaskState.SUCCEEDED,
                                          started_at=o.started_at, finished_at=o.finished_at)

    def failure(self, job: Job, out: Outcome) -> None:
        env = job.envelope
        reason = str(out.reason or Reason.ERROR)   # a plain str for the stores (a Reason is one, by value)
        if reason == Reason.REVOKED:  # revoke --terminate stopped it
            task_log.warning("task %s revoked while running (terminated)", _label(env), extra=task_extra(env))
            self.revoked(job, Reason.REVOKED, out, started_at=out.started_at)
            return
        if reason == Reason.EXPIRED:  # past its deadline in the backlog, or in the child before the handler
            task_log.info("task %s revoked without running (expired)", _label(env), extra=task_extra(env))
            self.revoked(job, Reason.EXPIRED)
            return
        if reason in (Reason.SHUTDOWN, Reason.CHILD_CRASHED):
            # Asked to stop by a soft shutdown, or its process was killed from outside (the OOM
            # killer, kill -9): not the task's own failure.  Give it back without counting an
            # attempt; the delivery count (broker) and the pool's crash count still make a task
            # that keeps killing its child poison (dead-lettered, never retried forever).
            if reason == Reason.CHILD_CRASHED:
                task_log.warning("task %s: %s; redelivering it (not counted against max_retries)",
                                 _label(env), out.error, extra=task_extra(env))
            self.broker_call(self.broker.nack, job.delivery, requeue=True)
            self.forget([job])
            return
        retryable = out.retryable and reason not in NOT_RETRYABLE
        not_before = None
        if retryable and env.attempt < env.max_retries:
            delay = out.countdown if out.countdown is not None else self.retry_delay(job)
            not_before = time.time() + max(0.0, delay)
        if not_before is not None and env.expires_at is not None and not_before > env.expires_at:
            # never retried past its deadline: the retry would only be revoked when it came
            task_log.warning("task %s failed (%s: %s); not retried: the retry would be due after its deadline "
                             "(expires)", _label(env), out.error_type, out.error, extra=task_extra(env))
            self.revoked(job, Reason.EXPIRED, out, started_at=out.started_at, forget=False)
            final = TaskState.REVOKED
        elif not_before is not None:
            frame = with_delivery(job.delivery.frame, attempt=env.attempt + 1, not_before=not_before)
            task_log.warning("task %s failed (%s: %s); retry %d of %d in %.2fs", _label(env), out.error_type,
                             out.error, env.attempt + 1, env.max_retries, delay, extra=task_extra(env))
            if self.store_results and not env.ignore_result:
                # a success would leave nothing behind of an ignore_result task: neither does a retry
                status = TaskStatus.of(env, TaskState.RETRYING, error=out.error, error_type=out.error_type,
                                       reason=out.reason, traceback=out.traceback, started_at=out.started_at,
                                       finished_at=out.finished_at, worker=self.worker_id,
                                       args=job.shown_args(), children=job.children)
                # kept until the retry is due, and a lifetime beyond (a countdown may pass result_expires)
                status.ttl = max(delay, 0.0) + max(status.ttl or 0.0, self.backend.result_expires)
                self.store([status])
            self.broker_call(self.broker.retry, job.delivery, frame, not_before)
            self.state.count("retried")
            if signals.task_retry.receivers:
                signals.task_retry.send(self.sender, envelope=env, error=out.error, delay=delay)
            final = TaskState.RETRYING
        else:
            dead = reason in DEAD_REASONS
            final = TaskState.DEAD if dead else TaskState.FAILED
            task_log.error("task %s %s (%s): %s: %s%s", _label(env), "dead-lettered" if dead else "failed", reason,
                           out.error_type, out.error, "\n" + out.traceback.rstrip() if out.traceback else "",
                           extra=task_extra(env))
            status = TaskStatus.of(env, final, error=out.error, error_type=out.error_type, reason=reason,
                                   traceback=out.traceback, started_at=out.started_at,
                                   finished_at=out.finished_at, worker=self.worker_id,
                                   args=job.shown_args(), children=job.children)
            if self.store_results:
                self.store([status])
            if env.canvas:
                self.canvas_finished(env, status)
            self.broker_call(self.broker.dead_letter, job.delivery, reason)
            self.workflow_tasks_ended([env])
            self.state.count("dead_lettered" if dead else "failed")
            if dead:
                if signals.task_dead_lettered.receivers:
                    signals.task_dead_lettered.send(self.sender, task_id=env.id, queue=env.queue, reason=reason)
            elif signals.task_failed.receivers:
                signals.task_failed.send(self.sender, envelope=env, error=out.error, reason=reason)
        if signals.task_postrun.receivers:
            signals.task_postrun.send(self.sender, envelope=env, status=final, started_at=out.started_at,
                                      finished_at=out.finished_at)
        self.forget([job])

    def revoked(self, job: Job, reason: str, out: Outcome | None = None, *, started_at: float | None = None,
                forget: bool = True) -> None:
        """End a job REVOKED with ``reason`` (the error of ``out``, when it ran) and ack its
        delivery, which releases its key."""
        env = job.envelope
        status = TaskStatus.of(env, TaskState.REVOKED, reason=str(reason),
                               error=out.error if out is not None else None,
                               error_type=out.error_type if out is not None else None,
                               started_at=started_at,
                               finished_at=out.finished_at if out is not None else time.time(),
                               worker=self.worker_id, args=job.shown_args(), children=job.children)
        if self.store_results:
            self.store([status])
        if env.canvas:
            self.canvas_finished(env, status)
        self.broker_call(self.broker.ack, [job.delivery])
        self.workflow_tasks_ended([env])
        self.state.count("revoked")
        if signals.task_revoked.receivers:
            signals.task_revoked.send(self.sender, envelope=env, reason=str(reason))
        if forget:
            self.forget([job])

    def release_keys(self, jobs: list[Job]) -> None:
        """Free the unique keys of tasks that started (``unique_until="started"``), owner-checked.
        Best effort: a failed release is logged and left to the terminal settle, whose ack
        releases the key anyway (still owner-checked)."""
        release = self.broker.release_key
        for job in jobs:
            if job.settled:   # ended meanwhile: its ack released the key
                continue
            d = job.delivery
            try:
                release(d.queue, d.key, d.task_id)
            except StemError as exc:
                log.warning("could not release the unique key of task %s at its start (%s); it is released "
                            "when the task ends", d.task_id, exc)
            except Exception:  # noqa: BLE001 - a bug in an adapter must not stop the settle thread
                log.exception("could not release the unique key of task %s at its start; it is released "
                              "when the task ends", d.task_id)

    def retry_delay(self, job: Job) -> float:
        return retry_delay(job.handler.options, job.envelope.attempt, self.retry_strategy)

    def settle_and_refill(self, statuses: list[TaskStatus], acks: list[Job], deliveries: list[Delivery]) -> bool:
        """When the fetcher waits for the room these acks free: store (when there are
        results), ack and lease the refill in one round trip (results before acks) and
        take the new deliveries in here (``ConsumeTurn``).  Tried once: False when not
        done, and the caller then settles the usual way, retrying until it is durable."""
        turn = self.state.turn
        claim = turn.settle_claim(acks)
        if claim is None:
            return False
        queues, count = claim
        leased = None
        try:
            if statuses:
                leased = self.backend.store_many_ack_and_consume(statuses, self.broker, deliveries, queues, count,
                                                                 self.worker_id)
            else:
                leased = self.broker.ack_and_consume(deliveries, queues, count, consumer=self.worker_id)
            if leased is None:
                turn.refill_unsupported()   # not this backend or broker: never asked again
        except StemError as exc:
            log.warning("settling %d outcomes with a refill failed (%s); settling without the refill",
                        len(acks), exc)
        finally:
            turn.settle_release(None if leased is None else lambda paused: self.take_in(leased, paused, acks))
        return leased is not None

    def store_and_ack(self, statuses: list[TaskStatus], deliveries: list[Delivery]) -> bool:
        """One round trip for results and acks where broker and backend share a store;
        False when they do not (then never asked again)."""
        done = self.retrying(lambda: self.backend.store_many_and_ack(statuses, self.broker, deliveries),
                             f"storing {len(statuses)} results with their acks")
        if done is False:
            self.combined = False
            return False
        return True

    def store(self, statuses: list[TaskStatus]) -> None:
        """Results must be durable before the ack: retried until stored (or a hard shutdown)."""
        self.retrying(lambda: self.backend.store_many(statuses), f"storing {len(statuses)} results")

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
                if self.state.stop_mode is ShutdownMode.HARD:
                    log.error("giving up on %s: hard shutdown; the delivery comes back after its lease", what)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                if failures:
                    log.warning("%s succeeded after %d failed attempts", what, failures)
                return result
