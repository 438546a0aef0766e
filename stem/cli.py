"""The ``stem`` command: argument parsing over library functions, nothing more.

Exit codes: 0 ok, 1 failure (a ``StemError``: printed without a traceback),
2 usage error (click's own).  Every read command takes ``--json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import click

from .errors import ConfigurationError, StemError

DEFAULT_SQLITE = "sqlite:///stem.db"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'200MB', '1.5GiB', '4096' -> bytes."""
    m = _SIZE.match(text or "")
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigurationError(f"bad size {text!r}: use a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigurationError(f"size {text!r} must be positive")
    return value


class SizeParam(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigurationError as exc:
            self.fail(str(exc), param, ctx)


def _fail(exc: StemError) -> None:
    raise click.ClickException(str(exc)) from None


class _Env:
    """Broker, backend and signer from options, else STEM_* variables, else the embedded SQLite file."""

    def __init__(self, broker_url: str | None, backend_url: str | None, no_results: bool = False):
        from .config import StemConfig
        self.config = StemConfig.from_environment()
        self.broker_url = broker_url or self.config.broker_url or DEFAULT_SQLITE
        self.default_broker = not (broker_url or self.config.broker_url)
        self.backend_url = None if no_results else (backend_url or self.config.result_backend_url or self.broker_url)
        self._broker = self._backend = None

    @property
    def broker(self):
        if self._broker is None:
            from .brokers import from_url
            self._broker = from_url(self.broker_url)
        return self._broker

    @property
    def backend(self):
        if self._backend is None and self.backend_url:
            from .backends import from_url
            self._backend = from_url(self.backend_url, result_expires=self.config.result_expires)
        return self._backend

    @property
    def signer(self):
        from .signing import PayloadSigner
        return PayloadSigner.maybe(self.config)

    def control(self):
        from .control import Control
        if self.backend is None:
            raise ConfigurationError("the control plane needs a result backend (it finds workers by heartbeat)")
        return Control(self.broker, self.backend, self.signer)

    def close(self):
        for obj in (self._broker, self._backend):
            if obj is not None:
                obj.close()


def _connection_options(fn):
    fn = click.option("--backend", "backend_url", metavar="URL", help="result backend URL (default: the broker's)")(fn)
    fn = click.option("--broker", "broker_url", metavar="URL",
                      help=f"broker URL (default: $STEM_BROKER_URL, else {DEFAULT_SQLITE})")(fn)
    return fn


def _emit(data: Any, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(data, default=str, indent=None))
    else:
        render(data)


def _console():
    from rich.console import Console
    return Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stem-queue")
def main() -> None:
    """stem: a fast, trustworthy task queue."""


# -- stem worker -------------------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.option("-A", "--app", "registry_path", metavar="MODULE:REGISTRY", help="the TaskRegistry to serve")
@_connection_options
@click.option("--no-results", is_flag=True, help="do not store results (fire-and-forget)")
@click.option("-Q", "--queues", default=None, help="comma-separated queues (default: $STEM_WORKER_QUEUES or default)")
@click.option("-c", "--concurrency", type=click.IntRange(1), default=None, help="child processes (default: CPUs)")
@click.option("--prefetch-multiplier", type=click.IntRange(1), default=None,
              help="tasks leased per child (default: $STEM_PREFETCH_MULTIPLIER or 4)")
@click.option("--max-prefetch-multiplier", type=click.IntRange(1), default=None,
              help="the most tasks per child the window widens to while tasks are short "
                   "(default: $STEM_MAX_PREFETCH_MULTIPLIER or 64; the same as --prefetch-multiplier: a fixed window)")
@click.option("--isolation", type=click.Choice(["process", "inline"]), default="process", show_default=True)
@click.option("--max-tasks-per-child", type=click.IntRange(1), default=None)
@click.option("--max-memory-per-child", type=SizeParam(), default=None, help="e.g. 200MB, 1GiB")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--no-yield-cpu", is_flag=True,
              help="keep the supervisor's default CPU scheduling (lower latency when children saturate the CPUs)")
@click.option("--loglevel", "-l", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="serve Prometheus /metrics")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="address for --metrics-port")
@click.pass_context
def worker(ctx, registry_path, broker_url, backend_url, no_results, queues, concurrency, prefetch_multiplier,
           max_prefetch_multiplier, isolation, max_tasks_per_child, max_memory_per_child, heartbeat_interval,
           no_yield_cpu, loglevel, log_format, metrics_port, metrics_addr):
    """Run a worker (or, with a subcommand, control running workers)."""
    if ctx.invoked_subcommand is not None:
        return
    if not registry_path:
        raise click.UsageError("give the task registry to serve: stem worker -A package.module:registry")
    from . import logs
    from .worker import Worker, WorkerLifecycleConfig
    logs.configure(loglevel.upper(), log_format)
    env = _Env(broker_url, backend_url, no_results)
    try:
        if env.default_broker:
            click.echo(f"stem: no broker configured; using the embedded SQLite file {os.path.abspath('stem.db')}",
                       err=True)
        queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else env.config.worker_queues
        env.broker.ping()
        if env.backend is not None:
            env.backend.ping()
        w = Worker(env.broker, env.backend, registry_path, queues=queue_list,
                   concurrency=concurrency or env.config.worker_concurrency,
                   prefetch_multiplier=prefetch_multiplier or env.config.prefetch_multiplier,
                   max_prefetch_multiplier=max_prefetch_multiplier or env.config.max_prefetch_multiplier,
                   signer=env.signer,
                   isolation=isolation, heartbeat_interval=heartbeat_interval, yield_cpu=not no_yield_cpu,
                   lifecycle=WorkerLifecycleConfig(max_tasks_per_child=max_tasks_per_child,
                                                   max_memory_per_child=max_memory_per_child))
        if metrics_port:
            from . import metrics
            metrics.install(workers=[w])
            metrics.start_http_server(metrics_port, metrics_addr)
        from . import tracing
        tracing.install_if_available()
        w.start()
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()


def _control_command(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="machine-readable output")(fn)
    fn = click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
                      help="seconds to collect replies")(fn)
    fn = click.option("--worker", "-w", "workers", multiple=True, metavar="ID",
                      help="target this worker (id or prefix); repeatable; default: all")(fn)
    return _connection_options(fn)


def _replies_table(title: str, replies: list[dict], columns: list[tuple[str, Any]]):
    from rich.table import Table
    table = Table(title=title)
    table.add_column("worker")
    for name, _ in columns:
        table.add_column(name)
    for r in replies:
        if "error" in r:
            table.add_row(r["worker"], *(["error: " + r["error"]] + [""] * (len(columns) - 1)))
        else:
            table.add_row(r["worker"], *(str(get(r["reply"])) for _, get in columns))
    return table


def _run_control(broker_url, backend_url, method: str, *args, render=None, as_json=False, **kwargs):
    env = _Env(broker_url, backend_url)
    try:
        replies = getattr(env.control(), method)(*args, **kwargs)
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    if render is None:
        def render(data):
            _console().print(_replies_table(method, data, [("reply", lambda r: r)]))
    _emit(replies, as_json, render)
    if not replies:
        click.echo("no worker replied", err=True)
        sys.exit(1)
    return replies


@worker.command()
@_control_command
def ping(broker_url, backend_url, workers, timeout, as_json):
    """Ping workers; lists each one that answers."""
    _run_control(broker_url, backend_url, "ping", workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: _console().print(_replies_table(
                     "ping", d, [("host", lambda r: r["host"]), ("pid", lambda r: r["pid"]),
                                 ("queues", lambda r: ",".join(r["queues"]))])))


@worker.command()
@_control_command
def stats(broker_url, backend_url, workers, timeout, as_json):
    """Counters, concurrency, children and their memory."""
    cols = [("processed", lambda r: r["processed"]), ("succeeded", lambda r: r["succeeded"]),
            ("failed", lambda r: r["failed"]), ("retried", lambda r: r["retried"]),
            ("in-flight", lambda r: r["in_flight"]), ("concurrency", lambda r: r["concurrency"]),
            ("children RSS MiB", lambda r: ", ".join(f"{c['pid']}:{c['rss'] / 2**20:.0f}"
                                                   for c in r.get("children", []))),
            ("uptime s", lambda r: f"{r['uptime']:.0f}")]
    _run_control(broker_url, backend_url, "stats", workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: _console().print(_replies_table("stats", d, cols)))


def _inspect_registered(broker_url, backend_url, workers, timeout, as_json):
    """``stem worker inspect registered``: each worker's tasks with the options it runs them with."""
    def render(data):
        from rich.table import Table
        table = Table(title="registered")
        for col in ("worker", "task", "queue", "max retries", "soft limit s", "hard limit s", "rate limit"):
            table.add_column(col)
        for r in data:
            if "error" in r:
                table.add_row(r["worker"], "error: " + r["error"], "", "", "", "", "")
                continue
            for t in r["reply"]:
                table.add_row(r["worker"], t["name"], t["queue"], str(t["max_retries"]),
                              *("" if t[k] is None else str(t[k]) for k in ("soft_time_limit", "hard_time_limit",
                                                                            "rate_limit")))
        _console().print(table)
    _run_control(broker_url, backend_url, "registered", workers=workers, timeout=timeout, as_json=as_json,
                 render=render)


@worker.command()
@click.argument("what", type=click.Choice(["tasks", "registered"]), default="tasks")
@_control_command
def inspect(what, broker_url, backend_url, workers, timeout, as_json):
    """Running and reserved tasks (ids, names, start times, child pids) and revocations;
    `inspect registered`: each worker's tasks and their options."""
    if what == "registered":
        return _inspect_registered(broker_url, backend_url, workers, timeout, as_json)

    def render(data):
        from rich.table import Table
        table = Table(title="inspect")
        for col in ("worker", "state", "task id", "name", "started", "pid"):
            table.add_column(col)
        for r in data:
            if "error" in r:
                table.add_row(r["worker"], "error", r["error"], "", "", "")
                continue
            for state in ("running", "reserved"):
                for t in r["reply"][state]:
                    table.add_row(r["worker"], state, t["id"], t["name"], str(t["started_at"] or ""),
                                  str(t["pid"] or ""))
        _console().print(table)
    _run_control(broker_url, backend_url, "inspect", workers=workers, timeout=timeout, as_json=as_json,
                 render=render)


@worker.command()
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="also kill the task if it is running now")
@_control_command
def revoke(task_ids, terminate, broker_url, backend_url, workers, timeout, as_json):
    """Revoke tasks (persistent: a worker started later skips them too)."""
    env = _Env(broker_url, backend_url)
    try:
        replies = env.control().revoke(list(task_ids), terminate=terminate, workers=workers, timeout=timeout)
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    _emit({"revoked": list(task_ids), "replies": replies}, as_json,
          lambda d: click.echo(f"revoked {len(task_ids)} task(s); {len(replies)} worker(s) acknowledged"))


@worker.command()
@click.option("--mode", type=click.Choice(["warm", "soft", "hard"]), default="warm", show_default=True)
@_control_command
def shutdown(mode, broker_url, backend_url, workers, timeout, as_json):
    """Shut workers down (warm: finish running tasks; soft: ask them to stop; hard: kill and requeue)."""
    _run_control(broker_url, backend_url, "shutdown", mode, workers=workers, timeout=timeout, as_json=as_json,
                 render=lambda d: click.echo("\n".join(f"{r['worker']}: shutting down ({mode})" for r in d)))


@worker.command()
@click.argument("queue")
@_control_command
def pause(queue, broker_url, backend_url, workers, timeout, as_json):
    """Stop consuming QUEUE (the worker keeps running)."""
    _run_control(broker_url, backend_url, "pause", queue, workers=workers, timeout=timeout, as_json=as_json)


@worker.command()
@click.argument("queue")
@_control_command
def resume(queue, broker_url, backend_url, workers, timeout, as_json):
    """Consume QUEUE again."""
    _run_control(broker_url, backend_url, "resume", queue, workers=workers, timeout=timeout, as_json=as_json)


@worker.command()
@click.argument("direction", type=click.Choice(["grow", "shrink"]))
@click.argument("n", type=click.IntRange(1), default=1)
@_control_command
def pool(direction, n, broker_url, backend_url, workers, timeout, as_json):
    """Add or retire child processes: stem worker pool grow 2."""
    _run_control(broker_url, backend_url, "pool_" + direction, n, workers=workers, timeout=timeout,
                 as_json=as_json)


@worker.command()
@_connection_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="refresh live until Ctrl-C")
def status(broker_url, backend_url, as_json, watch):
    """Live workers from their heartbeats (lost ones flagged)."""
    from . import status as st
    env = _Env(broker_url, backend_url)
    try:
        if env.backend is None:
            raise ConfigurationError("status reads heartbeats from a result backend")
        if watch and not as_json:
            st.watch(env.backend)
            return
        _emit(st.snapshot(env.backend), as_json, lambda d: _console().print(st.render_table(d["workers"])))
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()


@worker.command()
@_control_command
def healthcheck(broker_url, backend_url, workers, timeout, as_json):
    """Exit 0 when every targeted worker (default: at least one) answers a ping, else 1."""
    env = _Env(broker_url, backend_url)
    try:
        control = env.control()
        live = [h["worker_id"] for h in control.workers()]
        replies = control.ping(workers=workers or None, timeout=timeout) if live else []
    except StemError as exc:
        if as_json:
            click.echo(json.dumps({"healthy": False, "error": str(exc)}))
        else:
            click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)
    finally:
        env.close()
    expected = len(workers) if workers else max(1, len(live))
    healthy = len(replies) >= expected
    _emit({"healthy": healthy, "live": live, "answered": [r["worker"] for r in replies]}, as_json,
          lambda d: click.echo(("healthy" if healthy else "unhealthy") +
                               f": {len(replies)} of {len(live)} live worker(s) answered"))
    sys.exit(0 if healthy else 1)


# -- stem enqueue ---------------------------------------------------------------------------
@main.command()
@click.argument("name")
@click.option("--args", "args_json", default="{}", show_default=True, help="task arguments as a JSON object")
@click.option("--queue", "-q", default=None)
@click.option("--countdown", type=click.FloatRange(min=0), default=None)
@click.option("--priority", type=click.IntRange(0, 9), default=None)
@click.option("--max-retries", type=click.IntRange(0), default=None)
@click.option("-A", "--app", "registry_path", default=None, help="validate NAME against this registry")
@click.option("--wait", is_flag=True, help="wait for the result")
@click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def enqueue(name, args_json, queue, countdown, priority, max_retries, registry_path, wait, timeout, as_json,
            broker_url, backend_url):
    """Enqueue task NAME and print its id (or its result with --wait)."""
    from .producer import Stem
    from .task import TaskOptions
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    if not isinstance(args, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--args")
    env = _Env(broker_url, backend_url)
    try:
        registry = None
        if registry_path:
            from .worker.worker import load_registry
            registry = load_registry(registry_path)
        stem = Stem(env.broker, env.backend, registry, env.signer)
        options = TaskOptions(queue=queue, priority=priority, max_retries=max_retries)
        task_id = stem.enqueue(name, args, options=options, countdown=countdown)
        if not wait:
            _emit({"id": task_id}, as_json, lambda d: click.echo(task_id))
            return
        status = stem.wait_for_task(task_id, timeout=timeout)
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    import msgspec
    data = msgspec.to_builtins(status)
    _emit(data, as_json, lambda d: click.echo(f"{task_id} {status.state.value} "
                                              f"{json.dumps(status.result, default=str) if status.succeeded else status.error}"))
    if not status.succeeded:
        sys.exit(1)


# -- stem queues / dlq ----------------------------------------------------------------------
@main.command()
@_connection_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="include the control plane's own queues")
def queues(broker_url, backend_url, as_json, show_all):
    """Depth, in-flight, delayed and dead counts per queue."""
    from .control import is_internal_queue
    env = _Env(broker_url, backend_url)
    try:
        rows = [env.broker.stats(q)._asdict() for q in env.broker.queues() if show_all or not is_internal_queue(q)]
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()

    def render(data):
        from rich.table import Table
        table = Table(title="queues")
        for col in ("queue", "ready", "in_flight", "delayed", "dead"):
            table.add_column(col, justify="left" if col == "queue" else "right")
        for r in data:
            table.add_row(r["queue"], *(str(r[c]) for c in ("ready", "in_flight", "delayed", "dead")))
        _console().print(table)
    _emit(rows, as_json, render)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters."""


def _queue_names(env, queue):
    from .control import is_internal_queue
    return [queue] if queue else [q for q in env.broker.queues() if not is_internal_queue(q)]


@dlq.command("list")
@click.option("--queue", "-q", default=None, help="one queue (default: all)")
@click.option("--limit", "-n", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def dlq_list(queue, limit, as_json, broker_url, backend_url):
    """Dead letters, oldest first: id, task id, queue, reason, time."""
    env = _Env(broker_url, backend_url)
    try:
        rows = []
        for q in _queue_names(env, queue):
            for dl in env.broker.dead_letters(q, limit):
                rows.append({"id": dl.id, "task_id": dl.task_id, "queue": dl.queue, "reason": dl.reason,
                             "failed_at": dl.failed_at, "size": len(dl.frame)})
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()

    def render(data):
        from rich.table import Table
        import datetime
        table = Table(title="dead letters")
        for col in ("id", "task id", "queue", "reason", "failed at"):
            table.add_column(col)
        for r in data:
            table.add_row(r["id"], r["task_id"], r["queue"], r["reason"],
                          datetime.datetime.fromtimestamp(r["failed_at"]).isoformat(timespec="seconds"))
        _console().print(table)
    _emit(rows[: limit if queue else None], as_json, render)


@dlq.command("replay")
@click.option("--queue", "-q", default=None, help="one queue (default: all)")
@click.option("--id", "ids", multiple=True, help="dead-letter entry id (repeatable; default: all)")
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def dlq_replay(queue, ids, yes, as_json, broker_url, backend_url):
    """Move dead letters back to their queue."""
    if not yes and not click.confirm("replay dead letters back into their queues?", default=False):
        sys.exit(1)
    env = _Env(broker_url, backend_url)
    try:
        moved = {q: env.broker.replay(q, list(ids) or None) for q in _queue_names(env, queue)}
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    _emit(moved, as_json, lambda d: click.echo(f"replayed {sum(d.values())} dead letter(s)"))


@dlq.command("purge")
@click.option("--queue", "-q", default=None, help="one queue (default: all)")
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@_connection_options
def dlq_purge(queue, yes, as_json, broker_url, backend_url):
    """Delete dead letters for good."""
    if not yes and not click.confirm("delete dead letters for good?", default=False):
        sys.exit(1)
    env = _Env(broker_url, backend_url)
    try:
        dropped = {q: env.broker.purge_dead_letters(q) for q in _queue_names(env, queue)}
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    _emit(dropped, as_json, lambda d: click.echo(f"purged {sum(d.values())} dead letter(s)"))


# -- stem migrate / demo / bench -------------------------------------------------------------
@main.command()
@_connection_options
def migrate(broker_url, backend_url):
    """Create or upgrade the broker's and backend's schema (SQLite, Postgres); idempotent."""
    env = _Env(broker_url, backend_url)
    try:
        done = []
        for obj in (env.broker, env.backend):
            if obj is not None and hasattr(obj, "migrate"):
                done.append(f"{type(obj).__name__}: schema version {obj.migrate()}")
    except StemError as exc:
        _fail(exc)
    finally:
        env.close()
    click.echo("\n".join(done) if done else "nothing to migrate for this broker")


@main.command()
@click.option("-n", "--tasks", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("-c", "--concurrency", default=2, show_default=True, type=click.IntRange(1))
@click.option("--broker", "broker_url", default=None,
              help=f"broker URL (default: $STEM_BROKER_URL, else {DEFAULT_SQLITE})")
@click.option("--isolation", type=click.Choice(["inline", "process"]), default="process", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def demo(tasks, concurrency, broker_url, isolation, as_json):
    """Enqueue TASKS tasks, process them with one worker, print a summary."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .demo import run_demo

    url = broker_url or os.environ.get("STEM_BROKER_URL") or DEFAULT_SQLITE
    console = Console(stderr=as_json)
    if url == DEFAULT_SQLITE:
        console.print(f"stem demo: using the embedded SQLite file {os.path.abspath('stem.db')}")
    try:
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("processing", total=tasks)
            summary = run_demo(tasks, concurrency, url, isolation=isolation,
                               progress=lambda n, total: bar.update(job, completed=n))
    except StemError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        table = Table(title="stem demo", show_header=False)
        for key in ("tasks", "implementation", "broker", "isolation", "concurrency", "states", "retried"):
            table.add_row(key, str(summary[key]))
        table.add_row("enqueue", f"{summary['enqueue_per_second']:,.0f} tasks/s (enqueue_many)")
        table.add_row("process", f"{summary['process_per_second']:,.0f} tasks/s")
        console.print(table)
        console.print("[green]all tasks SUCCEEDED[/green]" if summary["all_succeeded"]
                      else "[red]some tasks did not succeed[/red]")
    if not summary["all_succeeded"]:
        sys.exit(1)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench(ctx):
    """The end-to-end benchmark harness (benchmarks/e2e.py of a source checkout); options pass through."""
    import importlib.util
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        path = os.path.join(root, "benchmarks", "e2e.py")
        if os.path.exists(path):
            break
    else:
        raise click.ClickException("stem bench needs a source checkout (benchmarks/e2e.py was not found)")
    spec = importlib.util.spec_from_file_location("stem_bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.exit(module.main(list(ctx.args)) or 0)


if __name__ == "__main__":
    main()
