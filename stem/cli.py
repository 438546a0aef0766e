"""The ``stem`` command: thin argument parsing over library functions."""

from __future__ import annotations

import json
import sys

import click

from .errors import StemError


@click.group()
@click.version_option(package_name="stem-queue")
def main() -> None:
    """stem: a fast, trustworthy task queue."""


@main.command()
@click.option("-n", "--tasks", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("-c", "--concurrency", default=2, show_default=True, type=click.IntRange(1))
@click.option("--broker", "broker_url", default="memory://demo", show_default=True)
@click.option("--isolation", type=click.Choice(["inline", "process"]), default="inline", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def demo(tasks: int, concurrency: int, broker_url: str, isolation: str, as_json: bool) -> None:
    """Enqueue TASKS tasks, process them with one worker and print a summary."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .demo import run_demo

    console = Console(stderr=as_json)
    try:
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("processing", total=tasks)
            summary = run_demo(tasks, concurrency, broker_url, isolation=isolation,
                               progress=lambda n, total: bar.update(job, completed=n))
    except StemError as exc:
        raise click.ClickException(str(exc)) from None
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


if __name__ == "__main__":
    main()
