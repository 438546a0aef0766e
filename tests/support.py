"""Helpers shared by the tests: wait on a condition with a deadline, never sleep-and-hope."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.01) -> None:
    """As ``wait_until``, but raise AssertionError naming ``what`` on timeout."""
    if not wait_until(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def drop_namespace(client, namespace: str) -> None:
    """Delete every Redis key of ``namespace``: a test's results would outlive it by a day."""
    keys = list(client.scan_iter(match=namespace + ":*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])


def record_peak_in_flight(broker, queue: str = "default") -> list[int]:
    """Wrap ``broker.consume`` so that ``peak[0]`` is the most deliveries of ``queue`` in flight
    right after any consume (what the prefetch window let the worker lease)."""
    peak = [0]
    real_consume = broker.consume

    def consume(*a, **kw):
        out = real_consume(*a, **kw)
        peak[0] = max(peak[0], broker.stats(queue).in_flight)
        return out

    broker.consume = consume
    return peak
