"""Configuration from STEM_* environment variables, read when asked (never at import).

``StemConfig.from_environment()`` reads every variable in ``VARIABLES`` and
checks them all before anything uses them: a bad value raises one
``ConfigurationError`` naming the variable and the fix, so every command and
every process that reads the same environment agrees on it (the producer's
default queue is the worker's).  An empty variable counts as unset.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from . import _checks as checks
from .errors import ConfigurationError
from .redact import mask_url

__all__ = ["StemConfig", "VARIABLES", "check_url"]

VARIABLES = (
    "STEM_BROKER_URL", "STEM_RESULT_BACKEND_URL", "STEM_DEFAULT_QUEUE", "STEM_WORKER_QUEUES",
    "STEM_WORKER_CONCURRENCY", "STEM_PREFETCH_MULTIPLIER", "STEM_MAX_PREFETCH_MULTIPLIER",
    "STEM_RESULT_EXPIRES", "STEM_SIGNING_ALGORITHM", "STEM_SIGNING_KEYS", "STEM_SIGNING_PUBLIC_KEYS",
    "STEM_SIGNING_ACTIVE_KEY",
)
URL_SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
               "rediss+cluster", "postgres", "postgresql")
URL_FORMS = ("memory://NAME, sqlite:///path/stem.db, redis://[:password@]host:6379/0, rediss://..., "
             "unix:///path/redis.sock, redis+sentinel://host:26379[,host:port...]/service_name/0, "
             "redis+cluster://host:6379[,host:port...]/, "
             "postgresql://user[:password]@host/db (or postgres://)")
_QUEUE_RULE = "use 1-128 characters from A-Z a-z 0-9 _ . : -"


def check_url(url: Any, what: str = "broker URL") -> str:
    """``url`` if its form names an adapter stem has, else ConfigurationError (with the
    URL masked: it may hold a password).  Reaching the server is not checked here."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"{what} is empty: expected {URL_FORMS}")
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(f"{what} {mask_url(url)!r} is not a URL: expected {URL_FORMS}")
    if scheme.lower() not in URL_SCHEMES:
        raise ConfigurationError(f"{what} {mask_url(url)!r} has the unknown scheme {scheme!r}: "
                                 f"use {', '.join(s + '://' for s in URL_SCHEMES)}")
    return url


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None


def _queue(name: str, value: Any) -> None:
    if not isinstance(value, str) or not checks.QUEUE_NAME.fullmatch(value):
        raise ConfigurationError(f"{name}: bad queue name {value!r}: {_QUEUE_RULE}")


def _at_least(name: str, value: Any, minimum: int, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name}={value!r} must be an integer >= {minimum}{what}")


def _keys(name: str, raw: str) -> dict[str, bytes]:
    from .signing import parse_keys
    try:
        return parse_keys(raw)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


@dataclasses.dataclass
class StemConfig:
    """What the STEM_* variables say; each field is checked when the config is made."""

    broker_url: str | None = None
    result_backend_url: str | None = None
    default_queue: str = checks.DEFAULT_QUEUE
    prefetch_multiplier: int = checks.DEFAULT_PREFETCH_MULTIPLIER
    max_prefetch_multiplier: int | None = None   # None: 64 (stem.worker.window)
    worker_queues: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    worker_concurrency: int | None = None
    result_expires: float = checks.DEFAULT_RESULT_EXPIRES
    signing_algorithm: str = "hmac-sha256"
    signing_keys: dict[str, bytes] = dataclasses.field(default_factory=dict)
    signing_public_keys: dict[str, bytes] = dataclasses.field(default_factory=dict)
    signing_active_key: str | None = None

    def __post_init__(self) -> None:
        for name, url in (("STEM_BROKER_URL", self.broker_url), ("STEM_RESULT_BACKEND_URL", self.result_backend_url)):
            if url is not None:
                check_url(url, name)
        _queue("STEM_DEFAULT_QUEUE", self.default_queue)
        if not isinstance(self.worker_queues, list) or not self.worker_queues:
            raise ConfigurationError("STEM_WORKER_QUEUES names no queue: give a comma-separated list, e.g. default,mail")
        for q in self.worker_queues:
            _queue("STEM_WORKER_QUEUES", q)
        _at_least("STEM_PREFETCH_MULTIPLIER", self.prefetch_multiplier, 1)
        if self.max_prefetch_multiplier is not None:
            _at_least("STEM_MAX_PREFETCH_MULTIPLIER", self.max_prefetch_multiplier, self.prefetch_multiplier,
                      " (STEM_PREFETCH_MULTIPLIER)")
        if self.worker_concurrency is not None:
            _at_least("STEM_WORKER_CONCURRENCY", self.worker_concurrency, 1)
        if not checks.is_number(self.result_expires) or not self.result_expires > 0:
            raise ConfigurationError(f"STEM_RESULT_EXPIRES={self.result_expires!r} must be a finite number of "
                                     "seconds > 0")
        self._check_signing()

    def _check_signing(self) -> None:
        """Signing is on exactly when there are keys; a signing setting without keys is a
        mistake (it would publish unsigned while looking configured)."""
        from .signing import ALGORITHMS
        if self.signing_algorithm not in ALGORITHMS:
            raise ConfigurationError(f"STEM_SIGNING_ALGORITHM={self.signing_algorithm!r} is unknown; "
                                     f"use {' or '.join(ALGORITHMS)}")
        has_keys = bool(self.signing_keys or self.signing_public_keys)
        if self.signing_active_key is not None and self.signing_active_key not in self.signing_keys:
            if not self.signing_keys:
                raise ConfigurationError(
                    f"STEM_SIGNING_ACTIVE_KEY={self.signing_active_key!r} is set but STEM_SIGNING_KEYS is not: "
                    "set STEM_SIGNING_KEYS=id:base64[,...] (or unset STEM_SIGNING_ACTIVE_KEY to run unsigned)")
            raise ConfigurationError(
                f"STEM_SIGNING_ACTIVE_KEY={self.signing_active_key!r} is not one of the keys in "
                f"STEM_SIGNING_KEYS ({', '.join(sorted(self.signing_keys))})")
        if not has_keys and self.signing_algorithm != "hmac-sha256":
            raise ConfigurationError(self._no_keys("STEM_SIGNING_ALGORITHM", self.signing_algorithm))
        if has_keys:
            self.signer()   # key sizes, algorithm and key kinds checked now

    @staticmethod
    def _no_keys(name: str, value: str) -> str:
        return (f"{name}={value!r} is set but no signing keys are: set STEM_SIGNING_KEYS=id:base64[,...] "
                f"(or STEM_SIGNING_PUBLIC_KEYS on a verify-only ed25519 worker), or unset {name} to run unsigned")

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> "StemConfig":
        """Read every variable in ``VARIABLES``: STEM_BROKER_URL, STEM_RESULT_BACKEND_URL,
        STEM_DEFAULT_QUEUE, STEM_WORKER_QUEUES (comma separated; default: the default
        queue), STEM_WORKER_CONCURRENCY, STEM_PREFETCH_MULTIPLIER,
        STEM_MAX_PREFETCH_MULTIPLIER, STEM_RESULT_EXPIRES (seconds), STEM_SIGNING_ALGORITHM,
        STEM_SIGNING_KEYS (``id:base64,...``), STEM_SIGNING_PUBLIC_KEYS and
        STEM_SIGNING_ACTIVE_KEY.  ConfigurationError names the first bad one."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name, "").strip()

        keys = _keys("STEM_SIGNING_KEYS", get("STEM_SIGNING_KEYS")) if get("STEM_SIGNING_KEYS") else {}
        public = (_keys("STEM_SIGNING_PUBLIC_KEYS", get("STEM_SIGNING_PUBLIC_KEYS"))
                  if get("STEM_SIGNING_PUBLIC_KEYS") else {})
        algorithm = get("STEM_SIGNING_ALGORITHM").lower()
        if algorithm and not (keys or public):
            raise ConfigurationError(cls._no_keys("STEM_SIGNING_ALGORITHM", algorithm))
        default_queue = get("STEM_DEFAULT_QUEUE") or checks.DEFAULT_QUEUE
        _queue("STEM_DEFAULT_QUEUE", default_queue)
        queues_raw = get("STEM_WORKER_QUEUES")
        queues = [q.strip() for q in queues_raw.split(",")] if queues_raw else [default_queue]
        if queues_raw and not any(queues):
            raise ConfigurationError(f"STEM_WORKER_QUEUES={queues_raw!r} names no queue: "
                                     "give a comma-separated list, e.g. default,mail")
        for q in queues:
            _queue("STEM_WORKER_QUEUES", q)   # 'a,,b' and 'a b' are mistakes, not two queues
        return cls(
            broker_url=get("STEM_BROKER_URL") or None,
            result_backend_url=get("STEM_RESULT_BACKEND_URL") or None,
            default_queue=default_queue,
            prefetch_multiplier=_int(env, "STEM_PREFETCH_MULTIPLIER", checks.DEFAULT_PREFETCH_MULTIPLIER),
            max_prefetch_multiplier=_int(env, "STEM_MAX_PREFETCH_MULTIPLIER", None),
            worker_queues=queues,
            worker_concurrency=_int(env, "STEM_WORKER_CONCURRENCY", None),
            result_expires=_float(env, "STEM_RESULT_EXPIRES", checks.DEFAULT_RESULT_EXPIRES),
            signing_algorithm=algorithm or "hmac-sha256",
            signing_keys=keys,
            signing_public_keys=public,
            signing_active_key=get("STEM_SIGNING_ACTIVE_KEY") or None,
        )

    def signer(self):
        """The ``PayloadSigner`` these settings describe, or None when no keys are set
        (signing off)."""
        if not (self.signing_keys or self.signing_public_keys):
            return None
        from .signing import PayloadSigner
        try:
            return PayloadSigner(self.signing_keys, self.signing_active_key, self.signing_algorithm,
                                 self.signing_public_keys or None)
        except ConfigurationError as exc:
            given = [name for name, value in (("STEM_SIGNING_KEYS", self.signing_keys),
                                              ("STEM_SIGNING_PUBLIC_KEYS", self.signing_public_keys),
                                              ("STEM_SIGNING_ACTIVE_KEY", self.signing_active_key)) if value]
            raise ConfigurationError(f"{' with '.join(given)} (STEM_SIGNING_ALGORITHM={self.signing_algorithm}): "
                                     f"{exc}") from None

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
