"""The wait hub's rules that the contract suite (tests/contract/test_wait_contract.py) cannot
order by hand: here the test is the notification source, so it decides which id's first read
comes last."""

from __future__ import annotations

import asyncio
import threading
import time

from stem.backends.waiting import WaitHub
from stem.backends.waiting_async import AsyncWaitHub
from stem.results import TaskState, TaskStatus

STORED = {"a": TaskStatus(id="a", state=TaskState.SUCCEEDED, result=1)}   # "c" is never stored


def _read(ids: list[str]) -> list[TaskStatus]:
    return [STORED[i] for i in ids if i in STORED]


def test_a_wait_whose_first_reads_end_with_an_arrival_returns_at_its_deadline():
    """A waiter past its deadline waits for the first read of each of its ids (up to 10 s).
    When the last of those reads finds a terminal status (an arrival, not a plain "seen"),
    it must still wake the waiter: ``wait_many(["a", "c"], timeout=0.2)`` took 10 s on Redis,
    whose listener confirms (and so reads) ids one subscription at a time."""
    hub = WaitHub(name="test", read=_read, on_change=lambda: None)
    waiter = hub.open(["a", "c"], "ALL")

    def source() -> None:
        hub.confirmed(["c"])                 # read first: nothing stored
        deadline = time.monotonic() + 5
        while waiter.unseen != {"a"} and time.monotonic() < deadline:
            time.sleep(0.005)
        hub.confirmed(["a"])                 # read last: a terminal status

    t0 = time.monotonic()
    feeder = threading.Thread(target=source)
    feeder.start()
    try:
        hub.wait(waiter, t0 + 0.2)
    finally:
        feeder.join()
        hub.close(waiter)
        hub.stop()
    assert list(waiter.done) == ["a"] and not waiter.unseen
    assert time.monotonic() - t0 < 3.0, "the waiter slept out the first-read grace"


def test_an_async_wait_whose_first_reads_end_with_an_arrival_returns_at_its_deadline():
    async def main() -> float:
        async def read(ids: list[str]) -> list[TaskStatus]:
            return _read(ids)

        hub = AsyncWaitHub(read=read, on_change=lambda: None)
        waiter = hub.open(["a", "c"], "ALL")

        async def source() -> None:
            hub.confirmed(["c"])
            while waiter.unseen != {"a"}:
                await asyncio.sleep(0.005)
            hub.confirmed(["a"])

        t0 = time.monotonic()
        feeding = asyncio.create_task(source())
        try:
            await asyncio.wait_for(hub.wait(waiter, t0 + 0.2), 9)
        finally:
            await feeding
            hub.close(waiter)
            await hub.stop()
        assert list(waiter.done) == ["a"] and not waiter.unseen
        return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0, "the waiter slept out the first-read grace"
