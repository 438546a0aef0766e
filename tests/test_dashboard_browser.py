"""The dashboard in a real headless Chromium, over Redis-backed workers in their own processes.

Playwright drives Debian's ``chromium`` (``/usr/bin/chromium``; ``.ci/run`` installs it when
it is missing) without downloading a browser of its own.  Outside CI a machine without
Chromium skips these tests with the reason; with ``STEM_REQUIRE_SERVICES=1`` (CI) it fails.
``STEM_DASHBOARD_SCREENSHOTS=DIR`` keeps the overview and task page screenshots in DIR
(``docs/`` holds the ones the README shows); otherwise they go to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from .conftest import REQUIRE_SERVICES
from .support import free_port, wait_for

pytest.importorskip("starlette", reason="the dashboard extra is not installed: pip install 'stem-queue[dashboard]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it comes with the dev extra)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCRIPT = "<script>window.__pwned = 1</script><b id='bold'>bold</b>"
CARD, SECRET = "4111-1111-1111-1111", "hunter2-never-shown"
pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def _need_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    msg = "no Chromium at /usr/bin/chromium (apt-get install chromium)"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " and STEM_REQUIRE_SERVICES=1: .ci/run installs it", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    _need_chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])   # CI runs as root
        yield b
        b.close()


class Cluster:
    """Workers and dashboards as processes of this test module; each is stopped by its pid."""

    def __init__(self, url: str, tmp: pathlib.Path):
        self.url = url
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        from stem import Stem
        from stem.backends import RedisResultBackend
        from stem.brokers import RedisBroker

        from .apps.dashboard_tasks import registry
        import redis
        self.broker, self.backend = RedisBroker(url), RedisResultBackend(url)
        self.redis = redis.Redis.from_url(url)
        self.stem = Stem(self.broker, self.backend, registry)

    def _spawn(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("STEM_BROKER_URL", None)
        env.pop("STEM_RESULT_BACKEND_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "stem", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(proc)
        return proc

    def worker(self, name: str) -> str:
        self._spawn("worker", "-A", "tests.apps.dashboard_tasks:registry", "--broker", self.url, "-Q",
                    "default,other", "-c", "1", "--isolation", "inline", "--heartbeat-interval", "0.5", "-n", name,
                    log=f"worker-{name}.log")
        wait_for(lambda: any(h["worker_id"].startswith(name) for h in self.backend.heartbeats()), 30,
                 f"worker {name}'s heartbeat")
        return next(h["worker_id"] for h in self.backend.heartbeats() if h["worker_id"].startswith(name))

    def dashboard(self, *options: str) -> str:
        port = free_port()
        proc = self._spawn("dashboard", "--broker", self.url, "--port", str(port), *options,
                           log=f"dashboard-{port}.log")

        def up() -> bool:
            assert proc.poll() is None, (self.tmp / f"dashboard-{port}.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_for(up, 30, "the dashboard to listen")
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.broker.close()
        self.backend.close()
        self.redis.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, browser):
    """Redis db ``STEM_TEST_REDIS_OWN_DB`` (the CLI runs in stem's default namespace), emptied
    before and after; one worker to start with (tests add more) and one dashboard."""
    import redis

    from .conftest import REDIS_OWN_DB, REDIS_URL, require_service
    from urllib.parse import urlsplit
    u = urlsplit(REDIS_URL)
    require_service("Redis", u.hostname or "127.0.0.1", u.port or 6379)
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{REDIS_OWN_DB}"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    c = Cluster(url, tmp_path_factory.mktemp("dashboard-browser"))
    try:
        c.workers = [c.worker("alpha")]
        c.site = c.dashboard()
        yield c
    finally:
        c.stop()
        with redis.Redis.from_url(url) as r:
            r.flushdb()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    p = context.new_page()
    yield p
    context.close()


def _screenshot(page, name: str, tmp_path: pathlib.Path) -> None:
    where = pathlib.Path(os.environ.get("STEM_DASHBOARD_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(where / name), full_page=True)
    assert (where / name).stat().st_size > 1000


def _confirm(page) -> str:
    """Press "Yes" on the confirmation page; the outcome's message."""
    page.wait_for_selector("#confirm-yes, #message")
    assert page.locator("#confirm-yes").count() == 1, page.inner_text("main")
    page.click("#confirm-yes")
    return page.inner_text("#message")


def test_overview_shows_both_workers_and_updates_live(cluster, page, tmp_path):
    page.goto(cluster.site + "/")
    page.wait_for_selector(f"tr.worker[data-worker='{cluster.workers[0]}']")
    page.evaluate("window.__sameDocument = true")
    if len(cluster.workers) < 2:
        cluster.workers.append(cluster.worker("beta"))
    # the second worker appears without a reload
    page.wait_for_function("() => document.querySelectorAll('tr.worker').length === 2", timeout=20_000)
    assert page.evaluate("window.__sameDocument === true")
    assert "alive" in page.inner_text("#workers")
    ids = [cluster.stem.enqueue("dash.echo", {"value": i}) for i in range(40)]
    for i in ids:
        assert cluster.backend.wait(i, 20).state.name == "SUCCEEDED"
    # the chart has points and the tasks/s column numbers, from heartbeats seen while the page is open
    page.wait_for_function("() => Number(document.getElementById('chart').getAttribute('data-points')) >= 3",
                           timeout=20_000)
    page.wait_for_function("() => [...document.querySelectorAll('[data-rate-for]')].some(c => c.textContent !== '…')",
                           timeout=20_000)
    assert page.locator("#chart polyline").count() == 2
    _screenshot(page, "dashboard-overview.png", tmp_path)


def test_failed_tasks_are_dead_letters_and_replay_makes_them_succeed(cluster, page, tmp_path):
    flag = tmp_path / "fixed"
    ids = [cluster.stem.enqueue("dash.flaky", {"flag": str(flag)}) for _ in range(3)]
    wait_for(lambda: cluster.broker.stats("default").dead == 3, 20, "three dead letters")
    page.goto(cluster.site + "/dead-letters")
    page.click("a[href$='/dead-letters/default']")
    assert page.inner_text("#dead-total") == "3"
    for i in ids:
        assert page.locator(f"#dead-letters a:text-is('{i}')").count() == 1
    flag.write_text("ok")
    page.click("#replay-all")
    assert "replayed 3 dead letter(s)" in _confirm(page)
    page.click("#back")
    assert page.inner_text("#dead-total") == "0"
    for i in ids:
        assert cluster.backend.wait(i, 20).state.name == "SUCCEEDED"
    page.goto(f"{cluster.site}/tasks/{ids[0]}")
    assert page.inner_text("#task-state") == "SUCCEEDED"
    assert "fixed" in page.inner_text("#task-result")


def test_a_queue_paused_from_the_page_is_reported_by_stem_worker_inspect(cluster, page):
    worker = cluster.workers[0]
    page.goto(cluster.site + "/workers")
    row = page.locator(f"tr[data-worker='{worker}']")
    row.locator("select[name=queue]").select_option("other")
    row.locator("button:text-is('Pause')").click()
    assert "Pause queue 'other'" in page.inner_text("#question")
    assert "1 worker(s) answered" in _confirm(page)

    def paused() -> list[str]:
        run = subprocess.run([sys.executable, "-m", "stem", "worker", "inspect", "--broker", cluster.url, "--json",
                              "-w", worker], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)[0]["reply"]["paused"]
    assert paused() == ["other"]
    page.goto(cluster.site + "/workers")
    row = page.locator(f"tr[data-worker='{worker}']")
    assert "paused: other" in row.inner_text()
    row.locator("select[name=queue]").select_option("other")
    row.locator("button:text-is('Resume')").click()
    _confirm(page)
    assert paused() == []


def test_task_page_by_id_shows_the_result_and_a_script_as_text(cluster, page, tmp_path):
    task_id = cluster.stem.enqueue("dash.echo", {"value": SCRIPT})
    assert cluster.backend.wait(task_id, 20).state.name == "SUCCEEDED"
    page.goto(cluster.site + "/")
    page.fill("header input[name=id]", task_id)
    page.press("header input[name=id]", "Enter")
    page.wait_for_selector("#task-result")
    assert page.inner_text("#task-id") == task_id
    assert page.inner_text("#task-state") == "SUCCEEDED"
    assert SCRIPT in page.inner_text("#task-result")           # shown as text...
    assert page.evaluate("window.__pwned === undefined")         # ...never run
    assert page.locator("#bold").count() == 0                    # ...nor parsed as markup
    assert SCRIPT in page.inner_text("#task-args")               # the arguments too


def test_task_page_shows_the_enqueue_time_the_arguments_redacted_and_a_chains_links(cluster, page, tmp_path):
    from stem.canvas import chain

    from .apps.dashboard_tasks import registry
    sig = registry.signature
    handle = cluster.stem.apply(chain(sig("dash.pay", {"card": CARD, "password": SECRET, "cents": 125}),
                                      sig("dash.echo", {"value": "shipped"})))
    assert handle.get(timeout=20) == "shipped"
    first = f"{handle.id}.s0"
    page.goto(f"{cluster.site}/tasks/{first}")
    assert page.inner_text("#task-state") == "SUCCEEDED"
    enqueued = cluster.backend.get(first).enqueued_at
    assert page.inner_text("#task-enqueued") == time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(enqueued))
    assert page.inner_text("#task-waited") != "-"
    args = json.loads(page.inner_text("#task-args"))
    assert args == {"card": "***", "password": "***", "cents": 125}      # shown as redacted
    assert CARD not in page.content() and SECRET not in page.content()
    assert CARD.encode() not in cluster.redis.get(cluster.backend.status_key(first))   # nor stored
    _screenshot(page, "dashboard-task.png", tmp_path)
    page.click(f"#task-children a:text-is('{handle.id}')")             # the next step
    page.wait_for_selector("#task-parent")
    assert page.inner_text("#task-id") == handle.id and "shipped" in page.inner_text("#task-result")
    page.click("#task-parent")                                           # and back
    page.wait_for_selector("#task-args")
    assert page.inner_text("#task-id") == first


def test_a_chord_members_page_links_to_its_group_and_the_group_lists_its_members(cluster, page):
    from stem.canvas import chord, group

    from .apps.dashboard_tasks import registry
    sig = registry.signature
    handle = cluster.stem.apply(chord(group(sig("dash.echo", {"value": i}) for i in range(3)),
                                      sig("dash.echo", {"value": "all done"})))
    assert handle.get(timeout=20) == "all done"
    page.goto(f"{cluster.site}/tasks/{handle.id}.1")
    assert json.loads(page.inner_text("#task-args")) == {"value": 1}
    page.click("#task-group")
    page.wait_for_selector("#task-members")
    assert page.inner_text("#task-id") == handle.id and "all done" in page.inner_text("#task-result")
    assert page.inner_text("#task-group-counts").startswith("3 of 3 finished (3 succeeded, 0 failed)")
    assert page.locator("#task-members a").all_inner_texts() == [f"{handle.id}.{i}" for i in range(3)]


def test_read_only_shows_no_buttons_and_refuses_actions(cluster, page):
    site = cluster.dashboard("--read-only")
    for path in ("/", "/workers", "/dead-letters/default", "/schedules"):
        page.goto(site + path)
        assert page.locator("#read-only").count() == 1
        assert page.locator("form[method=post]").count() == 0, path
        assert page.locator("button", has_text="Pause").count() == 0
    r = page.request.post(site + "/dead-letters/default/purge", form={"confirmed": "1"})
    assert r.status == 403


def test_wrong_credentials_get_401(cluster, browser):
    site = cluster.dashboard("--auth", "admin:" + (password := uuid.uuid4().hex))
    wrong = browser.new_context(http_credentials={"username": "admin", "password": "wrong"})
    try:
        assert wrong.new_page().goto(site + "/").status == 401
    finally:
        wrong.close()
    right = browser.new_context(http_credentials={"username": "admin", "password": password})
    try:
        p = right.new_page()
        assert p.goto(site + "/").status == 200
        p.wait_for_selector(f"tr.worker[data-worker='{cluster.workers[0]}']")
    finally:
        right.close()
