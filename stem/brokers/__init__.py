"""Brokers.  A URL picks the adapter: ``from_url("redis://localhost:6379/0")``.

Networked adapters import lazily, so ``import stem`` never needs redis-py or
psycopg to be importable unless that broker is used.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Broker, DeadLetter, Delivery, Message, QueueStats
from .memory import InMemoryBroker

__all__ = ["Broker", "Message", "Delivery", "DeadLetter", "QueueStats", "InMemoryBroker",
           "RedisBroker", "PostgresBroker", "SqliteBroker", "from_url"]

_memory_instances: dict[str, InMemoryBroker] = {}

_LAZY = {
    "RedisBroker": ("stem.brokers.redis", "RedisBroker"),
    "PostgresBroker": ("stem.brokers.postgres", "PostgresBroker"),
    "SqliteBroker": ("stem.brokers.sqlite", "SqliteBroker"),
}

SCHEMES = {
    "redis": "RedisBroker", "rediss": "RedisBroker", "unix": "RedisBroker",
    "postgres": "PostgresBroker", "postgresql": "PostgresBroker",
    "sqlite": "SqliteBroker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'stem.brokers' has no attribute {name!r}")


def from_url(url: str, **kwargs: Any) -> Broker:
    """The broker for ``url``; ``memory://NAME`` gives the same instance per NAME in one process."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"bad broker URL {url!r}: expected memory://, sqlite:///path, redis://host:port/db "
            "or postgresql://user@host/db")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        key = url[len("memory://"):]
        inst = _memory_instances.get(key)
        if inst is None or inst._closed:
            inst = _memory_instances[key] = InMemoryBroker(url=url, **kwargs)
        return inst
    cls_name = SCHEMES.get(scheme)
    if cls_name is None:
        raise ConfigurationError(
            f"unknown broker URL scheme {scheme!r} in {url!r}; known: memory, "
            + ", ".join(sorted(SCHEMES)))
    return __getattr__(cls_name).from_url(url, **kwargs)
