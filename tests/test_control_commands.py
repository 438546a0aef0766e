"""Control commands: the worker's command table, ``registered``, and the CLI with a verify-only worker."""

from __future__ import annotations

import base64
import json
import signal
import subprocess

import pytest

from stem import ShutdownMode, TaskOptions, TaskRegistry, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.control import Control
from stem.errors import ControlError

from .test_cli import ENV, ROOT, STEM
from .test_control_security import SEED, ed25519_pair
from .test_worker import NO_SIGNALS, wait_until


@pytest.fixture
def one_worker():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    registry = TaskRegistry()
    registry.task("plain")(lambda ctx: None)
    registry.task("report.build", options=TaskOptions(queue="reports", max_retries=3, soft_time_limit=5,
                                                      hard_time_limit=10, rate_limit="10/s"))(lambda ctx: None)
    w = Worker(broker, backend, registry, concurrency=1, isolation="inline", lifecycle=NO_SIGNALS,
               heartbeat_interval=0.2)
    w.run_in_background()
    assert wait_until(lambda: w.id in {h["worker_id"] for h in backend.heartbeats()}, timeout=30)
    yield w, Control(broker, backend)
    w.shutdown(ShutdownMode.HARD, timeout=20)


def test_registered_lists_each_task_with_the_options_the_worker_applies(one_worker):
    w, control = one_worker
    [reply] = control.registered(timeout=20)
    assert reply["worker"] == w.id
    tasks = {t["name"]: t for t in reply["reply"]}
    assert sorted(tasks) == ["plain", "report.build"]
    report = tasks["report.build"]
    assert (report["queue"], report["max_retries"], report["soft_time_limit"], report["hard_time_limit"],
            report["rate_limit"]) == ("reports", 3, 5, 10, "10/s")
    plain = tasks["plain"]
    assert (plain["queue"], plain["max_retries"], plain["soft_time_limit"], plain["rate_limit"]) == \
        ("default", 0, None, None)


def test_a_worker_answers_a_bad_command_argument_with_an_error_reply(one_worker):
    w, control = one_worker
    [reply] = control.pause("not-mine", timeout=20)
    assert reply["worker"] == w.id and "does not consume 'not-mine'" in reply["error"]
    [reply] = control.broadcast("pool_grow", {"n": "two"}, timeout=20)
    assert "n must be an integer" in reply["error"]
    assert w.concurrency == 1
    with pytest.raises(ControlError, match="unknown control command"):
        control.broadcast("reboot")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.timeout(120)
def test_healthcheck_and_inspect_registered_reach_a_verify_only_ed25519_worker(tmp_path):
    ed25519_pair()                       # skips without cryptography
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    public_raw = ed25519.Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    url = f"sqlite:///{tmp_path}/verify-only.db"
    worker_env = {**ENV, "STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_PUBLIC_KEYS": f"ed:{_b64(public_raw)}"}
    control_env = {**ENV, "STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_KEYS": f"ed:{_b64(SEED)}"}

    def stem(*args, env=control_env):
        proc = subprocess.run([STEM, *args, "--broker", url], capture_output=True, text=True, timeout=60,
                              env=env, cwd=ROOT)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([STEM, "worker", "-A", "tests.apps.tasks:registry", "--broker", url, "-c", "1",
                               "--heartbeat-interval", "0.5"], env=worker_env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    log.close()
    try:
        assert wait_until(lambda: json.loads(stem("worker", "status", "--json").stdout)["workers"], timeout=60,
                          interval=0.2), (tmp_path / "worker.log").read_text()
        health = stem("worker", "healthcheck", "--timeout", "10")
        assert health.returncode == 0 and "healthy: 1 of 1" in health.stdout, (health.stdout, health.stderr)
        registered = stem("worker", "inspect", "registered", "--timeout", "10", "--json")
        assert registered.returncode == 0, (registered.stdout, registered.stderr)
        [reply] = json.loads(registered.stdout)
        assert {"apps.add", "apps.fail"} <= {t["name"] for t in reply["reply"]}
        table = stem("worker", "inspect", "registered", "--timeout", "10")
        assert table.returncode == 0 and "apps.add" in table.stdout and "default" in table.stdout
        unsigned = stem("worker", "healthcheck", "--timeout", "1", env=ENV)      # no keys: refused by the worker
        assert unsigned.returncode == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
