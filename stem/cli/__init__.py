"""The ``stem`` command: argument parsing over library functions, nothing more.

One module per command group: ``worker`` (run a worker), ``control`` (its
subcommands that talk to running workers), ``schedule`` (``stem beat`` and
``stem schedule ...``), ``tasks`` (enqueue, result, queues, purge), ``dlq``, ``workflows`` (``stem wf ...``),
``dashboard`` (serve the web dashboard),
``tools`` (migrate, demo, bench).  ``_common`` holds the one
configuration path every command takes (``Env``) and the exit codes,
``_params`` the option types, ``_output`` how results are printed.

Exit codes: 0 ok; 1 the command ran and failed (a broker that cannot be
reached, a task that did not succeed, no worker answered); 2 the command line
or the STEM_* environment is wrong (click's usage errors, bad STEM_* values,
bad URLs, queue or task names).  Errors are one line on stderr, ``Error: ...``,
with passwords in URLs masked.  Every read command takes ``--json``.
"""

from __future__ import annotations

import click

from ..errors import StemError
from ._common import translate
from ._params import parse_size
from . import control as _control  # noqa: F401  (adds the subcommands of `stem worker`)
from .canvas import group
from .dashboard import dashboard
from .dlq import dlq
from .schedule import beat, schedule
from .tasks import enqueue, purge, queues, result
from .tools import bench, demo, migrate
from .worker import worker
from .workflows import wf

__all__ = ["main", "parse_size"]


class _Stem(click.Group):
    """Turns the library's errors into one line and an exit code (see the module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StemError as exc:
            raise translate(exc) from None


@click.group(cls=_Stem, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stem-queue")
def main() -> None:
    """stem: a fast, trustworthy task queue.

    Every command reads the same configuration: its options, else the STEM_*
    variables, else the embedded SQLite file ./stem.db (announced on stderr).
    Exit codes: 0 ok, 1 failed, 2 bad command line or STEM_* value.
    """


for _command in (worker, beat, schedule, enqueue, result, queues, purge, group, dlq, wf, dashboard, migrate, demo,
                 bench):
    main.add_command(_command)
