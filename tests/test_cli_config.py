"""One configuration path for every command: STEM_* values, signing settings, ``-A`` imports."""

from __future__ import annotations

import base64
import json
import re
import subprocess

import pytest

from stem.config import VARIABLES, StemConfig
from stem.errors import ConfigurationError

from .test_cli import ENV, STEM, invoke

HMAC_KEY = base64.b64encode(b"k" * 32).decode()
SHORT_KEY = base64.b64encode(b"short").decode()
ED25519_PUBLIC = "nnvaCMV7hjMFyFdYBGrewZTfaq++sELmFfhsPaGLSts="

# Every variable the config reads, each with values a person might really type by mistake
# (and what else must be set for the value to be the mistake).
BAD_VALUES = {
    "STEM_BROKER_URL": [{"STEM_BROKER_URL": "localhost:6379"}, {"STEM_BROKER_URL": "amqp://guest@rabbit//"}],
    "STEM_RESULT_BACKEND_URL": [{"STEM_RESULT_BACKEND_URL": "nope"}],
    "STEM_DEFAULT_QUEUE": [{"STEM_DEFAULT_QUEUE": "a b"}, {"STEM_DEFAULT_QUEUE": "é"}],
    "STEM_WORKER_QUEUES": [{"STEM_WORKER_QUEUES": "a b"}, {"STEM_WORKER_QUEUES": "a,,b"},
                           {"STEM_WORKER_QUEUES": ","}],
    "STEM_WORKER_CONCURRENCY": [{"STEM_WORKER_CONCURRENCY": "abc"}, {"STEM_WORKER_CONCURRENCY": "0"}],
    "STEM_PREFETCH_MULTIPLIER": [{"STEM_PREFETCH_MULTIPLIER": "0"}, {"STEM_PREFETCH_MULTIPLIER": "2.5"}],
    "STEM_MAX_PREFETCH_MULTIPLIER": [{"STEM_MAX_PREFETCH_MULTIPLIER": "lots"},
                                     {"STEM_MAX_PREFETCH_MULTIPLIER": "2", "STEM_PREFETCH_MULTIPLIER": "4"}],
    "STEM_RESULT_EXPIRES": [{"STEM_RESULT_EXPIRES": "nan"}, {"STEM_RESULT_EXPIRES": "1e400"},
                            {"STEM_RESULT_EXPIRES": "-1"}, {"STEM_RESULT_EXPIRES": "1d"}],
    "STEM_SIGNING_ALGORITHM": [{"STEM_SIGNING_ALGORITHM": "rsa", "STEM_SIGNING_KEYS": f"k1:{HMAC_KEY}"},
                               {"STEM_SIGNING_ALGORITHM": "ed25519"}],
    "STEM_SIGNING_KEYS": [{"STEM_SIGNING_KEYS": "k1:not-base64!!"}, {"STEM_SIGNING_KEYS": f"k1:{SHORT_KEY}"},
                          {"STEM_SIGNING_KEYS": HMAC_KEY}],
    "STEM_SIGNING_PUBLIC_KEYS": [{"STEM_SIGNING_PUBLIC_KEYS": "k1:not-base64!!", "STEM_SIGNING_ALGORITHM": "ed25519"},
                                 {"STEM_SIGNING_PUBLIC_KEYS": f"k1:{ED25519_PUBLIC}"}],   # hmac has no public keys
    "STEM_SIGNING_ACTIVE_KEY": [{"STEM_SIGNING_ACTIVE_KEY": "k1"},
                                {"STEM_SIGNING_ACTIVE_KEY": "k9", "STEM_SIGNING_KEYS": f"k1:{HMAC_KEY}"}],
}
CASES = [pytest.param(var, env, id=f"{var}={env[var]}") for var, envs in BAD_VALUES.items() for env in envs]
COMMANDS = [("queues",), ("enqueue", "x.y"), ("worker", "-A", "tests.apps.tasks:registry"), ("worker", "ping"),
            ("worker", "status"), ("worker", "revoke", "abc"), ("dlq", "list"), ("result", "abc"),
            ("purge", "default", "--yes"), ("migrate",)]


def test_the_table_of_bad_values_covers_every_variable_the_config_reads():
    import stem.config
    with open(stem.config.__file__) as f:
        read = set(re.findall(r'"(STEM_[A-Z_]+)"', f.read()))
    assert read == set(VARIABLES) == set(BAD_VALUES)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("var, env", CASES)
def test_a_bad_stem_variable_is_one_error_line_naming_it_and_exit_2(var, env, command, tmp_path):
    env = {"STEM_BROKER_URL": f"sqlite:///{tmp_path}/x.db", **env}
    result = invoke(*command, env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception   # not an exception with a traceback
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and var in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_bad_variable_in_a_real_process_is_one_line_and_exit_2():
    proc = subprocess.run([STEM, "queues"], capture_output=True, text=True, timeout=60,
                          env={**ENV, "STEM_SIGNING_KEYS": "k1:not-base64!!"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "Error: STEM_SIGNING_KEYS: signing key 'k1' is not valid base64\n"


# -- signing is on exactly when keys are ------------------------------------------------------
@pytest.mark.parametrize("env", [{"STEM_SIGNING_ALGORITHM": "ed25519"}, {"STEM_SIGNING_ALGORITHM": "hmac-sha256"},
                                 {"STEM_SIGNING_ACTIVE_KEY": "k1"}], ids=lambda e: " ".join(e))
def test_a_signing_setting_without_keys_refuses_to_publish_unsigned(env, tmp_path):
    url = f"sqlite:///{tmp_path}/x.db"
    result = invoke("enqueue", "apps.add", "--broker", url, env=env)
    assert result.exit_code == 2 and "STEM_SIGNING_KEYS" in result.output, result.output
    from stem.brokers import from_url
    with from_url(url) as broker:
        assert broker.stats("default").ready == 0


def test_a_verify_only_worker_config_with_public_keys_alone_is_valid():
    config = StemConfig.from_environment({"STEM_SIGNING_ALGORITHM": "ed25519",
                                          "STEM_SIGNING_PUBLIC_KEYS": f"k1:{ED25519_PUBLIC}"})
    signer = config.signer()
    assert signer is not None and signer.algorithm == "ed25519" and not signer.can_sign


def test_a_config_made_in_code_checks_its_values_too():
    with pytest.raises(ConfigurationError, match="STEM_SIGNING_ACTIVE_KEY"):
        StemConfig(signing_active_key="k1")
    with pytest.raises(ConfigurationError, match="STEM_RESULT_EXPIRES"):
        StemConfig(result_expires=float("inf"))
    with pytest.raises(ConfigurationError, match="STEM_WORKER_QUEUES"):
        StemConfig(worker_queues=[])
    assert StemConfig().signer() is None


# -- one configuration path: the queue enqueue uses is the queue the worker listens on ---------
def test_enqueue_publishes_to_stem_default_queue_where_the_worker_listens(tmp_path):
    url = f"sqlite:///{tmp_path}/x.db"
    result = invoke("enqueue", "apps.add", "--args", '{"a": 1, "b": 2}', env={"STEM_BROKER_URL": url,
                                                                            "STEM_DEFAULT_QUEUE": "jobs"})
    assert result.exit_code == 0, result.output
    from stem.brokers import from_url
    with from_url(url) as broker:
        assert broker.stats("jobs").ready == 1 and "default" not in broker.queues()
    assert StemConfig.from_environment({"STEM_DEFAULT_QUEUE": "jobs"}).worker_queues == ["jobs"]


# -- -A imports from the working directory and --path, as Celery, RQ and Dramatiq do ------------
APP = '''
from stem import TaskRegistry
registry = TaskRegistry()

@registry.task("hello.greet")
def greet(ctx, who):
    return "hello " + who
'''


def _run(args, cwd, env=None, timeout=60):
    environ = {k: v for k, v in ENV.items() if k not in VARIABLES and k != "PYTHONPATH"}
    proc = subprocess.run([STEM, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.timeout(120)
def test_a_module_in_the_working_directory_is_importable_by_enqueue_and_worker(tmp_path):
    (tmp_path / "hello_app.py").write_text(APP)
    env = {"STEM_BROKER_URL": f"sqlite:///{tmp_path}/x.db", "STEM_DEFAULT_QUEUE": "jobs"}
    enq = _run(["enqueue", "hello.greet", "--args", '{"who": "cwd"}', "-A", "hello_app:registry"], tmp_path, env)
    assert enq.returncode == 0, enq.stderr
    task_id = enq.stdout.strip()
    work = _run(["worker", "-A", "hello_app:registry", "--burst", "-c", "1", "-n", "cli-burst-worker"], tmp_path,
                env)
    assert work.returncode == 0, work.stderr
    status = json.loads(_run(["result", task_id, "--json"], tmp_path, env).stdout)
    assert status["state"] == "SUCCEEDED" and status["result"] == "hello cwd"
    assert status["worker"] == "cli-burst-worker" and status["queue"] == "jobs"


def test_path_adds_a_directory_to_import_the_app_from(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello_src.py").write_text(APP)
    env = {"STEM_BROKER_URL": f"sqlite:///{tmp_path}/x.db"}
    assert _run(["enqueue", "hello.greet", "-A", "hello_src:registry"], tmp_path, env).returncode == 2
    proc = _run(["enqueue", "hello.greet", "-A", "hello_src:registry", "--path", "src"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr


def test_an_app_that_cannot_be_imported_says_where_stem_looked(tmp_path):
    proc = _run(["worker", "-A", "no_such_app:registry", "--broker", f"sqlite:///{tmp_path}/x.db"], tmp_path)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "--path DIR" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_an_app_path_that_is_not_an_import_path_is_a_usage_error():
    result = invoke("worker", "-A", ":registry")
    assert result.exit_code == 2 and "package.module:attribute" in result.output


def test_python_dash_m_stem_runs_the_command():
    import sys
    proc = subprocess.run([sys.executable, "-m", "stem", "--help"], capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert proc.returncode == 0 and "Usage: stem" in proc.stdout and "enqueue" in proc.stdout
