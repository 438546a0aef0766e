"""URL -> adapter, shared by ``stem.brokers`` and ``stem.backends``.

A scheme names a module and a class, imported only when used (so ``import
stem`` never needs redis-py or psycopg); ``memory://NAME`` gives one shared
in-process instance per NAME.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .errors import ConfigurationError

# scheme -> the module suffix both packages use for that adapter
SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis",
           "redis+sentinel": "redis", "rediss+sentinel": "redis", "redis+cluster": "redis", "rediss+cluster": "redis",
           "postgres": "postgres", "postgresql": "postgres", "sqlite": "sqlite"}
URL_FORMS = ("memory://, sqlite:///path, redis://host:port/db, redis+sentinel://host:port[,host:port]/service/db, "
             "redis+cluster://host:port[,host:port]/ or postgresql://user@host/db")


def lazy_class(package: str, lazy: dict[str, str], name: str) -> Any:
    """``module.__getattr__`` body: import ``lazy[name]`` (a module suffix) on first use."""
    if name in lazy:
        return getattr(importlib.import_module(f"{package}.{lazy[name]}"), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def from_url(kind: str, package: str, class_suffix: str, url: str, memory: dict[str, Any],
             make_memory: Callable[[str], Any], reuse: Callable[[Any], bool], kwargs: dict[str, Any]) -> Any:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"bad {kind} URL {url!r}: expected {URL_FORMS}")
    scheme = url.partition("://")[0].lower()   # not urlsplit: it raises on an unbalanced "["
    if scheme == "memory":
        key = url[len("memory://"):]
        inst = memory.get(key)
        if inst is None or not reuse(inst):
            inst = memory[key] = make_memory(url)
        return inst
    suffix = SCHEMES.get(scheme)
    if suffix is None:
        raise ConfigurationError(f"unknown {kind} URL scheme {scheme!r} in {url!r}; known: memory, "
                                 + ", ".join(sorted(SCHEMES)))
    cls_name = suffix.capitalize() + class_suffix
    return lazy_class(package, {cls_name: suffix}, cls_name).from_url(url, **kwargs)
