"""``stem wf list|show|send|cancel|reset|retry`` over a SQLite file the test's runs live in."""

from __future__ import annotations

import pytest

from stem import Stem
from stem.results import TaskState
from stem.workflows import StepRetry

from .test_cli import invoke, strict_json
from .wf_support import App


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/wf.db"


class _Store:
    def __init__(self, url):
        self.url = url

    def broker(self):
        from stem.brokers import from_url
        return from_url(self.url)

    def backend(self):
        from stem.backends import from_url
        return from_url(self.url)


@pytest.fixture
def app(url):
    app = App(store=_Store(url))
    fixed = {"yes": False}

    @app.wf.step(name="fragile", retry=StepRetry(1))
    def fragile(ctx):
        if not fixed["yes"]:
            raise RuntimeError("not yet")
        return "fixed"

    @app.wf.workflow("cli.waits")
    def waits(ctx):
        ctx.now()
        return ctx.wait("go")

    @app.wf.workflow("cli.fails")
    def fails(ctx):
        return fragile(ctx)

    app.fixed = fixed
    yield app
    app.broker.close()
    app.backend.close()


def _run(app, name, run_id):
    app.wf.start(app.stem, name, run_id=run_id)
    return app.activate(run_id)


def test_list_shows_runs_filters_them_pages_them_and_prints_json(app, url):
    assert "no workflow runs" in invoke("wf", "list", "--broker", url).output
    assert _run(app, "cli.waits", "a-run") == "parked"
    assert _run(app, "cli.fails", "b-run") == "failed"
    out = invoke("wf", "list", "--broker", url)
    assert out.exit_code == 0, out.output
    assert "a-run" in out.output and "PARKED" in out.output and "b-run" in out.output and "FAILED" in out.output
    rows = strict_json(invoke("wf", "list", "--status", "failed", "--json", "--broker", url).output)
    assert [(r["id"], r["workflow"], r["status"]) for r in rows] == [("b-run", "cli.fails", "FAILED")]
    page = strict_json(invoke("wf", "list", "--limit", 1, "--json", "--broker", url).output)
    assert [r["id"] for r in page] == ["a-run"]
    assert "next page: --after a-run" in invoke("wf", "list", "--limit", 1, "--broker", url).output
    after = strict_json(invoke("wf", "list", "--after", "a-run", "--json", "--broker", url).output)
    assert [r["id"] for r in after] == ["b-run"]
    named = strict_json(invoke("wf", "list", "--name", "cli.waits", "--json", "--broker", url).output)
    assert [r["id"] for r in named] == ["a-run"]
    assert invoke("wf", "list", "--status", "SLEEPING", "--broker", url).exit_code == 2


def test_show_prints_the_run_its_journal_and_its_events(app, url):
    assert _run(app, "cli.waits", "s1") == "parked"
    app.wf.send(app.stem, "s1", "other", {"k": 1}, event_id="ev-1")
    out = invoke("wf", "show", "s1", "--broker", url)
    assert out.exit_code == 0, out.output
    for text in ("cli.waits (version 1)", "PARKED", "journal", "now", "wait", "go", "inbox", "other", "ev-1"):
        assert text in out.output, text
    data = strict_json(invoke("wf", "show", "s1", "--json", "--broker", url).output)
    assert [(e["position"], e["kind"], e["name"]) for e in data["journal"]] == [(0, "now", "now"), (1, "wait", "go")]
    assert data["waiting"]["kind"] == "wait" and data["events"][0]["payload"] == {"k": 1}
    missing = invoke("wf", "show", "nope", "--broker", url)
    assert missing.exit_code == 1 and "no workflow run 'nope'" in missing.output


def test_send_stores_an_event_once_and_refuses_bad_json_unknown_and_finished_runs(app, url):
    assert _run(app, "cli.waits", "w1") == "parked"
    out = invoke("wf", "send", "w1", "go", '{"ok": true}', "--event-id", "e1", "--broker", url)
    assert out.exit_code == 0 and "sent go to w1" in out.output
    again = invoke("wf", "send", "w1", "go", '{"ok": true}', "--event-id", "e1", "--json", "--broker", url)
    assert strict_json(again.output)["stored"] is False
    assert app.activate("w1") == "succeeded"
    assert app.stem.get_status("w1").result == {"ok": True}
    assert invoke("wf", "send", "w1", "go", "{oops", "--broker", url).exit_code == 2
    assert invoke("wf", "send", "w1", "__call__", "1", "--broker", url).exit_code == 2
    unknown = invoke("wf", "send", "ghost", "go", "--broker", url)
    assert unknown.exit_code == 1 and "no workflow run 'ghost'" in unknown.output
    finished = invoke("wf", "send", "w1", "go", "2", "--broker", url)
    assert finished.exit_code == 1 and "ended SUCCEEDED" in finished.output


def test_cancel_ends_a_run_cancelled_and_its_status_revoked(app, url):
    assert _run(app, "cli.waits", "c1") == "parked"
    out = invoke("wf", "cancel", "c1", "--broker", url)
    assert out.exit_code == 0 and "c1: cancelled; now CANCELLED" in out.output
    with Stem(url, url) as stem:
        status = stem.get_status("c1")
    assert status.state is TaskState.REVOKED and status.reason == "cancelled"
    assert invoke("wf", "cancel", "nope", "--broker", url).exit_code == 1


def test_reset_asks_first_then_runs_the_run_again_from_the_position(app, url):
    assert _run(app, "cli.waits", "r1") == "parked"
    declined = invoke("wf", "reset", "r1", "--to", 1, "--broker", url, input="n\n")
    assert declined.exit_code == 1 and "nothing reset" in declined.output
    assert invoke("wf", "reset", "r1", "--to", 7, "--yes", "--broker", url).exit_code == 2
    assert invoke("wf", "reset", "r1", "--to", -1, "--yes", "--broker", url).exit_code == 2
    out = invoke("wf", "reset", "r1", "--to", 1, "--yes", "--json", "--broker", url)
    assert strict_json(out.output) == {"run": "r1", "status": "PENDING", "position": 1}
    assert [e.kind for e in app.journal("r1")] == ["now"]
    assert app.broker.stats("default").ready >= 1          # the reset's wake-up is queued


def test_retry_runs_a_failed_run_again_from_its_failing_step(app, url):
    assert _run(app, "cli.fails", "f1") == "failed"
    assert invoke("wf", "retry", "f1", "--broker", url).output.startswith("f1: retried from position 0; now PENDING")
    app.fixed["yes"] = True
    assert app.activate("f1") == "succeeded"
    assert app.stem.get_status("f1").result == "fixed"
    refused = invoke("wf", "retry", "f1", "--broker", url)
    assert refused.exit_code == 2 and "retry takes a FAILED run" in refused.output
