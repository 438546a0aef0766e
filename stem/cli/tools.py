"""``stem migrate``, ``stem demo`` and ``stem bench``."""

from __future__ import annotations

import json
import os
import sys

import click

from ._common import DEFAULT_SQLITE, EXIT_FAILURE, Env, connection_options, fail
from ._output import dumps
from ._params import Url
from .worker import ISOLATION_HELP

__all__ = ["migrate", "demo", "bench"]


@click.command()
@connection_options
def migrate(broker_url, backend_url):
    """Create or upgrade the broker's and backend's schema (SQLite, Postgres); idempotent."""
    with Env(broker_url, backend_url) as env:
        done = [f"{type(obj).__name__}: schema version {obj.migrate()}"
                for obj in (env.broker, env.backend) if obj is not None and hasattr(obj, "migrate")]
    click.echo("\n".join(done) if done else "nothing to migrate for this broker")


@click.command()
@click.option("-n", "--tasks", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("-c", "--concurrency", default=2, show_default=True, type=click.IntRange(1))
@click.option("--broker", "broker_url", type=Url("broker URL"), default=None, metavar="URL",
              help=f"broker URL (default: $STEM_BROKER_URL, else {DEFAULT_SQLITE})")
@click.option("--isolation", type=click.Choice(["inline", "process"]), default="process", show_default=True,
              help=ISOLATION_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def demo(tasks, concurrency, broker_url, isolation, as_json):
    """Enqueue TASKS tasks, process them with one worker, print a summary."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..demo import run_demo

    with Env(broker_url) as env:
        if env.fallback:
            env.announce_fallback()
        url, backend_url = env.broker_url, env.backend_url
    console = Console(stderr=as_json, highlight=False)
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("processing", total=tasks)
        summary = run_demo(tasks, concurrency, url, backend_url, isolation=isolation,
                           progress=lambda n, total: bar.update(job, completed=n))
    if as_json:
        click.echo(dumps(summary))
    else:
        table = Table(title="stem demo", show_header=False)
        for key in ("tasks", "implementation", "broker", "isolation", "concurrency", "states", "retried"):
            value = summary[key]
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        table.add_row("enqueue", f"{summary['enqueue_per_second']:,.0f} tasks/s (enqueue_many)")
        table.add_row("process", f"{summary['process_per_second']:,.0f} tasks/s")
        console.print(table)
        console.print("[green]all tasks SUCCEEDED[/green]" if summary["all_succeeded"]
                      else "[red]some tasks did not succeed[/red]")
    if not summary["all_succeeded"]:
        sys.exit(EXIT_FAILURE)


# --help goes to the harness too: its options are the ones worth reading
@click.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench(ctx):
    """The end-to-end benchmark harness (benchmarks/e2e.py of a source checkout); every option,
    --help included, goes to it."""
    import importlib.util
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (os.getcwd(), here):
        path = os.path.join(root, "benchmarks", "e2e.py")
        if os.path.exists(path):
            break
    else:
        fail("stem bench needs a source checkout (benchmarks/e2e.py was not found)")
    spec = importlib.util.spec_from_file_location("stem_bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.exit(module.main(list(ctx.args)) or 0)
