"""Configuration from STEM_* environment variables, read when asked (never at import)."""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from .errors import ConfigurationError

__all__ = ["StemConfig"]


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 1) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ConfigurationError(f"{name}={raw!r} must be > 0")
    return value


@dataclasses.dataclass
class StemConfig:
    broker_url: str | None = None
    result_backend_url: str | None = None
    default_queue: str = "default"
    prefetch_multiplier: int = 4
    max_prefetch_multiplier: int | None = None   # None: 64 (stem.worker.window)
    worker_queues: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    worker_concurrency: int | None = None
    result_expires: float = 86400.0
    signing_algorithm: str = "hmac-sha256"
    signing_keys: dict[str, bytes] = dataclasses.field(default_factory=dict)
    signing_public_keys: dict[str, bytes] = dataclasses.field(default_factory=dict)
    signing_active_key: str | None = None

    def __post_init__(self) -> None:
        if self.signing_algorithm not in ("hmac-sha256", "ed25519"):
            raise ConfigurationError(
                f"signing algorithm {self.signing_algorithm!r} is unknown; use hmac-sha256 or ed25519")
        if self.signing_active_key is not None and self.signing_keys and \
                self.signing_active_key not in self.signing_keys:
            raise ConfigurationError(
                f"STEM_SIGNING_ACTIVE_KEY={self.signing_active_key!r} is not one of the keys in "
                f"STEM_SIGNING_KEYS ({', '.join(sorted(self.signing_keys))})")
        from .task import _QUEUE_NAME
        for q in [self.default_queue, *self.worker_queues]:
            if not _QUEUE_NAME.match(q):
                raise ConfigurationError(f"bad queue name {q!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> "StemConfig":
        """Read STEM_BROKER_URL, STEM_RESULT_BACKEND_URL, STEM_DEFAULT_QUEUE,
        STEM_PREFETCH_MULTIPLIER, STEM_WORKER_QUEUES (comma separated),
        STEM_WORKER_CONCURRENCY, STEM_RESULT_EXPIRES, STEM_SIGNING_ALGORITHM,
        STEM_SIGNING_KEYS (``id:base64,...``), STEM_SIGNING_PUBLIC_KEYS and
        STEM_SIGNING_ACTIVE_KEY."""
        env = os.environ if env is None else env
        keys: dict[str, bytes] = {}
        public: dict[str, bytes] = {}
        if env.get("STEM_SIGNING_KEYS", "").strip() or env.get("STEM_SIGNING_PUBLIC_KEYS", "").strip():
            from .signing import parse_keys
            if env.get("STEM_SIGNING_KEYS", "").strip():
                keys = parse_keys(env["STEM_SIGNING_KEYS"])
            if env.get("STEM_SIGNING_PUBLIC_KEYS", "").strip():
                public = parse_keys(env["STEM_SIGNING_PUBLIC_KEYS"])
        default_queue = env.get("STEM_DEFAULT_QUEUE", "").strip() or "default"
        queues_raw = env.get("STEM_WORKER_QUEUES", "").strip()
        queues = [q.strip() for q in queues_raw.split(",") if q.strip()] if queues_raw else [default_queue]
        return cls(
            broker_url=env.get("STEM_BROKER_URL", "").strip() or None,
            result_backend_url=env.get("STEM_RESULT_BACKEND_URL", "").strip() or None,
            default_queue=default_queue,
            prefetch_multiplier=_int(env, "STEM_PREFETCH_MULTIPLIER", 4),
            max_prefetch_multiplier=_int(env, "STEM_MAX_PREFETCH_MULTIPLIER", None),
            worker_queues=queues,
            worker_concurrency=_int(env, "STEM_WORKER_CONCURRENCY", None),
            result_expires=_float(env, "STEM_RESULT_EXPIRES", 86400.0),
            signing_algorithm=env.get("STEM_SIGNING_ALGORITHM", "").strip().lower() or "hmac-sha256",
            signing_keys=keys,
            signing_public_keys=public,
            signing_active_key=env.get("STEM_SIGNING_ACTIVE_KEY", "").strip() or None,
        )

    def broker(self, **kwargs):
        """The broker for ``broker_url`` (ConfigurationError when unset)."""
        if not self.broker_url:
            raise ConfigurationError("no broker configured: set STEM_BROKER_URL (e.g. sqlite:///stem.db)")
        from .brokers import from_url
        return from_url(self.broker_url, **kwargs)

    def backend(self, **kwargs):
        """The result backend for ``result_backend_url`` (else the broker's URL)."""
        url = self.result_backend_url or self.broker_url
        if not url:
            raise ConfigurationError("no result backend configured: set STEM_RESULT_BACKEND_URL")
        from .backends import from_url
        return from_url(url, result_expires=self.result_expires, **kwargs)
