"""What every command shares: one configuration path (``Env``), errors as exit codes, ``-A`` loading."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from ..errors import ConfigurationError, EncodeError, InvalidTaskOptionsError, StemError, UnknownTaskError
from ..redact import mask_urls
from ._params import Url

__all__ = ["DEFAULT_SQLITE", "EXIT_FAILURE", "EXIT_USAGE", "CommandError", "fail", "translate", "Env",
           "connection_options", "remember_group_urls", "load_app"]

DEFAULT_SQLITE = "sqlite:///stem.db"
EXIT_FAILURE = 1   # the command ran and did not get what was asked (unreachable broker, task failed, ...)
EXIT_USAGE = 2     # the command line or the STEM_* environment is wrong: fix it and run again
# stem errors that mean "what you gave me is wrong", wherever they are found
USAGE_ERRORS = (ConfigurationError, InvalidTaskOptionsError, UnknownTaskError, EncodeError)
_GROUP_URLS = "stem.group_urls"


class CommandError(click.ClickException):
    """One line on stderr (``Error: ...``, URLs masked) and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(" ".join(mask_urls(str(message)).split()))
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise CommandError(message, exit_code)


def translate(exc: StemError) -> CommandError:
    return CommandError(str(exc), EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE)


def connection_options(fn):
    fn = click.option("--backend", "backend_url", type=Url("backend URL"), metavar="URL",
                      help="result backend URL (default: $STEM_RESULT_BACKEND_URL, else the broker's)")(fn)
    fn = click.option("--broker", "broker_url", type=Url("broker URL"), metavar="URL",
                      help=f"broker URL (default: $STEM_BROKER_URL, else {DEFAULT_SQLITE})")(fn)
    return fn


def remember_group_urls(ctx: click.Context, broker_url: str | None, backend_url: str | None) -> None:
    """``stem worker --broker URL ping``: the group's URLs, for the subcommand to honour."""
    ctx.meta[_GROUP_URLS] = (broker_url, backend_url)


class Env:
    """The broker, backend, signer and producer of one command, from its own options,
    else the group's (``stem worker --broker URL ping``), else the STEM_* variables,
    else the embedded SQLite file (announced on stderr).  Every command builds them
    here, so every command reads one configuration: the queue ``stem enqueue`` uses
    is the one ``stem worker`` listens on."""

    def __init__(self, broker_url: str | None = None, backend_url: str | None = None, *,
                 no_results: bool = False):
        from ..config import StemConfig
        ctx = click.get_current_context(silent=True)
        group_broker, group_backend = ctx.meta.get(_GROUP_URLS, (None, None)) if ctx else (None, None)
        self.config = StemConfig.from_environment()
        self.broker_url = broker_url or group_broker or self.config.broker_url
        self.fallback = self.broker_url is None
        if self.fallback:
            self.broker_url = DEFAULT_SQLITE
        explicit_backend = backend_url or group_backend or self.config.result_backend_url
        self.backend_url = None if no_results else (explicit_backend or self.broker_url)
        self._backend_fallback = self.fallback and not explicit_backend
        self._announced = False
        self._broker = self._backend = None

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def announce_fallback(self) -> None:
        """Say on stderr (once) that no broker was configured and the embedded SQLite file is used."""
        if not self._announced:
            self._announced = True
            click.echo(f"stem: no broker configured (--broker, STEM_BROKER_URL); using the embedded SQLite "
                       f"file {os.path.abspath('stem.db')}", err=True)

    @property
    def broker(self):
        if self._broker is None:
            from ..brokers import from_url
            if self.fallback:
                self.announce_fallback()
            self._broker = from_url(self.broker_url)
        return self._broker

    @property
    def backend(self):
        if self._backend is None and self.backend_url:
            from ..backends import from_url
            if self._backend_fallback:
                self.announce_fallback()
            self._backend = from_url(self.backend_url, result_expires=self.config.result_expires)
        return self._backend

    def require_backend(self, why: str):
        if self.backend is None:
            raise ConfigurationError(f"{why} needs a result backend (--backend URL, or leave out --no-results)")
        return self.backend

    @property
    def signer(self):
        return self.config.signer()

    def producer(self, registry: Any = None):
        from ..producer import Stem
        return Stem(self.broker, self.backend, registry, self.signer, default_queue=self.config.default_queue)

    def control(self):
        from ..control import Control
        return Control(self.broker, self.require_backend("the control plane (it finds workers by heartbeat)"),
                       self.signer)

    def close(self) -> None:
        for obj in (self._broker, self._backend):
            if obj is not None:
                obj.close()


def load_app(path: str, paths: tuple[str, ...] = ()):
    """The TaskRegistry at ``path`` ('module:attribute'), importable from the current
    directory and the ``--path`` directories, as Celery, RQ and Dramatiq do (a console
    script's sys.path does not hold the working directory)."""
    from ..task import load_registry
    cwd = os.getcwd()
    for directory in [cwd, *reversed([os.path.abspath(p) for p in paths])]:
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        return load_registry(path)
    except ConfigurationError as exc:
        cause = exc.__cause__
        module = path.partition(":")[0]
        if isinstance(cause, ModuleNotFoundError) and cause.name and (
                module == cause.name or module.startswith(cause.name + ".")):
            where = ", ".join([cwd, *[os.path.abspath(p) for p in paths]])
            raise ConfigurationError(
                f"{exc} (looked in {where} and sys.path): run stem from the directory that holds "
                f"{cause.name.split('.')[0]!r}, or add --path DIR") from None
        raise
