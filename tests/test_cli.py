"""The ``stem`` command through its real entry point, in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .test_worker import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEM = shutil.which("stem", path=os.path.dirname(sys.executable)) or shutil.which("stem")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
for var in ("STEM_BROKER_URL", "STEM_RESULT_BACKEND_URL", "STEM_SIGNING_KEYS"):
    ENV.pop(var, None)


def stem(*args, timeout=60, check=None, input=None):
    assert STEM, "the stem console script is not installed (pip install -e .)"
    proc = subprocess.run([STEM, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT,
                          input=input)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def stem_json(*args, **kw):
    proc = stem(*args, "--json", check=0, **kw)
    return json.loads(proc.stdout)


def invoke(*args, env=None, input=None):
    """The ``stem`` command in this process (click's CliRunner): what a subprocess would
    print and exit with, in milliseconds.  Every STEM_* variable the config reads is
    unset unless ``env`` sets it."""
    from click.testing import CliRunner

    from stem.cli import main
    from stem.config import VARIABLES
    environ = {var: None for var in VARIABLES}
    environ.update(env or {})
    return CliRunner().invoke(main, [str(a) for a in args], env=environ, input=input)


def strict_json(text):
    """``json.loads`` that fails on NaN and Infinity, as every JSON parser but Python's does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class Workers:
    """Worker subprocesses with their output in log files (a full pipe would block them)."""

    def __init__(self, url, logdir):
        self.url = url
        self.logdir = logdir
        self.procs = []

    def start(self, *extra):
        log = open(os.path.join(self.logdir, f"worker-{len(self.procs)}.log"), "w")
        try:
            proc = subprocess.Popen([STEM, "worker", "-A", "tests.apps.tasks:registry", "--broker", self.url,
                                     "-c", "1", "--heartbeat-interval", "0.5", *extra], env=ENV, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def live(self):
        return {w["id"]: w for w in stem_json("worker", "status", "--broker", self.url)["workers"]
                if not w.get("lost")}

    def wait_live(self, n, timeout=60):
        assert wait_until(lambda: len(self.live()) >= n, timeout=timeout, interval=0.2), self.logs()
        return self.live()

    def logs(self):
        out = []
        for i in range(len(self.procs)):
            with open(os.path.join(self.logdir, f"worker-{i}.log")) as f:
                out.append(f.read())
        return "\n".join(out)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/cli.db"


def test_help_and_version():
    assert "worker" in stem("--help", check=0).stdout
    assert stem("--version", check=0).stdout.strip()


def test_worker_without_a_registry_is_a_usage_error():
    proc = stem("worker", check=2)
    assert "stem worker -A" in proc.stderr


def test_worker_with_a_bad_registry_path_fails_cleanly(sqlite_url):
    proc = stem("worker", "-A", "no_such_module:registry", "--broker", sqlite_url, check=2)
    assert "cannot load the task registry" in proc.stderr


def test_bad_size_string_is_a_usage_error(sqlite_url):
    proc = stem("worker", "-A", "tests.apps.tasks:registry", "--max-memory-per-child", "lots", check=2)
    assert "bad size" in proc.stderr


def test_a_max_prefetch_multiplier_below_the_multiplier_fails_cleanly(sqlite_url):
    proc = stem("worker", "-A", "tests.apps.tasks:registry", "--broker", sqlite_url, "--prefetch-multiplier", "4",
                "--max-prefetch-multiplier", "2", check=2)
    assert "max_prefetch_multiplier must be an integer >= prefetch_multiplier (4), got 2" in proc.stderr


def test_unreachable_broker_fails_with_a_message_not_a_traceback():
    t0 = time.monotonic()
    proc = stem("worker", "-A", "tests.apps.tasks:registry", "--broker", "redis://127.0.0.1:1/0", check=1,
                timeout=120)
    assert "Error" in proc.stderr and time.monotonic() - t0 < 60


def test_enqueue_rejects_bad_json_args(sqlite_url):
    proc = stem("enqueue", "apps.add", "--args", "{nope", "--broker", sqlite_url, check=2)
    assert "--args" in proc.stderr


def test_enqueue_validates_the_name_against_a_registry(sqlite_url):
    proc = stem("enqueue", "apps.ad", "-A", "tests.apps.tasks:registry", "--broker", sqlite_url, check=2)
    assert "did you mean 'apps.add'" in proc.stderr


def test_size_parser_accepts_common_units():
    from stem.cli import parse_size
    assert parse_size("200MB") == 200 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    assert parse_size("1.5 MiB") == int(1.5 * 2**20)


@pytest.mark.timeout(180)
def test_a_worker_round_trip_on_sqlite_with_every_read_command(sqlite_url, tmp_path):
    workers = Workers(sqlite_url, str(tmp_path))
    try:
        workers.start()
        [worker_id] = workers.wait_live(1)
        status = stem_json("enqueue", "apps.add", "--args", '{"a": 1, "b": 2}', "--wait", "--broker", sqlite_url)
        assert status["state"] == "SUCCEEDED" and status["result"] == 3
        pongs = stem_json("worker", "ping", "--broker", sqlite_url, "--timeout", "10")
        assert [p["worker"] for p in pongs] == [worker_id]
        [st] = stem_json("worker", "stats", "--broker", sqlite_url, "--timeout", "10")
        assert st["reply"]["succeeded"] >= 1 and len(st["reply"]["children"]) == 1
        failed = stem("enqueue", "apps.fail", "--wait", "--broker", sqlite_url, check=1)
        assert "FAILED" in failed.stdout
        [dead] = stem_json("dlq", "list", "--broker", sqlite_url)
        assert dead["reason"] == "error" and dead["queue"] == "default"
        rows = {r["queue"]: r for r in stem_json("queues", "--broker", sqlite_url)}
        assert rows["default"]["dead"] == 1 and not any(q.startswith("stem.") for q in rows)
        assert stem_json("dlq", "replay", "--yes", "--broker", sqlite_url) == {"default": 1}
        assert wait_until(lambda: stem_json("dlq", "list", "--broker", sqlite_url) != [], timeout=30)
        assert stem_json("dlq", "purge", "--yes", "--broker", sqlite_url) == {"default": 1}
        health = stem("worker", "healthcheck", "--broker", sqlite_url, "--timeout", "10", check=0)
        assert "healthy" in health.stdout
        stem("worker", "shutdown", "--broker", sqlite_url, "--timeout", "10", check=0)
        assert workers.procs[0].wait(30) == 0
        assert stem("worker", "healthcheck", "--broker", sqlite_url, "--timeout", "2").returncode == 1
    finally:
        workers.stop()


def _two_workers_scenario(url, logdir):
    workers = Workers(url, logdir)
    try:
        workers.start()
        workers.start()
        live = workers.wait_live(2)
        a, b = sorted(live)
        pongs = stem_json("worker", "ping", "--broker", url, "--timeout", "10")
        assert sorted(p["worker"] for p in pongs) == [a, b]
        assert len(stem_json("worker", "stats", "--broker", url, "--timeout", "10")) == 2
        # a revoked task never runs, also on a worker that starts after the revoke
        queued = stem_json("enqueue", "apps.add", "--args", '{"a": 1, "b": 1}', "--queue", "later",
                           "--broker", url)["id"]
        # a queued task has no status yet: --force says that is expected
        stem("worker", "revoke", queued, "--broker", url, "--timeout", "5", check=1)
        stem("worker", "revoke", queued, "--force", "--broker", url, "--timeout", "5", check=0)
        workers.start("-Q", "later")
        status = stem_json("enqueue", "apps.add", "--args", '{"a": 2, "b": 2}', "--queue", "later", "--wait",
                           "--broker", url, "--timeout", "60")
        assert status["result"] == 4
        from stem.backends import from_url
        backend = from_url(url)
        try:
            assert backend.wait(queued, 30).state.value == "REVOKED"
        finally:
            backend.close()
        # shutdown --worker stops that worker alone
        stem("worker", "shutdown", "--worker", a, "--broker", url, "--timeout", "10", check=0)
        assert wait_until(lambda: a not in workers.live(), timeout=30, interval=0.2)
        assert b in workers.live()
    finally:
        workers.stop()


@pytest.mark.timeout(240)
def test_two_workers_on_sqlite_ping_revoke_and_shutdown(sqlite_url, tmp_path):
    _two_workers_scenario(sqlite_url, str(tmp_path))


@pytest.mark.timeout(240)
def test_two_workers_on_redis_ping_revoke_and_shutdown(redis_own_db_url, tmp_path):
    _two_workers_scenario(redis_own_db_url, str(tmp_path))


@pytest.mark.pg_heavy
@pytest.mark.timeout(240)
def test_two_workers_on_postgres_ping_revoke_and_shutdown(postgres_url, namespace, tmp_path):
    """In a schema of its own, named in the URL as a deployment would (not a database of
    its own: CREATE and DROP DATABASE cost seconds)."""
    import psycopg
    try:
        _two_workers_scenario(f"{postgres_url}?schema={namespace}", str(tmp_path))
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
