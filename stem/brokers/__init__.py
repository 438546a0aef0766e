"""Brokers.  A URL picks the adapter: ``from_url("redis://localhost:6379/0")``.

Networked adapters import lazily, so ``import stem`` never needs redis-py or
psycopg to be importable unless that broker is used.
"""

from __future__ import annotations

from typing import Any

from .. import _adapters
from .base import Broker, DeadLetter, Delivery, Held, Keyed, Message, QueueStats
from .memory import InMemoryBroker

__all__ = ["Broker", "Message", "Keyed", "Delivery", "DeadLetter", "Held", "QueueStats", "InMemoryBroker",
           "RedisBroker", "PostgresBroker", "SqliteBroker", "from_url"]

_memory_instances: dict[str, InMemoryBroker] = {}

_LAZY = {"RedisBroker": "redis", "PostgresBroker": "postgres", "SqliteBroker": "sqlite"}


def __getattr__(name: str) -> Any:
    return _adapters.lazy_class("stem.brokers", _LAZY, name)


def from_url(url: str, **kwargs: Any) -> Broker:
    """The broker for ``url``; ``memory://NAME`` gives the same instance per NAME in one process."""
    return _adapters.from_url("broker", "stem.brokers", "Broker", url, _memory_instances,
                              lambda u: InMemoryBroker(url=u, **kwargs), lambda b: not b.closed, kwargs)
