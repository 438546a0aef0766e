"""What the commands print and exit with: exit codes, tables at 80 columns, times, the
commands Celery and RQ users look for, credentials masked."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from types import SimpleNamespace

import pytest

from stem.results import TaskState, TaskStatus

from .support import wait_for
from .test_cli import ENV, ROOT, STEM, invoke, strict_json

WORKER_ID = "cli-test-worker:4242:with-a-rather-long-id"
TASK_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/cli.db"


def _broker(url):
    from stem.brokers import from_url
    return from_url(url)


def _backend(url):
    from stem.backends import from_url
    return from_url(url)


@pytest.fixture
def live(url):
    """A worker in this process (inline: threads, no fork) on a SQLite file the commands share."""
    from stem import Worker, WorkerLifecycleConfig

    from .apps.tasks import registry
    w = Worker(url, url, registry, isolation="inline", concurrency=2, heartbeat_interval=0.2, worker_id=WORKER_ID,
               lifecycle=WorkerLifecycleConfig(install_signal_handlers=False)).run_in_background()
    backend = _backend(url)
    try:
        wait_for(lambda: backend.heartbeats(), timeout=30, what="the worker's first heartbeat")
        yield SimpleNamespace(url=url, worker=w, backend=backend)
    finally:
        w.shutdown(timeout=30)
        backend.close()


def _enqueue(url, name, args=None):
    from stem import Stem
    with Stem(url, url) as stem:
        return stem.enqueue(name, args)


def _narrow(output):
    """The output is usable at 80 columns: nothing elided, no line wider."""
    assert "…" not in output, output
    assert all(len(line) <= 80 for line in output.splitlines()), output


# -- options given to the `worker` group before a subcommand --------------------------------------
def test_the_groups_broker_before_a_subcommand_is_honoured(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # without it the command would fall back to ./stem.db
    with _backend(url) as backend:
        backend.put_heartbeat("w-group", {"queues": ["default"], "heartbeat_interval": 1.0}, ttl=60)
    result = invoke("worker", "--broker", url, "status", "--json")
    assert result.exit_code == 0, result.output
    assert [w["id"] for w in json.loads(result.stdout)["workers"]] == ["w-group"]


def test_worker_run_options_before_a_subcommand_are_refused():
    result = invoke("worker", "-c", "3", "--burst", "ping")
    assert result.exit_code == 2 and "--concurrency, --burst" in result.output


# -- exit codes -----------------------------------------------------------------------------------
def test_pausing_a_queue_no_worker_consumes_exits_1(live):
    result = invoke("worker", "pause", "nosuchq", "--broker", live.url, "--timeout", "10")
    assert result.exit_code == 1, result.output
    assert "1 of 1 worker(s) refused" in result.stderr and "nosuchq" in result.stderr


def test_a_control_reply_reads_as_text_not_a_python_repr(live):
    result = invoke("worker", "pause", "default", "--broker", live.url, "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{WORKER_ID}: paused: default\n"
    assert invoke("worker", "resume", "default", "--broker", live.url, "--timeout", "10").exit_code == 0


def test_replaying_a_dead_letter_id_that_does_not_exist_exits_1(url):
    _enqueue(url, "apps.add")   # the queue exists, its DLQ is empty
    result = invoke("dlq", "replay", "--id", "99", "--yes", "--broker", url)
    assert result.exit_code == 1 and "no entry with that id" in result.stderr


def test_revoking_an_id_without_a_status_warns_and_exits_1_unless_forced(url):
    unknown = invoke("worker", "revoke", "no-such-task", "--broker", url)
    assert unknown.exit_code == 1 and "no status for no-such-task" in unknown.stderr and "--force" in unknown.stderr
    assert invoke("worker", "revoke", "no-such-task", "--force", "--broker", url).exit_code == 0
    with _backend(url) as backend:
        backend.store(TaskStatus(id="running-task", state=TaskState.RUNNING))
        assert invoke("worker", "revoke", "running-task", "--broker", url).exit_code == 0
        assert backend.revoked(["no-such-task", "running-task"]) == {"no-such-task", "running-task"}


@pytest.mark.parametrize("args", [
    ("queues", "--broker", "nope"), ("queues", "--broker", ""), ("queues", "--backend", ""),
    ("queues", "--broker", "redis://host:notaport/0"), ("enqueue", "x.y", "-q", "a b"),
    ("worker", "-A", "m:registry", "-Q", ""), ("worker", "-A", "m:registry", "-Q", "a b"),
    ("worker", "pause", "a b"), ("purge", "a b", "--yes"), ("dlq", "list", "-q", ""),
    ("enqueue", "bad name!"), ("enqueue", "ok.name\n"),
], ids=repr)
def test_a_bad_queue_name_url_or_task_name_is_a_usage_error(args, url):
    env = {"STEM_BROKER_URL": url}
    result = invoke(*args, env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    with _broker(url) as broker:
        assert broker.queues() == []   # nothing was published


# -- output at 80 columns, in a pipe --------------------------------------------------------------
def test_stats_status_and_ping_keep_worker_ids_whole_at_80_columns(live):
    for command in (("worker", "stats"), ("worker", "status"), ("worker", "ping")):
        result = invoke(*command, "--broker", live.url, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert WORKER_ID in result.stdout, result.stdout
        _narrow(result.stdout)


def test_inspect_shows_how_long_ago_a_task_started_not_an_epoch_float(live):
    _enqueue(live.url, "apps.sleep", {"seconds": 1.5})

    def running():
        out = invoke("worker", "inspect", "--broker", live.url, "--json", "--timeout", "10")
        return out.exit_code == 0 and json.loads(out.stdout)[0]["reply"]["running"]
    wait_for(running, timeout=30, what="the task to run")
    result = invoke("worker", "inspect", "--broker", live.url, "--timeout", "10", env={"COLUMNS": "80"})
    assert result.exit_code == 0 and " s ago" in result.stdout and "apps.sleep" in result.stdout, result.output
    assert not re.search(r"\d{9,}\.\d", result.stdout), result.stdout
    _narrow(result.stdout)


def test_dead_letters_show_their_task_name_and_why_they_died(live):
    task_id = _enqueue(live.url, "apps.fail")
    wait_for(lambda: (live.backend.get(task_id) or SimpleNamespace(state=None)).state is TaskState.FAILED,
             timeout=30, what="the task to fail")
    wait_for(lambda: json.loads(invoke("dlq", "list", "--json", "--broker", live.url).stdout), timeout=30,
             what="the dead letter")
    [row] = json.loads(invoke("dlq", "list", "--json", "--broker", live.url).stdout)
    assert row["task_id"] == task_id and row["name"] == "apps.fail"
    listing = invoke("dlq", "list", "--broker", live.url, env={"COLUMNS": "80"})
    assert task_id in listing.stdout and "apps.fail" in listing.stdout
    _narrow(listing.stdout)
    shown = invoke("dlq", "show", row["id"], "--broker", live.url)
    assert shown.exit_code == 0, shown.output
    for fragment in ("apps.fail", task_id, "reason       error", "signature    unsigned", "status       FAILED",
                     "planned failure", 'raise RuntimeError("planned failure")'):
        assert fragment in shown.stdout, shown.stdout
    data = strict_json(invoke("dlq", "show", row["id"], "--json", "--broker", live.url).stdout)
    assert data["name"] == "apps.fail" and data["args"] == {} and data["status"]["state"] == "FAILED"
    assert invoke("dlq", "show", "12345", "--broker", live.url).exit_code == 1


def test_a_status_table_for_many_workers_stays_usable_at_80_columns(url):
    with _backend(url) as backend:
        for i in range(3):
            backend.put_heartbeat(f"{WORKER_ID}-{i}", {
                "host": "a-host-name-of-some-length.example.internal", "pid": 123456, "queues": ["default", "mail"],
                "concurrency": 8, "processed": 123456789, "failed": 12, "heartbeat_interval": 1.0,
                "children": [{"pid": 200000 + c, "rss": 80 * 2**20} for c in range(8)]}, ttl=60)
    result = invoke("worker", "status", "--broker", url, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    for i in range(3):
        assert f"{WORKER_ID}-{i}" in result.stdout
    assert "hidden at 80 columns: " in result.stdout
    _narrow(result.stdout)


# -- --wait ---------------------------------------------------------------------------------------
def test_wait_prints_the_id_before_the_outcome_and_pending_as_pending(url):
    result = invoke("enqueue", "apps.add", "--args", '{"a": 1, "b": 2}', "--wait", "--timeout", "0.3",
                    "--broker", url)
    assert result.exit_code == 1
    first = result.stdout.splitlines()[0]
    assert TASK_ID.match(first), result.stdout
    assert f"task {first} did not finish within 0.3 s (state: PENDING)" in result.stderr
    as_json = invoke("enqueue", "apps.add", "--wait", "--timeout", "0.3", "--json", "--broker", url)
    task_id = as_json.stderr.splitlines()[0].removeprefix("enqueued ")
    assert TASK_ID.match(task_id) and strict_json(as_json.stdout) == {**strict_json(as_json.stdout),
                                                                      "id": task_id, "state": "PENDING"}


# -- non-finite numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("--countdown", "inf"), ("--countdown", "nan"), ("--countdown", "-1"), ("--wait", "--timeout", "nan"),
    ("--eta", "inf"), ("--eta", "nan"), ("--eta", "tomorrow"),
    ("--args", '{"a": NaN}'), ("--args", '{"a": Infinity}'), ("--args", '{"a": 1e400}'),
    ("--meta", '{"a": -Infinity}'), ("--args", "[1, 2]"),
], ids=" ".join)
def test_non_finite_numbers_and_bad_json_are_refused_before_publishing(args, url):
    result = invoke("enqueue", "apps.add", *args, "--broker", url)
    assert result.exit_code == 2, result.output
    with _broker(url) as broker:
        assert broker.queues() == []


def test_worker_durations_must_be_finite():
    result = invoke("worker", "-A", "tests.apps.tasks:registry", "--heartbeat-interval", "nan")
    assert result.exit_code == 2 and "finite" in result.output


def test_json_output_stays_json_when_a_result_is_not_finite(url):
    with _backend(url) as backend:
        backend.store(TaskStatus(id="nan-task", state=TaskState.SUCCEEDED, result=[float("nan"), float("inf")]))
    result = invoke("result", "nan-task", "--json", "--broker", url)
    assert strict_json(result.stdout)["result"] == ["NaN", "Infinity"]


# -- the embedded SQLite fallback is announced by every command that takes it ---------------------
@pytest.mark.parametrize("command", [("queues",), ("dlq", "list"), ("enqueue", "x.y"), ("result", "abc"),
                                     ("worker", "status"), ("purge", "default", "--yes"), ("migrate",),
                                     ("worker", "revoke", "abc", "--force")], ids=" ".join)
def test_every_command_that_falls_back_to_the_embedded_sqlite_file_says_so(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    assert f"using the embedded SQLite file {tmp_path}/stem.db" in result.stderr


# -- credentials ----------------------------------------------------------------------------------
def test_demo_masks_the_password_of_its_broker_url(redis_own_db_url):
    secret_url = redis_own_db_url.replace("redis://", "redis://default:s3cret-pw@")
    result = invoke("demo", "-n", "20", "-c", "1", "--isolation", "inline", "--broker", secret_url, "--json")
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert strict_json(result.stdout)["broker"].startswith("redis://default:***@")


def test_an_error_about_a_url_does_not_show_its_password():
    result = invoke("queues", "--broker", "redis://:s3cret-pw@localhost:notaport/0")
    assert result.exit_code == 2 and "s3cret-pw" not in result.output and ":***@" in result.output


# -- the commands people look for -----------------------------------------------------------------
def test_purge_asks_first_and_deletes_the_queued_tasks(url):
    ids = [_enqueue(url, "apps.add") for _ in range(2)]
    declined = invoke("purge", "default", "--broker", url, input="n\n")
    assert declined.exit_code == 1 and "delete 2 ready, 0 delayed and 0 throttled" in declined.output
    purged = invoke("purge", "default", "--yes", "--json", "--broker", url)
    assert strict_json(purged.stdout) == {"queue": "default", "purged": 2, "revoked": 2, "kept": 0, "unreadable": 0}
    with _broker(url) as broker:
        assert broker.stats("default").ready == 0
    with _backend(url) as backend:
        for task_id in ids:
            status = backend.get(task_id)
            assert (status.state, status.reason) == (TaskState.REVOKED, "purged")
    shown = invoke("purge", "default", "--yes", "--broker", url)
    assert shown.exit_code == 0 and "purged 0 task(s) from default: 0 ended REVOKED, 0 unreadable" in shown.stdout


def test_result_shows_state_error_and_traceback(url):
    with _backend(url) as backend:
        backend.store(TaskStatus(id="t-failed", state=TaskState.FAILED, name="apps.fail", error="boom",
                                 error_type="RuntimeError", traceback="Traceback (most recent call last):\nboom"))
    shown = invoke("result", "t-failed", "--broker", url)
    assert shown.exit_code == 0
    assert "state     FAILED" in shown.stdout and "error     boom" in shown.stdout and "Traceback" in shown.stdout
    assert strict_json(invoke("result", "t-failed", "--json", "--broker", url).stdout)["state"] == "FAILED"
    assert invoke("result", "t-failed", "--wait", "--broker", url).exit_code == 1
    unknown = invoke("result", "nope", "--broker", url)
    assert unknown.exit_code == 0 and "state     PENDING" in unknown.stdout
    assert invoke("result", "nope", "--wait", "--timeout", "0.2", "--broker", url).exit_code == 1


def test_result_shows_where_a_task_came_from_and_the_arguments_the_worker_kept(url):
    with _backend(url) as backend:
        backend.store(TaskStatus(id="t-kid", state=TaskState.SUCCEEDED, name="apps.add", result=3,
                                 enqueued_at=1_700_000_000.0, started_at=1_700_000_002.0, parent_id="t-dad",
                                 root_id="t-grandpa", group_id="g-1", children=["c-1", "c-2"],
                                 args={"a": 1, "password": "***"}))
    shown = invoke("result", "t-kid", "--broker", url)
    assert shown.exit_code == 0, shown.output
    for row in ("enqueued  20", "parent    t-dad", "root      t-grandpa", "group     g-1", "children  c-1 c-2",
                'args      {"a": 1, "password": "***"}'):
        assert row in shown.stdout, shown.stdout
    data = strict_json(invoke("result", "t-kid", "--json", "--broker", url).stdout)
    assert data["args"] == {"a": 1, "password": "***"} and data["children"] == ["c-1", "c-2"]


def test_dlq_show_hides_secret_arguments_and_with_the_app_the_tasks_own(live):
    task_id = _enqueue(live.url, "apps.fail_pay", {"card": "4111-1111", "password": "hunter2", "cents": 125})
    wait_for(lambda: json.loads(invoke("dlq", "list", "--json", "--broker", live.url).stdout), timeout=30,
             what="the dead letter")
    [row] = json.loads(invoke("dlq", "list", "--json", "--broker", live.url).stdout)
    assert row["task_id"] == task_id
    plain = invoke("dlq", "show", row["id"], "--broker", live.url)
    assert plain.exit_code == 0, plain.output
    assert "hunter2" not in plain.stdout and plain.stdout.count("4111-1111") == 1   # the frame's, name rule only
    with_app = invoke("dlq", "show", row["id"], "-A", "tests.apps.tasks:registry", "--broker", live.url)
    assert with_app.exit_code == 0, with_app.output
    assert "hunter2" not in with_app.stdout and "4111-1111" not in with_app.stdout
    data = strict_json(invoke("dlq", "show", row["id"], "--json", "--broker", live.url).stdout)
    assert data["args"] == {"card": "4111-1111", "password": "***", "cents": 125}  # the frame: the name rule
    assert data["status"]["args"] == {"card": "***", "password": "***", "cents": 125}
    data = strict_json(invoke("dlq", "show", row["id"], "--json", "-A", "tests.apps.tasks:registry", "--broker",
                              live.url).stdout)
    assert data["args"] == {"card": "***", "password": "***", "cents": 125}


@pytest.mark.parametrize("eta", ["2099-01-01T00:00:00", "2099-01-01T00:00:00+00:00", "4070908800"])
def test_enqueue_eta_takes_iso_8601_or_epoch_seconds(eta, url):
    result = invoke("enqueue", "apps.add", "--eta", eta, "--broker", url)
    assert result.exit_code == 0, result.output
    with _broker(url) as broker:
        assert broker.stats("default").delayed == 1


def test_enqueue_takes_a_task_id_meta_and_args_from_a_file_or_stdin(url, tmp_path):
    from stem.envelope import decode_frame
    args_file = tmp_path / "args.json"
    args_file.write_text('{"a": 1, "b": 2}')
    by_file = invoke("enqueue", "apps.add", "--args", f"@{args_file}", "--task-id", "order-42",
                     "--meta", '{"trace": "x"}', "--broker", url)
    assert by_file.stdout == "order-42\n"
    by_stdin = invoke("enqueue", "apps.add", "--args", "-", "--broker", url, input='{"a": 3, "b": 4}')
    assert by_stdin.exit_code == 0, by_stdin.output
    with _broker(url) as broker:
        envs = [decode_frame(d.frame) for d in broker.consume(["default"], 10, 1.0)]
    assert sorted((e.id == "order-42", e.args["a"], e.meta) for e in envs) == [(False, 3, {}),
                                                                              (True, 1, {"trace": "x"})]
    missing = invoke("enqueue", "apps.add", "--args", "@/no/such/file.json", "--broker", url)
    assert missing.exit_code == 2 and "cannot read" in missing.output
    twice = invoke("enqueue", "apps.add", "--args", "-", "--meta", "-", "--broker", url, input="{}")
    assert twice.exit_code == 2 and "stdin is already read" in twice.output


def test_enqueue_unique_and_a_repeated_task_id_publish_once_and_print_the_holder(url):
    first = invoke("enqueue", "apps.add", "--args", '{"a": 1, "b": 2}', "--unique", "--broker", url)
    assert first.exit_code == 0, first.output
    again = invoke("enqueue", "apps.add", "--args", '{"b": 2, "a": 1}', "--unique", "--json", "--broker", url)
    assert again.exit_code == 0, again.output
    assert strict_json(again.stdout) == {"id": first.stdout.strip(), "duplicate": True}
    assert "duplicate: nothing published" in again.stderr
    assert invoke("enqueue", "apps.add", "--task-id", "order-7", "--broker", url).stdout == "order-7\n"
    assert invoke("enqueue", "apps.add", "--task-id", "order-7", "--broker", url).stdout == "order-7\n"
    with _broker(url) as broker:
        assert broker.stats("default").ready == 2
    bad = invoke("enqueue", "apps.add", "--unique-for", "60", "--broker", url)
    assert bad.exit_code == 2 and "--unique-for needs --unique" in bad.output


def test_help_texts_cover_every_enqueue_option_and_the_worker_limits():
    import click

    from stem.cli import main
    enqueue = main.commands["enqueue"]
    assert [p.name for p in enqueue.params if isinstance(p, click.Option) and not p.help] == []
    helps = {p.name: p.help for p in main.commands["worker"].params if isinstance(p, click.Option)}
    assert "os._exit" in helps["isolation"] and "soft time limit" in helps["isolation"]
    assert helps["max_tasks_per_child"] and helps["heartbeat_interval"] and helps["max_memory_per_child"]
    assert "os._exit" in invoke("worker", "--help").stdout


def test_bench_help_is_the_harness_help():
    proc = subprocess.run([STEM, "bench", "--help"], capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert proc.returncode == 0 and "usage: e2e.py" in proc.stdout and "--tasks" in proc.stdout


@pytest.mark.timeout(90)
def test_ctrl_c_leaves_status_watch_with_exit_0(url):
    proc = subprocess.Popen([STEM, "worker", "status", "--watch", "--broker", url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**ENV, "TTY_COMPATIBLE": "1"}, cwd=ROOT)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "stem workers" in "".join(seen), timeout=60, what="the first frame of the live view")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdout.close()
    assert "Traceback" not in "".join(seen)


def test_inspect_shows_the_queues_paused_on_each_worker(live):
    assert invoke("worker", "pause", "default", "--broker", live.url, "--timeout", "10").exit_code == 0
    try:
        out = invoke("worker", "inspect", "--broker", live.url, "--json", "--timeout", "10")
        assert out.exit_code == 0 and json.loads(out.stdout)[0]["reply"]["paused"] == ["default"], out.output
        text = invoke("worker", "inspect", "--broker", live.url, "--timeout", "10")
        assert "paused: default" in text.stdout, text.output
    finally:
        invoke("worker", "resume", "default", "--broker", live.url, "--timeout", "10")
    out = invoke("worker", "inspect", "--broker", live.url, "--json", "--timeout", "10")
    assert json.loads(out.stdout)[0]["reply"]["paused"] == []
