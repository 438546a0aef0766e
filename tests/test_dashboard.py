"""The web dashboard through Starlette's TestClient: every page, every action and every way
a request is refused, on the memory adapters, SQLite, Redis and Postgres.  The browser suite
(``test_dashboard_browser.py``) drives the same app in a real Chromium."""

from __future__ import annotations

import base64
import re
import time
import uuid

import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed: pip install 'stem-queue[dashboard]'")
pytest.importorskip("jinja2", reason="the dashboard extra is not installed: pip install 'stem-queue[dashboard]'")
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from stem import PayloadSigner, TaskOptions, TaskRegistry, Worker, WorkerLifecycleConfig  # noqa: E402
from stem.backends import InMemoryResultBackend  # noqa: E402
from stem.brokers import InMemoryBroker  # noqa: E402
from stem.brokers.base import Message  # noqa: E402
from stem.dashboard import app, default_redact  # noqa: E402
from stem.envelope import Envelope, encode_frame  # noqa: E402
from stem.errors import BrokerConnectionError, ConfigurationError  # noqa: E402
from stem.results import TaskState, TaskStatus, encode_status  # noqa: E402
from stem.scheduler import encode_definition  # noqa: E402
from stem.schedules import Schedule, every  # noqa: E402
from stem.status import worker_rows  # noqa: E402

from .support import wait_for  # noqa: E402

SCRIPT = "<script>alert('pwned')</script>"
ESCAPED = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"
ACTIONS = [("/workers/pause", {"queue": "default"}), ("/workers/resume", {"queue": "default"}),
           ("/workers/grow", {"n": "1"}), ("/workers/shrink", {"n": "1"}),
           ("/workers/shutdown", {"worker": "w"}), ("/tasks/revoke", {"task_id": "t"}),
           ("/dead-letters/default/replay", {"all": "1"}), ("/dead-letters/default/purge", {}),
           ("/schedules/nightly/pause", {}), ("/schedules/nightly/resume", {})]


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def stores(request):
    """(broker, backend): the memory adapters, one SQLite file, Redis under a namespace of the
    test's own, or a Postgres schema of its own (dropped afterwards)."""
    if request.param == "memory":
        broker, backend = InMemoryBroker(), InMemoryResultBackend()
    elif request.param == "sqlite":
        from stem.backends import from_url as backend_from_url
        from stem.brokers import from_url as broker_from_url
        url = f"sqlite:///{request.getfixturevalue('tmp_path') / 'stem.db'}"
        broker, backend = broker_from_url(url), backend_from_url(url)
    elif request.param == "redis":
        from stem.backends import RedisResultBackend
        from stem.brokers import RedisBroker
        url = request.getfixturevalue("redis_url")
        ns = request.getfixturevalue("namespace")
        broker, backend = RedisBroker(url, namespace=ns), RedisResultBackend(url, namespace=ns)
    else:
        from stem.backends.postgres import PostgresResultBackend
        from stem.brokers.postgres import PostgresBroker
        url = request.getfixturevalue("postgres_url")
        schema = f"{request.getfixturevalue('namespace')}_dash"

        def drop():
            import psycopg
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        request.addfinalizer(drop)
        broker, backend = PostgresBroker(url, schema=schema), PostgresResultBackend(url, schema=schema)
    yield broker, backend
    broker.close()
    backend.close()


def client_of(asgi, **kw) -> TestClient:
    return TestClient(asgi, **kw)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert m, "the page has no CSRF field"
    return m.group(1)


def post_action(client: TestClient, page: str, action: str, data: dict, *, confirmed: bool = True):
    token = csrf_of(client.get(page).text)
    body = {**data, "csrf_token": token, **({"confirmed": "1"} if confirmed else {})}
    return client.post(action, data=body)


def heartbeat(backend, worker_id: str, *, interval: float = 10.0, **fields) -> None:
    data = {"host": "host-a", "pid": 4242, "queues": ["default"], "concurrency": 2, "heartbeat_interval": interval,
            "processed": 7, "succeeded": 5, "failed": 2, "running": 1, "in_flight": 1,
            "children": [{"pid": 4243, "state": "busy", "rss": 50 * 2**20, "tasks_done": 3, "running": 1}],
            **fields}
    backend.put_heartbeat(worker_id, data, ttl=60)


def dead_letter(broker, queue: str, name: str = "job.fail", args: dict | None = None, reason: str = "failed",
                task_id: str | None = None) -> str:
    """A real dead letter: published, leased, dead-lettered with ``reason``."""
    env = Envelope(id=task_id or uuid.uuid4().hex, name=name, args=args or {}, queue=queue, enqueued_at=time.time())
    broker.publish(Message(env.id, queue, encode_frame(env)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for d in broker.consume([queue], 10, 0.2):
            if d.task_id == env.id:
                broker.dead_letter(d, reason)
                return env.id
            broker.nack(d)
    raise AssertionError("the message never came back to be dead-lettered")


# -- pages ----------------------------------------------------------------------------------------
def test_overview_shows_workers_queues_and_lost_workers(stores):
    broker, backend = stores
    heartbeat(backend, "host-a:4242:alive")
    heartbeat(backend, "host-b:99:gone", interval=0.01, host="host-b", pid=99)   # lost 0.03 s later
    wait_for(lambda: any(r["lost"] for r in worker_rows(backend)), 5, "the second worker to count as lost")
    broker.publish(Message("m1", "emails", b"x"))
    broker.publish(Message("m2", "emails", b"y", not_before=time.time() + 3600))
    dead_letter(broker, "reports")
    client = client_of(app(broker, backend))
    html = client.get("/").text
    assert "host-a:4242:alive" in html and "host-b:99:gone" in html
    assert re.search(r'class="worker lost" data-worker="host-b:99:gone"', html)
    assert "50 MiB" in html and "4243" in html
    data = client.get("/api/overview").json()
    by_id = {w["id"]: w for w in data["workers"]}
    assert by_id["host-a:4242:alive"]["lost"] is False and by_id["host-b:99:gone"]["lost"] is True
    queues = {q["queue"]: q for q in data["queues"]}
    assert queues["emails"]["ready"] == 1 and queues["emails"]["delayed"] == 1
    assert queues["reports"]["dead"] == 1
    assert data["totals"]["workers"] == 2 and data["totals"]["lost"] == 1 and data["totals"]["succeeded"] == 10


def test_the_live_fragment_carries_the_counters_the_chart_differentiates(stores):
    broker, backend = stores
    heartbeat(backend, "w1", succeeded=11, failed=3)
    broker.publish(Message("m1", "default", b"x"))
    r = client_of(app(broker, backend)).get("/overview/live")
    assert r.status_code == 200 and "<html" not in r.text
    assert 'data-worker="w1"' in r.text and 'data-succeeded="11"' in r.text and 'data-failed="3"' in r.text
    assert re.search(r'data-seen="\d+\.\d+"', r.text)
    assert 'data-queue="default" data-ready="1" data-dead="0"' in r.text


def test_control_plane_queues_are_not_listed(stores):
    broker, backend = stores
    broker.publish(Message("m1", "stem.control.someone", b"x"))
    broker.publish(Message("m2", "visible", b"x"))
    data = client_of(app(broker, backend)).get("/api/overview").json()
    assert [q["queue"] for q in data["queues"]] == ["visible"]


def test_task_page_shows_the_status_and_renders_a_script_result_as_text(stores):
    broker, backend = stores
    now = time.time()
    backend.store(TaskStatus(id="t-ok", state=TaskState.SUCCEEDED, name="echo", queue="default", attempt=1,
                             result={"html": SCRIPT}, started_at=now - 2.5, finished_at=now - 0.5,
                             worker="host-a:1:x", progress=1.0, meta={"by": SCRIPT}))
    html = client_of(app(broker, backend)).get("/tasks/t-ok").text
    backend.store(TaskStatus(id="odd?id#1", state=TaskState.SUCCEEDED, name="echo", queue="default", result=1))
    assert client_of(app(broker, backend)).get("/tasks/odd%3Fid%231").status_code == 200
    assert SCRIPT not in html
    assert ESCAPED in html
    assert "SUCCEEDED" in html and "echo" in html and "host-a:1:x" in html
    assert "2.0 s" in html      # ran
    assert 'id="task-result"' in html


def test_task_page_shows_error_and_traceback_escaped(stores):
    broker, backend = stores
    backend.store(TaskStatus(id="t-bad", state=TaskState.FAILED, name="job", queue="default",
                             error=SCRIPT, error_type="ValueError", traceback=f"Traceback ...\n  {SCRIPT}\n"))
    html = client_of(app(broker, backend)).get("/tasks/t-bad").text
    assert SCRIPT not in html and html.count(ESCAPED) == 2
    assert "ValueError" in html and 'id="task-traceback"' in html and 'id="task-result"' not in html


def test_task_page_of_a_dead_letter_shows_its_arguments_redacted(stores):
    broker, backend = stores
    tid = dead_letter(broker, "default", "mail.send", {"to": "a@b.c", "password": "hunter2",
                                                      "nested": {"api_key": "k-123"}})
    backend.store(TaskStatus(id=tid, state=TaskState.FAILED, name="mail.send", queue="default", error="boom"))
    html = client_of(app(broker, backend)).get(f"/tasks/{tid}").text
    assert "a@b.c" in html and "hunter2" not in html and "k-123" not in html and "***" in html
    assert "dead letter" in html and "failed" in html

    def hide_everything(name, value):
        return "(hidden for " + name + ")"
    html = client_of(app(broker, backend, redact=hide_everything)).get(f"/tasks/{tid}").text
    assert "a@b.c" not in html and "(hidden for mail.send)" in html


def test_task_page_shows_where_a_task_came_from_and_the_arguments_the_worker_kept(stores):
    broker, backend = stores
    now = time.time()
    backend.store(TaskStatus(id="t-kid", state=TaskState.SUCCEEDED, name="mail.send", queue="default", result=1,
                             enqueued_at=now - 10.0, started_at=now - 4.0, finished_at=now - 3.5,
                             parent_id="t-dad", root_id="t-grandpa", group_id="g-1", children=["c-1", "odd?c#2"],
                             args={"to": "a@b.c", "password": "***", "body": SCRIPT}))
    client = client_of(app(broker, backend))
    html = client.get("/tasks/t-kid").text
    enqueued = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - 10.0))
    assert re.search(rf'id="task-enqueued">{enqueued} UTC<', html)
    assert 'id="task-waited">6.0 s<' in html and 'id="task-ran">500 ms<' in html
    for link in ("/tasks/t-dad", "/tasks/t-grandpa", "/tasks/g-1", "/tasks/c-1", "/tasks/odd%3Fc%232"):
        assert f'href="{link}"' in html, link
    assert 'id="task-args"' in html and "a@b.c" in html and ESCAPED in html and SCRIPT not in html
    # the app's own redact runs over what the worker kept
    html = client_of(app(broker, backend, redact=lambda name, value: f"hidden by the app for {name}")).get(
        "/tasks/t-kid").text
    assert "a@b.c" not in html and "hidden by the app for mail.send" in html


def test_a_status_without_kept_arguments_says_why(stores):
    broker, backend = stores
    backend.store(TaskStatus(id="t-old", state=TaskState.SUCCEEDED, name="job", result=1))         # an older stem
    backend.store(TaskStatus(id="t-hid", state=TaskState.SUCCEEDED, name="job", result=1, enqueued_at=time.time()))
    client = client_of(app(broker, backend))
    assert "stored for a group or chain, or by a stem that did not keep" in client.get("/tasks/t-old").text
    assert "the task&#39;s redact hook hides them" in client.get("/tasks/t-hid").text


def test_a_group_page_lists_its_members_and_a_member_links_to_its_group(stores):
    broker, backend = stores
    data = encode_frame(Envelope("g-7", "stem.canvas.group", {"up": None, "b": {"t": "s"}, "f": "fail", "n": 60}))
    assert backend.group_create("g-7", 60, data, seal_by=time.time() + 600, ttl=3600)
    backend.group_seal("g-7")
    backend.group_record("g-7", "g-7.0", 0, True, b"\x92\x01\x01")
    backend.group_record("g-7", "g-7.1", 1, False, b"\x92\x01\x01")
    backend.store(TaskStatus(id="g-7.0", state=TaskState.SUCCEEDED, name="part", result=1, group_id="g-7",
                             root_id="g-7", enqueued_at=time.time()))
    client = client_of(app(broker, backend))
    html = client.get("/tasks/g-7").text            # the chord's callback has no status yet
    assert 'id="task-state">PENDING<' in html and "Chord members" in html
    assert 'id="task-group-counts">2 of 60 finished (1 succeeded, 1 failed)' in html
    assert 'href="/tasks/g-7.0"' in html and 'href="/tasks/g-7.49"' in html and 'href="/tasks/g-7.50"' not in html
    assert "and 10 more" in html
    member = client.get("/tasks/g-7.0").text
    assert 'id="task-group" href="/tasks/g-7"' in member


def test_arguments_read_from_a_dead_letter_get_the_tasks_own_redact_with_a_registry(stores):
    broker, backend = stores
    tid = dead_letter(broker, "default", "pay", {"card": "4111-1111", "password": "hunter2", "n": 1})
    # a FAILED status without kept arguments (an older stem's): the page reads the frame
    backend.store(TaskStatus(id=tid, state=TaskState.FAILED, name="pay", queue="default", error="boom"))
    registry = TaskRegistry()
    registry.task("pay", options=TaskOptions(redact=["card"]))(lambda ctx, **kw: None)
    html = client_of(app(broker, backend)).get(f"/tasks/{tid}").text
    assert "4111-1111" in html and "hunter2" not in html          # without the registry: the name rule only
    html = client_of(app(broker, backend, registry=registry)).get(f"/tasks/{tid}").text
    assert "4111-1111" not in html and "hunter2" not in html and 'id="task-args"' in html


def test_a_secret_a_task_hides_never_reaches_the_stored_status_or_the_page():
    """End to end on the memory adapters: a worker runs the task, the page renders it."""
    registry = TaskRegistry()
    registry.task("pay", options=TaskOptions(redact=["card"]))(lambda ctx, **kw: "paid")
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    worker = Worker(broker, backend, registry, concurrency=1, isolation="inline",
                    lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    worker.run_in_background()
    try:
        from stem import Stem
        stem = Stem(broker, backend, registry)
        task_id = stem.enqueue("pay", {"card": "4111-1111", "api_token": "hunter2", "cents": 125})
        assert stem.wait_for_task(task_id, timeout=20).succeeded
    finally:
        worker.shutdown(timeout=10)
    stored = encode_status(backend.get(task_id))
    assert b"4111-1111" not in stored and b"hunter2" not in stored
    html = client_of(app(broker, backend, redact=lambda name, value: value)).get(f"/tasks/{task_id}").text
    assert "4111-1111" not in html and "hunter2" not in html and "125" in html and "***" in html


def test_default_redact_hides_secret_names_at_any_depth():
    got = default_redact("t", {"Password": 1, "list": [{"token": "x", "ok": 2}], "authorization": "b", "n": 3})
    assert got == {"Password": "***", "list": [{"token": "***", "ok": 2}], "authorization": "***", "n": 3}


def test_task_search_redirects_and_refuses_bad_ids(stores):
    broker, backend = stores
    client = client_of(app(broker, backend))
    r = client.get("/tasks", params={"id": "abc"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/tasks/abc"
    assert client.get("/tasks").status_code == 200
    r = client.get("/tasks", params={"id": "a?b#c%d"}, follow_redirects=False)
    assert r.headers["location"] == "/tasks/a%3Fb%23c%25d"
    assert client.get("/tasks", params={"id": "has space"}).status_code == 400
    assert client.get("/tasks/" + "x" * 201).status_code == 400
    r = client.get("/tasks/no-such-task")
    assert r.status_code == 404 and "no task" in r.text


def test_dead_letters_are_listed_per_queue_and_filtered(stores):
    broker, backend = stores
    a = dead_letter(broker, "default", "job.a", reason="failed")
    b = dead_letter(broker, "default", "job.b", reason="max-deliveries")
    broker.publish(Message("junk", "default", b"not a frame"))
    d = broker.consume(["default"], 1, 1.0)[0]
    broker.dead_letter(d, "decode-error")
    client = client_of(app(broker, backend))
    index = client.get("/dead-letters").text
    assert re.search(r'data-queue="default">.*?<td class="num dead-count">3</td>', index, re.S)
    html = client.get("/dead-letters/default").text
    assert a in html and b in html and "(undecodable)" in html and 'id="dead-total">3<' in html
    html = client.get("/dead-letters/default", params={"reason": "max-deliveries"}).text
    assert b in html and a not in html
    html = client.get("/dead-letters/default", params={"q": "job.a"}).text
    assert a in html and b not in html


def test_unknown_and_bad_queues_are_refused(stores):
    broker, backend = stores
    client = client_of(app(broker, backend))
    assert client.get("/dead-letters/nope").status_code == 404
    assert client.get("/dead-letters/bad%20name").status_code == 400
    r = post_action(client, "/workers", "/dead-letters/nope/replay", {"all": "1"})
    assert r.status_code == 404 and "no queue" in r.text
    r = post_action(client, "/workers", "/dead-letters/nope/purge", {})
    assert r.status_code == 404


def test_replay_one_selected_and_all_each_after_a_confirmation(stores):
    broker, backend = stores
    ids = [dead_letter(broker, "default") for _ in range(4)]
    client = client_of(app(broker, backend))
    entries = {dl.task_id: str(dl.id) for dl in broker.dead_letters("default", 10)}
    # asked first: nothing moves until the confirmation comes back
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/replay", {"id": entries[ids[0]]},
                    confirmed=False)
    assert r.status_code == 200 and 'id="confirm"' in r.text and "Replay 1 dead letter(s)" in r.text
    assert f'name="id" value="{entries[ids[0]]}"' in r.text
    assert broker.stats("default").dead == 4
    confirm = re.search(r'<form method="post" action="([^"]+)" id="confirm">(.*?)</form>', r.text, re.S)
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', confirm.group(2)))
    r = client.post(confirm.group(1), data=fields)
    assert r.status_code == 200 and "replayed 1 dead letter(s)" in r.text
    assert broker.stats("default").dead == 3
    # selected
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/replay",
                    {"id": [entries[ids[1]], entries[ids[2]]]})
    assert "replayed 2 dead letter(s)" in r.text and broker.stats("default").dead == 1
    # a selection that is gone by now says so
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/replay", {"id": entries[ids[1]]})
    assert r.status_code == 404 and "replayed 0" in r.text
    # all
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/replay", {"all": "1"})
    assert "replayed 1 dead letter(s)" in r.text and broker.stats("default").dead == 0
    assert broker.stats("default").ready == 4
    # nothing chosen
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/replay", {})
    assert r.status_code == 400


def test_purge_asks_then_drops_the_dead_letters(stores):
    broker, backend = stores
    for _ in range(3):
        dead_letter(broker, "default")
    client = client_of(app(broker, backend))
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/purge", {}, confirmed=False)
    assert "for good" in r.text and broker.stats("default").dead == 3
    r = post_action(client, "/dead-letters/default", "/dead-letters/default/purge", {})
    assert "purged 3 dead letter(s)" in r.text and broker.stats("default").dead == 0


# -- refusals ---------------------------------------------------------------------------------------
def test_a_post_without_a_valid_csrf_token_is_refused(stores):
    broker, backend = stores
    dead_letter(broker, "default")
    client = client_of(app(broker, backend))
    client.get("/")                                        # the nonce cookie is set
    r = client.post("/dead-letters/default/purge", data={"confirmed": "1"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/dead-letters/default/purge", data={"confirmed": "1", "csrf_token": "0" * 64})
    assert r.status_code == 403
    # a token from another app (another secret) is no good either
    other = client_of(app(broker, backend))
    token = csrf_of(other.get("/workers").text)
    r = client.post("/dead-letters/default/purge", data={"confirmed": "1", "csrf_token": token})
    assert r.status_code == 403
    # the token without its cookie
    fresh = client_of(app(broker, backend))
    token = csrf_of(client.get("/workers").text)
    fresh.cookies.clear()
    assert fresh.post("/dead-letters/default/purge", data={"confirmed": "1", "csrf_token": token}).status_code == 403
    assert broker.stats("default").dead == 1


def test_a_post_from_another_origin_is_refused(stores):
    broker, backend = stores
    dead_letter(broker, "default")
    client = client_of(app(broker, backend))
    token = csrf_of(client.get("/workers").text)
    r = client.post("/dead-letters/default/purge", data={"confirmed": "1", "csrf_token": token},
                    headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and broker.stats("default").dead == 1
    r = client.post("/dead-letters/default/purge", data={"confirmed": "1", "csrf_token": token},
                    headers={"origin": "http://testserver"})
    assert r.status_code == 200 and broker.stats("default").dead == 0


def test_read_only_shows_no_action_and_refuses_every_post(stores):
    broker, backend = stores
    heartbeat(backend, "w1")
    tid = dead_letter(broker, "default")
    backend.store(TaskStatus(id="running", state=TaskState.RUNNING, name="job", queue="default"))
    backend.put_schedule("nightly", encode_definition(Schedule("nightly", "job", every(3600))))
    client = client_of(app(broker, backend, read_only=True))
    for page in ("/", "/workers", "/dead-letters", "/dead-letters/default", "/schedules", "/tasks/running",
                 f"/tasks/{tid}"):
        html = client.get(page).text
        assert 'method="post"' not in html, page
        assert 'id="read-only"' in html
    token = csrf_of(client_of(app(broker, backend)).get("/workers").text)
    for path, data in ACTIONS:
        r = client.post(path, data={**data, "csrf_token": token, "confirmed": "1"})
        assert r.status_code == 403 and "read-only" in r.text, path
    assert broker.stats("default").dead == 1
    assert backend.schedule_records()["nightly"].paused is False


def test_basic_auth_refuses_missing_and_wrong_credentials(stores):
    broker, backend = stores
    client = client_of(app(broker, backend, auth="admin:s3cret-pw"))
    r = client.get("/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    for user, pw in (("admin", "wrong"), ("other", "s3cret-pw"), ("admin", "")):
        assert client.get("/", auth=(user, pw)).status_code == 401
    assert client.get("/", headers={"authorization": "Basic !!notbase64"}).status_code == 401
    assert client.get("/", headers={"authorization": "Basic " + base64.b64encode(b"nocolon").decode()}
                      ).status_code == 401
    assert client.post("/dead-letters/default/purge", data={}).status_code == 401
    assert client.get("/api/overview").status_code == 401
    assert client.get("/", auth=("admin", "s3cret-pw")).status_code == 200
    assert client.get("/static/dashboard.css").status_code == 200    # the package's own CSS, no data


def test_token_auth_takes_a_bearer_header_or_the_login_cookie(stores):
    broker, backend = stores
    token = "tok-" + uuid.uuid4().hex
    client = client_of(app(broker, backend, token=token))
    r = client.get("/")
    assert r.status_code == 401 and "/login" in r.text
    assert client.get("/", headers={"authorization": "Bearer wrong-token"}).status_code == 401
    assert client.get("/", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/login").status_code == 200
    r = client.post("/login", data={"token": "wrong-token"})
    assert r.status_code == 401 and "wrong token" in r.text
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/").status_code == 200          # the cookie now
    client.cookies.clear()
    assert client.get("/").status_code == 401


def test_login_is_not_found_without_a_token(stores):
    broker, backend = stores
    assert client_of(app(broker, backend)).get("/login").status_code == 404
    assert client_of(app(broker, backend, auth="a:b")).get("/login").status_code == 401


def test_no_page_shows_a_password_of_a_url_or_a_signing_key(stores, monkeypatch):
    broker, backend = stores
    signer = PayloadSigner({"k1": b"signing-secret-" + b"x" * 17})
    monkeypatch.setattr(broker, "url", "redis://:url-secret-pw@db.example:6379/0", raising=False)
    heartbeat(backend, "w1")
    dead_letter(broker, "default")
    client = client_of(app(broker, backend, signer=signer))
    pages = ["/", "/overview/live", "/api/overview", "/workers", "/dead-letters", "/dead-letters/default",
             "/schedules"]
    for page in pages:
        text = client.get(page).text
        assert "url-secret-pw" not in text and "signing-secret" not in text, page
    assert "redis://:***@db.example:6379/0" in client.get("/").text

    def unreachable():
        raise BrokerConnectionError("cannot reach redis://:url-secret-pw@db.example:6379/0")
    monkeypatch.setattr(broker, "queues", unreachable)
    r = client.get("/dead-letters")
    assert r.status_code == 502 and "url-secret-pw" not in r.text and "***" in r.text


def test_every_response_carries_the_security_headers(stores):
    broker, backend = stores
    client = client_of(app(broker, backend, auth="a:b"))
    for r in (client.get("/"), client.get("/", auth=("a", "b")), client.get("/static/dashboard.js")):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_unknown_pages_and_wrong_methods(stores):
    broker, backend = stores
    client = client_of(app(broker, backend))
    assert client.get("/nope").status_code == 404
    assert client.get("/workers/pause").status_code == 405
    r = post_action(client, "/workers", "/workers/explode", {})
    assert r.status_code == 404
    r = post_action(client, "/workers", "/schedules/x/explode", {})
    assert r.status_code == 404


# -- schedules ------------------------------------------------------------------------------------------
def test_schedules_show_next_fire_times_and_pause_and_resume(stores):
    broker, backend = stores
    backend.put_schedule("nightly", encode_definition(Schedule("nightly", "report.build", every(3600))))
    backend.mark_fired("nightly", 1_700_000_000.0, "nightly-run-1")
    registry = TaskRegistry()
    registry.task("job.tick")(lambda ctx: None)
    registry.schedule(Schedule("from-code", "job.tick", every(60)))
    client = client_of(app(broker, backend, registry=registry))
    html = client.get("/schedules").text
    assert "nightly" in html and "report.build" in html and "every 3600 s" in html
    assert "from-code" in html and "code" in html
    assert "2023-11-14 22:13:20 UTC" in html and "nightly-run-1" in html
    assert html.count("UTC<br>") >= 6          # three next fire times each
    r = post_action(client, "/schedules", "/schedules/nightly/pause", {}, confirmed=False)
    assert "Pause schedule" in r.text and backend.schedule_records()["nightly"].paused is False
    r = post_action(client, "/schedules", "/schedules/nightly/pause", {})
    assert r.status_code == 200 and backend.schedule_records()["nightly"].paused is True
    assert "paused" in client.get("/schedules").text
    r = post_action(client, "/schedules", "/schedules/from-code/pause", {})
    assert backend.schedule_records()["from-code"].paused is True
    r = post_action(client, "/schedules", "/schedules/nightly/resume", {})
    assert backend.schedule_records()["nightly"].paused is False
    r = post_action(client, "/schedules", "/schedules/nope/pause", {})
    assert r.status_code == 404 and "nope" not in backend.schedule_records()


# -- workers, through the control plane -------------------------------------------------------------------
@pytest.fixture
def live_worker(stores):
    broker, backend = stores
    registry = TaskRegistry()

    @registry.task("job.noop")
    def noop(ctx):
        return None
    worker = Worker(broker, backend, registry, queues=["default", "other"], concurrency=1, isolation="inline",
                    heartbeat_interval=0.2).run_in_background()
    wait_for(lambda: any(h["worker_id"] == worker.id for h in backend.heartbeats()), 10, "the worker's heartbeat")
    yield broker, backend, worker
    worker.shutdown()


def test_pause_and_resume_a_queue_on_one_worker_and_on_all(live_worker):
    broker, backend, worker = live_worker
    client = client_of(app(broker, backend))
    assert worker.id in client.get("/workers").text
    r = post_action(client, "/workers", "/workers/pause", {"queue": "other", "worker": worker.id}, confirmed=False)
    assert "Pause queue" in r.text and worker.paused_queues == []
    r = post_action(client, "/workers", "/workers/pause", {"queue": "other", "worker": worker.id})
    assert r.status_code == 200 and "1 worker(s) answered" in r.text
    assert worker.paused_queues == ["other"]
    r = post_action(client, "/workers", "/workers/resume", {"queue": "other"})
    assert r.status_code == 200 and worker.paused_queues == []


def test_grow_and_shrink_the_pool(live_worker):
    broker, backend, worker = live_worker
    client = client_of(app(broker, backend))
    r = post_action(client, "/workers", "/workers/grow", {"n": "2", "worker": worker.id})
    assert r.status_code == 200 and worker.stats()["concurrency"] == 3
    r = post_action(client, "/workers", "/workers/shrink", {"n": "1", "worker": worker.id})
    assert r.status_code == 200 and worker.stats()["concurrency"] == 2
    for bad in ("0", "-1", "two", "1001"):
        assert post_action(client, "/workers", "/workers/grow", {"n": bad}).status_code == 400


def test_revoke_with_terminate_is_stored_and_sent_to_the_workers(live_worker):
    broker, backend, worker = live_worker
    client = client_of(app(broker, backend))
    r = post_action(client, "/workers", "/tasks/revoke", {"task_id": "t-revoke-me", "terminate": "1"},
                    confirmed=False)
    assert "terminate it if it is running" in r.text and not backend.revoked(["t-revoke-me"])
    r = post_action(client, "/workers", "/tasks/revoke", {"task_id": "t-revoke-me", "terminate": "1"})
    assert r.status_code == 200 and "1 live worker(s) told" in r.text
    assert backend.revoked(["t-revoke-me"]) == {"t-revoke-me"}
    assert post_action(client, "/workers", "/tasks/revoke", {"task_id": "bad id"}).status_code == 400


def test_warm_shutdown_stops_the_worker(live_worker):
    broker, backend, worker = live_worker
    client = client_of(app(broker, backend))
    r = post_action(client, "/workers", "/workers/shutdown", {"worker": worker.id})
    assert r.status_code == 200
    wait_for(lambda: not any(h["worker_id"] == worker.id for h in backend.heartbeats()), 10, "the worker to stop")


def test_worker_actions_refuse_unknown_workers_and_bad_queues(live_worker):
    broker, backend, worker = live_worker
    client = client_of(app(broker, backend))
    r = post_action(client, "/workers", "/workers/pause", {"queue": "default", "worker": "nobody:1:x"})
    assert r.status_code == 404 and "no live worker" in r.text
    assert post_action(client, "/workers", "/workers/pause", {"queue": "bad queue!"}).status_code == 400
    assert post_action(client, "/workers", "/workers/shutdown", {}).status_code == 400
    assert post_action(client, "/workers", "/workers/shutdown", {"worker": "nobody"}).status_code == 404
    assert worker.paused_queues == []


def test_an_action_no_worker_answers_says_so(stores):
    broker, backend = stores
    client = client_of(app(broker, backend))
    r = post_action(client, "/workers", "/workers/pause", {"queue": "default"})
    assert r.status_code == 504 and "no worker replied" in r.text
    # a revocation is stored all the same: a worker started later honours it
    r = post_action(client, "/workers", "/tasks/revoke", {"task_id": "later"})
    assert r.status_code == 200 and "0 live worker(s) told" in r.text and backend.revoked(["later"])


# -- embedding, construction -----------------------------------------------------------------------------------
def test_the_app_mounts_under_a_prefix_of_a_users_asgi_app(stores):
    broker, backend = stores
    dead_letter(broker, "default")
    outer = Starlette(routes=[Mount("/ops/stem", app=app(broker, backend))])
    client = client_of(outer)
    html = client.get("/ops/stem/").text
    assert 'href="/ops/stem/workers"' in html and 'src="/ops/stem/static/dashboard.js"' in html
    assert 'data-src="/ops/stem/overview/live"' in html
    assert client.get("/ops/stem/static/dashboard.js").status_code == 200
    r = post_action(client, "/ops/stem/dead-letters/default", "/ops/stem/dead-letters/default/purge", {},
                    confirmed=False)
    assert 'action="/ops/stem/dead-letters/default/purge" id="confirm"' in r.text
    r = post_action(client, "/ops/stem/dead-letters/default", "/ops/stem/dead-letters/default/purge", {})
    assert r.status_code == 200 and broker.stats("default").dead == 0


def test_app_refuses_bad_arguments():
    broker, backend = InMemoryBroker(), InMemoryResultBackend()
    with pytest.raises(ConfigurationError, match="not both"):
        app(broker, backend, auth="a:b", token="t" * 10)
    with pytest.raises(ConfigurationError, match="user:password"):
        app(broker, backend, auth="nocolon")
    with pytest.raises(ConfigurationError, match="both non-empty"):
        app(broker, backend, auth=("a", ""))
    with pytest.raises(ConfigurationError, match="at least 8"):
        app(broker, backend, token="short")
    with pytest.raises(ConfigurationError, match="redact"):
        app(broker, backend, redact="nope")
    with pytest.raises(ConfigurationError, match="Broker"):
        app(object(), backend)
    with pytest.raises(ConfigurationError, match="result backend"):
        app(broker, None)
    with pytest.raises(ConfigurationError, match="16 bytes"):
        app(broker, backend, secret=b"short")
    with pytest.raises(ConfigurationError, match="refresh_s"):
        app(broker, backend, refresh_s=0)


def test_an_app_built_from_urls_closes_what_it_opened():
    asgi = app("memory://dash-" + uuid.uuid4().hex)
    with client_of(asgi) as client:           # runs the lifespan
        assert client.get("/").status_code == 200
        broker = asgi.dashboard.broker
    assert broker.closed


def test_the_dashboard_keeps_nothing_between_two_apps(stores):
    """What one app showed, a fresh one (a restart) shows too: it is all in the stores."""
    broker, backend = stores
    heartbeat(backend, "w1")
    dead_letter(broker, "default")
    first = client_of(app(broker, backend)).get("/api/overview").json()
    second = client_of(app(broker, backend)).get("/api/overview").json()
    for data in (first, second):
        data.pop("generated_at")
        for w in data["workers"]:
            w.pop("last_heartbeat_age")
    assert first == second


def test_a_bad_schedule_id_is_refused(stores):
    broker, backend = stores
    client = client_of(app(broker, backend))
    assert post_action(client, "/workers", "/schedules/bad%20id!/pause", {}).status_code == 400


def test_app_says_how_to_install_a_missing_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jinja2" else real(name, *a))
    with pytest.raises(ConfigurationError, match=r"jinja2: pip install 'stem-queue\[dashboard\]'"):
        app(InMemoryBroker(), InMemoryResultBackend())


# -- the command ------------------------------------------------------------------------------------------------
def _run_cli(*args: str, **env):
    from click.testing import CliRunner

    from stem.cli import main
    return CliRunner().invoke(main, ["dashboard", *args], env=env)


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--auth USER:PASSWORD or --token"),
    (["--auth", "a:b", "--token", "t" * 10], "not both"),
    (["--auth", "nocolon"], "USER:PASSWORD"),
    (["--auth", ":pw"], "USER:PASSWORD"),
    (["--port", "70000"], "70000"),
])
def test_the_command_refuses_a_bad_command_line(args, message):
    result = _run_cli("--broker", "memory://cli-dash", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_the_command_says_how_to_install_uvicorn(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = _run_cli("--broker", "memory://cli-dash")
    assert result.exit_code == 2 and "stem-queue[dashboard]" in result.output


def test_the_command_serves_the_dashboard_behind_its_token(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from .support import free_port
    port, token = free_port(), "tok-" + uuid.uuid4().hex
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stem", "dashboard", "--broker", "memory://served", "--port",
                             str(port), "--token", token], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "STEM_BROKER_URL": ""})
    log.close()
    try:
        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_for(listening, 30, "the dashboard to listen")
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        refused.value.close()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and b"Throughput" in r.read()
    finally:
        proc.terminate()
        proc.wait(15)
    assert "stem dashboard on http://127.0.0.1:" in (tmp_path / "dashboard.log").read_text()


def test_the_templates_and_static_files_ship_with_the_package():
    import fnmatch
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert "stem.dashboard" in setuptools["packages"]
    globs = setuptools["package-data"]["stem.dashboard"]
    package = root / "stem" / "dashboard"
    files = [p.relative_to(package).as_posix() for p in package.rglob("*")
             if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
    extras = config["project"]["optional-dependencies"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    # make test (which installs .[dev]) runs the dashboard's tests
    assert names(extras["dashboard"]) <= names(extras["dev"])
