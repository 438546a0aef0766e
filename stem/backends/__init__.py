"""Result backends.  A URL picks the adapter, as for brokers."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import ResultBackend
from .memory import InMemoryResultBackend

__all__ = ["ResultBackend", "InMemoryResultBackend", "RedisResultBackend", "PostgresResultBackend",
           "SqliteResultBackend", "from_url"]

_memory_instances: dict[str, InMemoryResultBackend] = {}

_LAZY = {
    "RedisResultBackend": ("stem.backends.redis", "RedisResultBackend"),
    "PostgresResultBackend": ("stem.backends.postgres", "PostgresResultBackend"),
    "SqliteResultBackend": ("stem.backends.sqlite", "SqliteResultBackend"),
}

SCHEMES = {
    "redis": "RedisResultBackend", "rediss": "RedisResultBackend", "unix": "RedisResultBackend",
    "postgres": "PostgresResultBackend", "postgresql": "PostgresResultBackend",
    "sqlite": "SqliteResultBackend",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'stem.backends' has no attribute {name!r}")


def from_url(url: str, **kwargs: Any) -> ResultBackend:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"bad result backend URL {url!r}: expected memory://, sqlite:///path, redis://host:port/db "
            "or postgresql://user@host/db")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        key = url[len("memory://"):]
        inst = _memory_instances.get(key)
        if inst is None:
            inst = _memory_instances[key] = InMemoryResultBackend(url=url, **kwargs)
        return inst
    cls_name = SCHEMES.get(scheme)
    if cls_name is None:
        raise ConfigurationError(
            f"unknown result backend URL scheme {scheme!r} in {url!r}; known: memory, "
            + ", ".join(sorted(SCHEMES)))
    return __getattr__(cls_name).from_url(url, **kwargs)
