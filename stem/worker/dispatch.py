"""How the process pool's backlog reaches its children: free slots first, then offers.

A child never gets more frames than it can start (``child_concurrency``), so
an idle child never waits behind a busy one -- with one exception, the offer.

Offers: a busy child that runs one task at a time is also sent its next
tasks -- up to ``OFFER_DEPTH`` -- as *offers* (``Channel.offer``, one claim
slot each), so when it finishes it starts the next at
once instead of waiting for the supervisor's main thread to wake, read its
Result and send the next frame -- on a short task that wait was a third of a
child's time; four deep, a late supervisor turn (the GIL, the scheduler,
a supervisor that yields the CPU to its children: ``stem.worker.sched``)
rarely leaves a child without one (four against two: ``benchmarks/README.md``).  An offer is not yet running: the child claims it when it
starts it, and until then the pool takes it back (``Channel.withdraw``; one
atomic word decides who wins) whenever a free child would otherwise idle, a
child is recycled, stopped or killed, or the worker revokes or requeues its
backlog.  So an idle child still never waits behind a busy one.  A claimed
offer runs from the moment the pool sees the claim (its time limits start
then, and ``task_prerun`` is sent then).  The pure build has no atomic
compare-and-swap and makes no offers.

Every method runs under the pool's lock, but ``announce``.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..signals import signals
from .protocol import Offer, Task, encode_message
from .engine import Job, RateLimiter, take_matching
from .channel import Channel

if TYPE_CHECKING:
    from .process_engine import ProcessEngine

__all__ = ["ChildState", "Dispatcher", "OFFER_DEPTH"]

_encode = encode_message

#: offers a busy child may hold at once
OFFER_DEPTH = min(4, Channel.claim_slots)


class ChildState(enum.Enum):
    STARTING = "starting"    # forked, not READY yet
    READY = "ready"          # takes tasks
    DRAINING = "draining"    # finishing its tasks, then exits (recycle)
    KILLED = "killed"        # SIGKILL sent, waiting for the exit report
    DEAD = "dead"


class Dispatcher:
    """The pool's backlog, its rate limiters and the children's offers."""

    def __init__(self, pool: "ProcessEngine"):
        self.pool = pool
        self.backlog: deque[Job] = deque()
        # True when dispatch might start something: jobs came in or a slot freed since it
        # last found nothing to do (written under the lock; read without it as a hint)
        self.wanted = True
        self.limiters: dict[str, RateLimiter] = {}
        self.offers = pool.child_concurrency == 1 and Channel.can_offer
        self.offers_made = self.offers_withdrawn = 0
        self.unannounced: list[Job] = []   # claimed offers not yet announced (task_prerun)
        self.expired: list[Job] = []       # found past their deadline: reported by the pool, unrun

    def dispatch(self, children) -> list[Job]:
        """Hand backlog jobs to free children, fewest running first, then offer the next
        ones to busy children.  Returns the jobs sent as tasks (for ``task_prerun``)."""
        started: list[Job] = []
        backlog = self.backlog
        per_child = self.pool.child_concurrency
        if self.offers:
            for child in children:
                if child.offers:
                    self.settled(child)
        # a child with an open offer is about to claim it: not free
        free = [c for c in children
                if c.state is ChildState.READY and len(c.running) < per_child and not c.offers]
        if free and not backlog and self.offers:   # an idle child runs what a busy one was offered
            self.take_back_oldest(children, sum(per_child - len(c.running) for c in free))
        if not backlog:
            self.wanted = False
            return started
        if per_child > 1:
            free.sort(key=_running_count)
        skipped: list[Job] = []
        while free:
            job = self.next_job(skipped)
            if job is None:
                break
            child = free[0]
            if not child.channel.send(_encode(Task(job.seq, job.delivery.frame))):
                skipped.append(job)
                free.pop(0)
                continue
            job.slot = child
            job.mark_started()
            job.soft_deadline = None  # the child enforces its own soft limit
            child.running[job.seq] = job
            started.append(job)
            if len(child.running) >= per_child:
                free.pop(0)
        if self.offers and backlog and not free:
            self.offer(children, skipped)
        if skipped:
            backlog.extendleft(reversed(skipped))
        # rate-limited jobs wait while children idle: look again next turn
        self.wanted = bool(free and backlog)
        return started

    def take_expired(self) -> list[Job]:
        """The jobs ``next_job`` found past their deadline since the last call."""
        jobs, self.expired = self.expired, []
        return jobs

    def next_job(self, skipped: list[Job]) -> Job | None:
        """The backlog's next job that may start now (rate-limited ones go to ``skipped``,
        ones past their deadline to ``expired``: a backlog can outlast ``expires``)."""
        backlog = self.backlog
        while backlog:
            job = backlog.popleft()
            if job.settled:
                continue
            expires_at = job.envelope.expires_at
            if expires_at is not None and expires_at < time.time():
                self.expired.append(job)
                continue
            options = job.handler.options
            if options.rate_scope == "worker" and options.rate_limit is not None:
                # the opt-in per-worker bucket; a global limit was kept by the broker already
                name = job.handler.name
                limiter = self.limiters.get(name)
                if limiter is None:
                    limiter = self.limiters[name] = RateLimiter(options.rate_per_second)
                if limiter.wait_time(time.monotonic()) > 0:
                    skipped.append(job)
                    continue
            return job
        return None

    def take(self, children, predicate=None) -> list[Job]:
        """The backlog's jobs, and the offers the children have not claimed yet (all, or
        those matching ``predicate``)."""
        offers = []
        for child in children:
            for slot, job in list(child.offers.items()):
                if predicate is None or predicate(job):
                    if self.withdraw(child, slot):
                        offers.append(job)
        offers.sort(key=_seq)
        return offers + take_matching(self.backlog, predicate)

    # -- offers ------------------------------------------------------------------------------
    def offer(self, children, skipped: list[Job]) -> None:
        """Fill the free claim slots of each busy child, up to ``OFFER_DEPTH`` offers (and
        within ``max_tasks_per_child``).  ``dispatch`` settled their offers just before."""
        max_tasks = self.pool.max_tasks
        for child in children:
            if not (child.state is ChildState.READY and child.running):
                continue
            offers = child.offers
            while len(offers) < OFFER_DEPTH:
                if max_tasks is not None and child.tasks_done + len(child.running) + len(offers) >= max_tasks:
                    break
                job = self.next_job(skipped)
                if job is None:
                    return
                slot = 0
                while slot in offers:   # the lowest free one (fewer than OFFER_DEPTH are used)
                    slot += 1
                channel = child.channel
                channel.offer(job.seq, slot)
                if not channel.send(_encode(Offer(job.seq, job.delivery.frame, slot))):
                    channel.withdraw(job.seq, slot)   # never sent: nobody can have claimed it
                    skipped.append(job)
                    break
                job.slot = child
                offers[slot] = job
                self.offers_made += 1

    def settled(self, child: Any) -> bool:
        """True when ``child`` has no open offer; the claimed ones now run.

        Every slot still open holds one of ``child.offers`` (an offer leaves the dict when
        withdrawn or seen claimed), so as many open slots as offers means none was claimed:
        one look at the ring, no per-slot calls, on the pool's most frequent question."""
        offers = child.offers
        open_slots = child.channel.open_slots()
        if open_slots.bit_count() != len(offers):
            for slot in [s for s in offers if not open_slots >> s & 1]:
                self._claimed(child, slot)
        return not offers

    def withdraw(self, child: Any, slot: int) -> bool:
        """Take the offer in ``child``'s ``slot`` back: False when the child claimed it
        first (it then runs there)."""
        job = child.offers[slot]
        if child.channel.withdraw(job.seq, slot):
            del child.offers[slot]
            job.slot = None
            self.offers_withdrawn += 1
            self.wanted = True
            return True
        self._claimed(child, slot)
        return False

    def take_back(self, child: Any) -> None:
        """Withdraw ``child``'s unclaimed offers to the front of the backlog, in order."""
        if not child.offers:
            return
        back = [job for slot, job in list(child.offers.items()) if self.withdraw(child, slot)]
        back.sort(key=_seq)
        self.backlog.extendleft(reversed(back))

    def take_back_oldest(self, children, n: int) -> None:
        """Withdraw up to ``n`` unclaimed offers of busy children, oldest first, to the front
        of the backlog: as many as the idle children can start; the others stay offered
        (taking all back re-sent them to the same busy children)."""
        open_offers = sorted((job.seq, child, slot) for child in children if child.running
                             for slot, job in child.offers.items())
        back = []
        for _, child, slot in open_offers:
            if len(back) >= n:
                break
            job = child.offers[slot]
            if self.withdraw(child, slot):
                back.append(job)
        self.backlog.extendleft(reversed(back))

    def _claimed(self, child: Any, slot: int) -> None:
        job = child.offers.pop(slot)
        job.mark_started()
        job.soft_deadline = None
        child.running[job.seq] = job
        if signals.task_prerun.receivers:
            self.unannounced.append(job)

    def announce(self) -> None:
        """``task_prerun`` for claimed offers, outside the lock (an offer taken back never
        ran, so it is announced only where it is claimed)."""
        with self.pool._lock:
            jobs, self.unannounced = self.unannounced, []
        for job in jobs:
            signals.task_prerun.send(self.pool.hooks.sender, envelope=job.envelope, context=None)


def _running_count(child: Any) -> int:
    return len(child.running)


def _seq(job: Job) -> int:
    return job.seq
