"""``stem schedule ...``, ``stem beat`` and ``stem worker --beat``: what they store, print and
exit with; every bad input is exit 2 with nothing stored."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from .support import ROOT, wait_for
from .test_cli import ENV, invoke, strict_json

APP = "tests.apps.sched:registry"


@pytest.fixture
def url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # a command that fell back to ./stem.db would write here
    return f"sqlite:///{tmp_path}/sched.db"


def _backend(url):
    from stem.backends import from_url
    return from_url(url)


def _records(url):
    with _backend(url) as backend:
        return backend.schedule_records()


def run(url, *args, code=0):
    result = invoke("schedule", *args, "--broker", url)
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def _add(url, sid="poll", *extra, code=0):
    return run(url, "add", sid, "--task", "chaos.tick", *(extra or ("--every", "60")), code=code)


# -- add ---------------------------------------------------------------------------------------
def test_add_stores_a_definition_every_scheduler_reads(url):
    result = run(url, "add", "nightly", "--task", "report.build", "--cron", "30 2 * * *", "--tz", "Europe/Berlin",
                 "--args", '{"day": "today"}', "--queue", "reports", "--jitter", "5", "--catch-up", "all",
                 "--max-catch-up", "3", "--overlap", "skip", "--json")
    data = strict_json(result.stdout)
    assert data["id"] == "nightly" and data["stored"] and data["next_fire_at"] > time.time()
    from stem.scheduler import decode_definition
    record = _records(url)["nightly"]
    s = decode_definition(record.definition)
    assert (s.task, s.spec.to_dict(), s.args, s.queue, s.jitter, s.catch_up, s.max_catch_up, s.overlap) == (
        "report.build", {"kind": "cron", "expr": "30 2 * * *", "tz": "Europe/Berlin"}, {"day": "today"}, "reports",
        5.0, "all", 3, "skip")
    assert not record.paused and record.last_fired is None


def test_add_every_and_at_and_the_plain_output(url):
    assert "stored schedule poll: next run" in _add(url, "poll", "--every", "30", "--anchor", "0").output
    run(url, "add", "once", "--task", "chaos.tick", "--at", "2099-01-01T00:00:00+00:00")
    run(url, "add", "once2", "--task", "chaos.tick", "--at", "4070908800")
    assert set(_records(url)) == {"poll", "once", "once2"}


@pytest.mark.parametrize("args, message", [
    (["--task", "x.y"], "exactly one of --cron, --every, --at"),
    (["--task", "x.y", "--every", "60", "--cron", "* * * * *"], "exactly one of --cron, --every, --at"),
    (["--task", "x.y", "--every", "0.5"], "must be >= 1"),
    (["--task", "x.y", "--every", "nan"], "not a finite number"),
    (["--task", "x.y", "--every", "1.0005"], "whole milliseconds"),
    (["--task", "x.y", "--every", "60", "--tz", "Europe/Berlin"], "--tz goes with --cron"),
    (["--task", "x.y", "--cron", "30 2 * *"], "five fields"),
    (["--task", "x.y", "--cron", "61 2 * * *"], "bad cron expression"),
    (["--task", "x.y", "--cron", "30 2 * * *", "--tz", "Mars/Olympus"], "unknown timezone"),
    (["--task", "x.y", "--at", "tomorrow"], "ISO 8601"),
    (["--task", "x.y", "--at", "2099-01-01T00:00:00"], "no timezone"),
    (["--task", "x.y", "--at", "inf"], "finite"),
    (["--task", "x.y", "--every", "60", "--args", "[1]"], "JSON object"),
    (["--task", "x.y", "--every", "60", "--args", "{nope"], "not JSON"),
    (["--task", "x.y", "--every", "60", "--queue", "bad queue"], "bad queue name"),
    (["--task", "x.y", "--every", "60", "--jitter", "-1"], "must be >= 0"),
    (["--task", "x.y", "--every", "60", "--catch-up", "some"], "Invalid value for '--catch-up'"),
    (["--task", "x.y", "--every", "60", "--overlap", "never"], "Invalid value for '--overlap'"),
    (["--task", "x.y", "--every", "60", "--max-catch-up", "0"], "--max-catch-up"),
    (["--task", "x.y", "--every", "60", "--anchor", "soon"], "--anchor"),
    (["--task", "x.y", "--cron", "* * * * *", "--anchor", "0"], "--anchor goes with --every"),
    (["--task", "x.y", "--every", "60", "--start-at", "200", "--end-at", "100"], "end_at"),
    (["--task", "", "--every", "60"], "--task"),
    (["--task", "no spaces allowed", "--every", "60"], "task name"),
])
def test_every_bad_add_is_a_usage_error_and_stores_nothing(url, args, message):
    result = run(url, "add", "bad", *args, code=2)
    assert message in result.output, result.output
    assert "bad" not in (_records_safe(url) or {})


def _records_safe(url):
    try:
        return _records(url)
    except Exception:   # noqa: BLE001 - the file was never created: nothing stored
        return None


def test_a_bad_schedule_id_is_a_usage_error(url):
    result = run(url, "add", "no spaces", "--task", "x.y", "--every", "60", code=2)
    assert "bad schedule id" in result.output
    assert "bad schedule id" in run(url, "pause", "x" * 129, code=2).output


def test_add_refuses_an_id_already_stored_unless_replace_and_keeps_the_state(url):
    _add(url, "poll")
    with _backend(url) as backend:
        backend.mark_fired("poll", 1000.0, "sched:poll:1000000")
        backend.pause_schedule("poll", True)
    assert "already stored" in _add(url, "poll", "--every", "30", code=2).output
    data = strict_json(_add(url, "poll", "--every", "30", "--replace", "--json").stdout)
    assert data["replaced"] is True
    record = _records(url)["poll"]
    assert record.paused and record.last_fired == 1000.0


def test_add_with_an_app_checks_the_task_and_refuses_a_code_schedules_id(url):
    assert "did you mean 'chaos.tick'" in run(url, "add", "p", "--task", "chaos.tic", "--every", "60", "-A", APP,
                                              code=2).output
    assert "declared in code" in run(url, "add", "chaos-a", "--task", "chaos.tick", "--every", "60", "-A", APP,
                                     code=2).output
    assert _records_safe(url) in (None, {})


# -- list, remove, pause, resume -------------------------------------------------------------
def test_list_shows_code_and_stored_schedules_with_their_state(url):
    _add(url, "stored-one", "--cron", "0 3 * * *", "--tz", "Europe/Berlin")
    with _backend(url) as backend:
        backend.mark_fired("chaos-a", 1_700_000_000.0, "sched:chaos-a:1700000000000")
        backend.pause_schedule("stored-one", True)
    rows = {r["id"]: r for r in strict_json(run(url, "list", "-A", APP, "--json").stdout)}
    assert set(rows) == {"chaos-a", "chaos-b", "stored-one"}
    assert rows["chaos-a"]["source"] == "code" and rows["chaos-a"]["last_fired"] == 1_700_000_000.0
    assert rows["stored-one"]["source"] == "stored" and rows["stored-one"]["paused"] is True
    assert rows["stored-one"]["spec"] == {"kind": "cron", "expr": "0 3 * * *", "tz": "Europe/Berlin"}
    assert rows["chaos-b"]["next_fire_at"] > time.time() - 1
    table = run(url, "list", "-A", APP).output
    assert "stored-one" in table and "cron 0 3 * * *" in table and "(Europe/Berlin)" in table
    assert "every 1s" in table and "+01:00" in table
    # without -A: the code schedule's record shows as state only
    rows = {r["id"]: r for r in strict_json(run(url, "list", "--json").stdout)}
    assert rows["chaos-a"]["source"] == "state only" and rows["chaos-a"]["task"] is None


def test_list_with_nothing_says_so(url):
    assert "no schedules" in run(url, "list").output
    assert strict_json(run(url, "list", "--json").stdout) == []


def test_remove_drops_a_stored_schedule_and_an_unknown_id_is_a_usage_error(url):
    _add(url, "poll")
    assert "removed schedule poll" in run(url, "remove", "poll").output
    assert _records(url) == {}
    assert "no schedule 'poll' is stored" in run(url, "remove", "poll", code=2).output


def test_pause_and_resume_a_stored_schedule(url):
    _add(url, "poll")
    assert "paused schedule poll" in run(url, "pause", "poll").output
    assert _records(url)["poll"].paused
    assert "already paused" in run(url, "pause", "poll").output
    assert strict_json(run(url, "resume", "poll", "--json").stdout) == {"id": "poll", "paused": False,
                                                                       "changed": True}
    assert not _records(url)["poll"].paused


def test_pause_a_code_schedule_needs_the_app_before_it_ever_fired(url):
    result = run(url, "pause", "chaos-a", code=2)
    assert "no schedule 'chaos-a'" in result.output and "-A" in result.output
    assert _records_safe(url) in (None, {})
    run(url, "pause", "chaos-a", "-A", APP)
    record = _records(url)["chaos-a"]
    assert record.paused and record.definition is None


def test_pause_an_unknown_id_stores_nothing(url):
    _add(url, "poll")
    assert "known: poll" in run(url, "pause", "nope", code=2).output
    assert set(_records(url)) == {"poll"}


# -- run-now, dry-run --------------------------------------------------------------------------
def test_run_now_enqueues_one_extra_run_under_its_own_id(url):
    _add(url, "poll", "--every", "3600", "--args", '{"n": 7}', "--queue", "polls")
    first = run(url, "run-now", "poll").output.strip()
    second = strict_json(run(url, "run-now", "poll", "--json").stdout)["id"]
    assert first.startswith("sched:poll:now:") and second.startswith("sched:poll:now:") and first != second
    from stem.brokers import from_url
    with from_url(url) as broker:
        leased = broker.consume(["polls"], 10, 0.0)
    assert sorted(d.task_id for d in leased) == sorted([first, second])
    assert _records(url)["poll"].last_fired is None          # the schedule's own runs are untouched
    assert "no schedule 'nope'" in run(url, "run-now", "nope", code=2).output


def test_run_now_of_a_code_schedule(url):
    task_id = run(url, "run-now", "chaos-b", "-A", APP).output.strip()
    assert task_id.startswith("sched:chaos-b:now:")


def test_dry_run_prints_fire_times_in_the_zone_across_both_dst_changes(url):
    _add(url, "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Berlin")
    out = run(url, "dry-run", "nightly", "--from", "2026-03-27T12:00:00+00:00", "--until",
              "2026-03-31T00:00:00+00:00").output.split()
    assert out == ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    data = strict_json(run(url, "dry-run", "nightly", "--from", "2026-10-24T12:00:00+00:00", "--until",
                           "2026-10-27T00:00:00+00:00", "--json").stdout)
    assert [r["local"] for r in data["fire_times"]] == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    assert data["tz"] == "Europe/Berlin" and data["truncated"] is False


def test_dry_run_limits_and_refuses_bad_bounds(url):
    _add(url, "fast", "--every", "1")
    out = run(url, "dry-run", "fast", "--until", str(time.time() + 3600), "--limit", "3").output
    assert len(out.splitlines()) == 4 and "--limit" in out
    assert "must be after" in run(url, "dry-run", "fast", "--until", "2000-01-01T00:00:00+00:00", code=2).output
    assert "--until" in run(url, "dry-run", "fast", "--until", "whenever", code=2).output
    assert "Missing option '--until'" in run(url, "dry-run", "fast", code=2).output
    assert "no schedule 'slow'" in run(url, "dry-run", "slow", "--until", str(time.time() + 60), code=2).output


# -- stem beat, stem worker --beat --------------------------------------------------------------
def test_beat_needs_an_app_and_refuses_bad_options(url):
    assert invoke("beat", "--broker", url).exit_code == 2
    assert "cannot load the task registry" in invoke("beat", "-A", "nope.mod:registry", "--broker", url).output
    assert invoke("beat", "-A", APP, "--broker", url, "--tick", "0").exit_code == 2
    assert invoke("beat", "-A", APP, "--broker", url, "--grace", "0").exit_code == 2
    assert invoke("worker", "-A", APP, "--broker", url, "--beat", "--no-results").exit_code == 2
    assert invoke("worker", "-A", APP, "--broker", url, "--beat", "--burst").exit_code == 2
    assert "--beat" in invoke("worker", "--beat", "ping").output


def _popen(args, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "stem", *args], cwd=ROOT, env=ENV, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    return proc


@pytest.mark.timeout(90)
def test_beat_fires_stored_and_code_schedules_shows_in_status_and_stops_on_sigterm(url, tmp_path):
    _add(url, "stored", "--every", "1", "--queue", "beat-q")
    proc = _popen(["beat", "-A", APP, "--broker", url, "--tick", "0.2", "--heartbeat-interval", "0.5", "-n",
                   "beat-cli"], tmp_path, "beat")
    try:
        wait_for(lambda: (_records(url).get("stored") or _records(url)["stored"]).last_fired is not None
                 and _records(url).get("chaos-a") is not None, timeout=30, what="runs of stored and code schedules")
        status = invoke("worker", "status", "--broker", url, "--json")
        wait_for(lambda: any(w["id"] == "beat-cli" for w in json.loads(
            invoke("worker", "status", "--broker", url, "--json").stdout)["workers"]), timeout=20,
                 what="the scheduler in stem worker status")
        rows = json.loads(invoke("worker", "status", "--broker", url, "--json").stdout)["workers"]
        row, = [w for w in rows if w["id"] == "beat-cli"]
        assert row["kind"] == "scheduler" and row["schedules"] == 3, (row, status.output)
        table = invoke("worker", "status", "--broker", url).output
        assert "beat-cli" in table and "scheduler: 3" in table
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, (tmp_path / "beat.log").read_text()
    with _backend(url) as backend:
        assert not any(h["worker_id"] == "beat-cli" for h in backend.heartbeats())


@pytest.mark.timeout(90)
def test_worker_beat_runs_the_scheduled_tasks_and_stops_with_the_worker(url, tmp_path):
    proc = _popen(["worker", "-A", APP, "--broker", url, "--beat", "--isolation", "inline", "-c", "1", "-Q",
                   "sched-chaos", "--heartbeat-interval", "0.5", "-n", "wb"], tmp_path, "worker")
    try:
        def succeeded():
            with _backend(url) as backend:
                record = backend.schedule_records().get("chaos-a")
                status = record and backend.get(record.last_run_id)
                return status is not None and status and status.state.value == "SUCCEEDED"
        wait_for(succeeded, timeout=40, what="a scheduled run to succeed on the worker")
        def kinds():
            with _backend(url) as backend:
                return {h.get("kind", "worker") for h in backend.heartbeats()}
        # the scheduler beats after its first pass, which a fast worker may outrun
        wait_for(lambda: kinds() == {"worker", "scheduler"}, timeout=20, what="the worker's and its scheduler's "
                 "heartbeats")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
    assert code == 0, (tmp_path / "worker.log").read_text()
    with _backend(url) as backend:
        assert backend.heartbeats() == []
