"""What every store has: its label, the errors it raises for its user, ``same_store``; and the backoff of retries.

A store is the connection side of an adapter: a broker and a backend of the
same kind each hold one (``broker.store``), and two stores that reach the
same data (``same_store``) let a backend fuse its writes with the broker's.
"""

from __future__ import annotations

import abc
import random
from typing import NamedTuple

from ..errors import BackendConnectionError, BackendError, BrokerConnectionError, BrokerError, StemError

__all__ = ["Store", "StoreErrors", "BROKER_ERRORS", "BACKEND_ERRORS", "Backoff"]


class StoreErrors(NamedTuple):
    """The ``StemError`` classes a store raises for its user: ``error`` when a call failed,
    ``connection_error`` when the store could not be reached (after bounded retries)."""

    error: type[StemError]
    connection_error: type[StemError]


BROKER_ERRORS = StoreErrors(BrokerError, BrokerConnectionError)
BACKEND_ERRORS = StoreErrors(BackendError, BackendConnectionError)


class Backoff:
    """Capped exponential delays with jitter: ~50 ms, ~100 ms, ... ~1 s, each drawn from
    0.5-1.5 times its step, so the workers that lost one server do not knock again in step."""

    __slots__ = ("step", "cap")

    def __init__(self, first: float = 0.05, cap: float = 1.0):
        self.step = first
        self.cap = cap

    def next(self) -> float:
        delay = self.step * (0.5 + random.random())
        self.step = min(self.step * 2, self.cap)
        return delay


class Store(abc.ABC):
    """The connections of one adapter to one store."""

    #: Where the data lives, for error messages ("host:port/db", a file path).
    label: str = ""
    errors: StoreErrors = BROKER_ERRORS

    @abc.abstractmethod
    def same_store(self, other: "Store") -> bool:
        """True when ``other`` reads and writes the same data as this store (one Redis
        pool, one SQLite file, one Postgres database): then one round trip or one
        transaction can hold a backend's writes and a broker's acks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connections.  Safe to call twice."""
