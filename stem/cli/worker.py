"""``stem worker``: run a worker; its subcommands (``stem.cli.control``) talk to running ones."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ._common import Env, connection_options, load_app, remember_group_urls
from ._params import AppPath, AutoscaleRange, NonEmpty, QueueList, Seconds, SizeParam

__all__ = ["worker"]

ISOLATION_HELP = (
    "process (default): each task runs in a child process; time limits are enforced and a crash "
    "(os._exit, a segfault, the OOM killer) costs one child, never the worker. inline: tasks run on threads "
    "of the worker process, for I/O-bound tasks and debugging; it gives up the soft time limit (raised only "
    "between Python bytecodes, never inside a blocking call: do not count on it), the hard time limit (the "
    "task is marked failed but its thread runs on), --max-tasks-per-child and --max-memory-per-child, CPU "
    "parallelism (one GIL), and crash isolation: a task that calls os._exit or crashes the interpreter takes "
    "the worker down, and its tasks come back only after their visibility timeout")
# options of the group that only mean something when it runs a worker
_RUN_ONLY = ("registry_path", "paths", "no_results", "queues", "concurrency", "autoscale", "prefetch_multiplier",
             "max_prefetch_multiplier", "isolation", "max_tasks_per_child", "max_memory_per_child",
             "heartbeat_interval", "no_yield_cpu", "loglevel", "log_format", "metrics_port", "metrics_addr",
             "burst", "name", "beat")


@click.group(invoke_without_command=True)
@click.option("-A", "--app", "registry_path", type=AppPath(), metavar="MODULE:REGISTRY",
              help="the TaskRegistry to serve, imported from the current directory, --path or sys.path")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False),
              metavar="DIR", help="also import -A from DIR (repeatable; searched before the current directory)")
@connection_options
@click.option("--no-results", is_flag=True, help="do not store results (fire-and-forget)")
@click.option("-Q", "--queues", type=QueueList(), default=None, metavar="Q1,Q2",
              help="comma-separated queues (default: $STEM_WORKER_QUEUES, else $STEM_DEFAULT_QUEUE, else default)")
@click.option("-c", "--concurrency", type=click.IntRange(1), default=None,
              help="child processes (default: $STEM_WORKER_CONCURRENCY, else one per CPU; with --autoscale, "
                   "its minimum)")
@click.option("--autoscale", type=AutoscaleRange(), default=None, metavar="MAX,MIN",
              help="grow the pool up to MAX children under a sustained backlog, shrink it down to MIN when "
                   "children stay idle (e.g. 8,2; -c, if given, is where it starts)")
@click.option("--prefetch-multiplier", type=click.IntRange(1), default=None,
              help="tasks leased per child (default: $STEM_PREFETCH_MULTIPLIER or 4)")
@click.option("--max-prefetch-multiplier", type=click.IntRange(1), default=None,
              help="the most tasks per child the window widens to while tasks are short "
                   "(default: $STEM_MAX_PREFETCH_MULTIPLIER or 64; the same as --prefetch-multiplier: a fixed window)")
@click.option("--isolation", type=click.Choice(["process", "inline"]), default="process", show_default=True,
              help=ISOLATION_HELP)
@click.option("--max-tasks-per-child", type=click.IntRange(1), default=None,
              help="replace a child after it ran this many tasks, between tasks (default: never)")
@click.option("--max-memory-per-child", type=SizeParam(), default=None,
              help="replace a child whose RSS passes this size, between tasks, e.g. 200MB, 1GiB (default: never)")
@click.option("--heartbeat-interval", type=Seconds(0.1), default=10.0, show_default=True,
              help="seconds between heartbeats (what `stem worker status` and the control plane see); "
                   "a worker silent for 3 intervals is shown as lost")
@click.option("--no-yield-cpu", is_flag=True,
              help="keep the supervisor's default CPU scheduling (lower latency when children saturate the CPUs)")
@click.option("--burst", is_flag=True, help="exit once the queues are empty (for cron jobs and tests)")
@click.option("--beat", is_flag=True,
              help="also run a scheduler for the registry's schedules (and the stored ones), stopped with the "
                   "worker; safe on every worker: each run is published once however many fire it")
@click.option("-n", "--name", type=NonEmpty(), default=None, metavar="ID",
              help="this worker's id, as the control plane shows it (default: HOST:PID:RANDOM)")
@click.option("--loglevel", "-l", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="serve Prometheus /metrics")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="address for --metrics-port")
@click.pass_context
def worker(ctx, registry_path, paths, broker_url, backend_url, no_results, queues, concurrency, autoscale,
           prefetch_multiplier, max_prefetch_multiplier, isolation, max_tasks_per_child, max_memory_per_child,
           heartbeat_interval, no_yield_cpu, burst, beat, name, loglevel, log_format, metrics_port, metrics_addr):
    """Run a worker: stem worker -A myapp.tasks:registry.

    With a subcommand, control running workers instead (stem worker ping); --broker and
    --backend then apply to the subcommand, and the options of a running worker are refused.
    """
    if ctx.invoked_subcommand is not None:
        given = [p for p in ctx.command.params if p.name in _RUN_ONLY and ctx.get_parameter_source(p.name)
                 not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)]
        if given:
            flags = ", ".join(p.opts[-1] for p in given)
            raise click.UsageError(f"{flags}: for running a worker; `stem worker {ctx.invoked_subcommand}` "
                                   "takes only --broker and --backend from here")
        remember_group_urls(ctx, broker_url, backend_url)
        return
    if not registry_path:
        raise click.UsageError("give the task registry to serve: stem worker -A package.module:registry")
    if beat and no_results:
        raise click.UsageError("--beat needs the result backend (schedules keep their records there): "
                               "drop --no-results")
    if beat and burst:
        raise click.UsageError("--beat and --burst do not go together: a burst worker exits when its queues "
                               "are empty, a scheduler runs on")
    from .. import logs
    from ..worker import Worker, WorkerLifecycleConfig
    with Env(broker_url, backend_url, no_results=no_results) as env:
        config = env.config
        concurrency = concurrency or config.worker_concurrency
        prefetch_multiplier = prefetch_multiplier or config.prefetch_multiplier
        if autoscale is not None:
            _check_autoscale(autoscale, concurrency, prefetch_multiplier)
        load_app(registry_path, paths)   # import errors surface here, with the --path hint
        logs.configure(loglevel.upper(), log_format)
        env.broker.ping()
        if env.backend is not None:
            env.backend.ping()
        w = Worker(env.broker, env.backend, registry_path, queues=queues or config.worker_queues,
                   concurrency=concurrency, autoscale=autoscale, prefetch_multiplier=prefetch_multiplier,
                   max_prefetch_multiplier=max_prefetch_multiplier or config.max_prefetch_multiplier,
                   signer=env.signer, isolation=isolation, heartbeat_interval=heartbeat_interval,
                   yield_cpu=not no_yield_cpu, worker_id=name, beat=beat,
                   lifecycle=WorkerLifecycleConfig(max_tasks_per_child=max_tasks_per_child,
                                                   max_memory_per_child=max_memory_per_child))
        if metrics_port:
            from .. import metrics
            metrics.install(workers=[w])
            metrics.start_http_server(metrics_port, metrics_addr)
        from .. import tracing
        tracing.install_if_available()
        w.start(burst=burst)


def _check_autoscale(autoscale, concurrency: int | None, prefetch_multiplier: int) -> None:
    """Before anything connects: -c within --autoscale, and a prefetch window that shows a backlog."""
    low, high = autoscale.min_concurrency, autoscale.max_concurrency
    if concurrency is not None and not low <= concurrency <= high:
        raise click.UsageError(f"-c/--concurrency {concurrency} (or $STEM_WORKER_CONCURRENCY) is outside "
                               f"--autoscale {high},{low}: leave it out (the pool starts at {low}) or give one "
                               "within the range")
    from ..errors import ConfigurationError
    try:
        autoscale.check_window(prefetch_multiplier)
    except ConfigurationError as exc:
        raise click.UsageError(f"--autoscale: {exc} (--prefetch-multiplier)") from None
