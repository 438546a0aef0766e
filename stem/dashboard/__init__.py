"""stem's web dashboard: workers, queues, tasks, dead letters and schedules, live.

``stem dashboard --broker URL`` serves it; ``app(broker, backend)`` returns the
same ASGI application to mount in your own (``Mount("/stem", app=app(...))`` in
Starlette, ``app.mount("/stem", ...)`` in FastAPI).  It needs the ``dashboard``
extra: ``pip install 'stem-queue[dashboard]'``.

The dashboard reads only what stem already stores (heartbeats, queue counts,
task statuses, dead letters, schedule records) and keeps nothing of its own,
so it shows the same after a restart, and adds no load to workers beyond those
reads.  Its actions go through the control plane (``stem.control.Control``),
the broker's dead-letter calls and the backend's schedule records.
"""

from __future__ import annotations

from typing import Any, Iterable

from .. import _checks as checks
from ..errors import ConfigurationError
from .views import Redactor, default_redact

__all__ = ["app", "default_redact", "Redactor"]

# the modules of the extra (python-multipart is ``python_multipart``, ``multipart`` before 0.0.13)
_NEEDED = (("starlette",), ("jinja2",), ("python_multipart", "multipart"))


def _require_extra() -> None:
    import importlib.util
    missing = [names[0] for names in _NEEDED if all(importlib.util.find_spec(n) is None for n in names)]
    if missing:
        raise ConfigurationError(f"the dashboard needs {', '.join(missing)}: pip install 'stem-queue[dashboard]'")


def _rule_of(registry: Any) -> Any:
    """``name -> TaskOptions.redact`` of the registry's handler (None for a task it lacks)."""
    def rule_of(name: str) -> Any:
        return registry.get(name).options.redact if name in registry else None
    return rule_of


def app(broker: Any, backend: Any = None, *, signer: Any = None, registry: Any = None,
        auth: tuple[str, str] | str | None = None, token: str | None = None, read_only: bool = False,
        redact: Redactor = default_redact, secret: bytes | None = None, refresh_s: float = 2.0,
        title: str = "stem") -> Any:
    """The dashboard as an ASGI application.

    ``broker``/``backend``: adapters or URLs (a URL given here is opened here and closed
    when the app shuts down; ``backend`` defaults to the broker's URL when the broker is
    one).  ``signer``: the ``PayloadSigner`` the workers verify control commands with
    (never shown).  ``registry``: a ``TaskRegistry`` whose code-declared schedules the
    schedules page lists beside the stored ones.  ``auth``: ``(user, password)`` or
    ``"user:password"`` for HTTP basic; ``token``: a bearer token (not both).
    ``read_only``: hide and refuse every action.  ``redact(task_name, value)``: what the
    task page shows of a task's arguments and meta, over what the worker kept (it already
    hid what the task's ``TaskOptions(redact=...)`` and the secret-looking names say;
    default: ``default_redact``, the name rule again, which also covers meta).  With a
    ``registry``, arguments read from a dead letter's frame get the task's own ``redact``
    too.  ``secret``: the key of the CSRF tokens (default: random per process, so a
    restart only asks for a reload of open forms).
    """
    _require_extra()
    from ..backends import ResultBackend
    from ..backends import from_url as backend_from_url
    from ..brokers import Broker
    from ..brokers import from_url as broker_from_url
    from . import security
    from .app import Dashboard, build_app

    if auth is not None and token is not None:
        raise ConfigurationError("give the dashboard either auth (user:password) or a token, not both")
    if isinstance(auth, str):
        user, sep, password = auth.partition(":")
        auth = (user, password) if sep else None
        if auth is None:
            raise ConfigurationError("auth must be 'user:password'")
    if auth is not None and (not isinstance(auth, tuple) or len(auth) != 2 or
                             not all(isinstance(a, str) for a in auth) or not auth[0] or not auth[1]):
        raise ConfigurationError("auth must be (user, password) with both non-empty")
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise ConfigurationError("a dashboard token must be a string of at least 8 characters")
    if not callable(redact):
        raise ConfigurationError(f"redact must be a callable (task_name, value) -> value, got {redact!r}")
    if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
        raise ConfigurationError("secret must be at least 16 bytes")
    checks.seconds("refresh_s", refresh_s)
    owned = []
    if isinstance(broker, str):
        broker_url = broker
        broker = broker_from_url(broker_url)
        owned.append(broker)
        if backend is None:
            backend = broker_url
    if not isinstance(broker, Broker):
        raise ConfigurationError(f"the dashboard needs a Broker or a broker URL, got {broker!r}")
    if isinstance(backend, str):
        backend = backend_from_url(backend)
        owned.append(backend)
    if not isinstance(backend, ResultBackend):
        raise ConfigurationError("the dashboard needs a result backend (workers, tasks and schedules live "
                                 f"there), got {backend!r}")
    schedules: Iterable[Any] = getattr(registry, "schedules", ()) if registry is not None else ()
    dash = Dashboard(broker, backend, signer=signer, code_schedules=list(schedules), read_only=bool(read_only),
                     redact=redact, csrf=security.Csrf(secret), refresh_s=float(refresh_s), title=str(title),
                     owned=owned, rule_of=None if registry is None else _rule_of(registry))
    return build_app(dash, auth=auth, token=token)
