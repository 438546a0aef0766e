"""``stem dashboard``: serve the web dashboard (``stem.dashboard``) with uvicorn."""

from __future__ import annotations

import ipaddress

import click

from ._common import EXIT_USAGE, Env, connection_options, fail, load_app

__all__ = ["dashboard"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@connection_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (anything but loopback needs --auth or --token)")
@click.option("--port", type=click.IntRange(0, 65535), default=5555, show_default=True)
@click.option("--auth", metavar="USER:PASSWORD", default=None, envvar="STEM_DASHBOARD_AUTH",
              help="HTTP basic credentials (default: $STEM_DASHBOARD_AUTH)")
@click.option("--token", metavar="TOKEN", default=None, envvar="STEM_DASHBOARD_TOKEN",
              help="a bearer token, at least 8 characters (default: $STEM_DASHBOARD_TOKEN); browsers log in at /login")
@click.option("--read-only", is_flag=True, help="show no action and refuse every one")
@click.option("-A", "--app", "registry_path", default=None, metavar="MODULE:REGISTRY",
              help="a TaskRegistry whose code-declared schedules the schedules page lists, and whose tasks' "
                   "TaskOptions(redact=...) hide arguments read from dead letters")
@click.option("--path", "paths", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="also import -A from DIR (repeatable)")
@click.option("--insecure-public", is_flag=True,
              help="allow a non-loopback --host without --auth or --token (behind a proxy that authenticates)")
def dashboard(broker_url, backend_url, host, port, auth, token, read_only, registry_path, paths, insecure_public):
    """Serve the web dashboard: workers, queues, tasks, dead letters, schedules, live.

    Needs the dashboard extra: pip install 'stem-queue[dashboard]'.
    """
    try:
        import uvicorn
    except ImportError:
        fail("stem dashboard needs uvicorn: pip install 'stem-queue[dashboard]'", EXIT_USAGE)
    from ..dashboard import app as make_app
    if auth is not None and token is not None:
        fail("give --auth or --token, not both", EXIT_USAGE)
    if auth is not None and (":" not in auth or not auth.partition(":")[0] or not auth.partition(":")[2]):
        fail("--auth takes USER:PASSWORD, both non-empty", EXIT_USAGE)
    if not _loopback(host) and auth is None and token is None and not insecure_public:
        fail(f"--host {host} is reachable from other machines: give --auth USER:PASSWORD or --token TOKEN "
             "(or --insecure-public behind a proxy that authenticates)", EXIT_USAGE)
    registry = load_app(registry_path, paths) if registry_path else None
    env = Env(broker_url, backend_url)
    asgi = make_app(env.broker, env.require_backend("the dashboard (workers, tasks and schedules live there)"),
                    signer=env.signer, registry=registry, auth=auth, token=token, read_only=read_only)
    where = f"http://{host if ':' not in host else '[' + host + ']'}:{port}/"
    click.echo(f"stem dashboard on {where}" + (" (read-only)" if read_only else ""), err=True)
    try:
        uvicorn.run(asgi, host=host, port=port, log_level="warning", access_log=False)
    finally:
        env.close()
