"""The dashboard's ASGI application: routes over ``views`` and the control plane.

``build_app`` returns a Starlette app; ``stem.dashboard.app`` is its public face.
Pages are rendered on the server with Jinja2 (autoescape on: task data is
untrusted input); the overview reloads its live part every ``refresh_s`` seconds
from ``/overview/live`` with the package's own script, nothing fetched from
elsewhere.  Every action is a POST that passes, in order: authentication
(``security.Guard``), the read-only switch (403), the CSRF token (403), the
arguments (400, or 404 for a queue, worker or schedule that does not exist), and
a confirmation page (the same form again with ``confirmed=1``).  Broker and
backend calls are blocking, so every endpoint is a plain function that Starlette
runs in its thread pool.
"""

from __future__ import annotations

import datetime
import math
import pathlib
import time
from typing import Any, Callable, Sequence
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import _checks as checks
from ..control import Control
from ..errors import ConfigurationError, ControlError, StemError
from ..redact import mask_url, mask_urls
from . import security, views

__all__ = ["build_app"]

_HERE = pathlib.Path(__file__).resolve().parent
_MAX_IDS = 1000          # dead letters one replay form may name
_CONTROL_TIMEOUT_S = 3.0


def _utc(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value // 60:.0f} min {value % 60:02.0f} s"
    return f"{value // 3600:.0f} h {(value % 3600) // 60:02.0f} min"


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:.0f} MiB"


class _Failure(Exception):
    """An action or page that cannot be served: an HTTP status and one line for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Dashboard:
    """The state of one app: what it reads (broker, backend), how it acts (``Control``), and
    its settings.  It stores nothing of its own."""

    def __init__(self, broker: Any, backend: Any, *, signer: Any, code_schedules: Sequence[Any],
                 read_only: bool, redact: views.Redactor, csrf: security.Csrf, refresh_s: float,
                 title: str, owned: Sequence[Any], rule_of: views.RuleOf | None = None):
        self.broker = broker
        self.backend = backend
        self.signer = signer
        self.code_schedules = list(code_schedules)
        self.read_only = read_only
        self.redact = redact
        self.rule_of = rule_of      # a task's TaskOptions.redact, for arguments read from a dead letter
        self.csrf = csrf
        self.refresh_s = refresh_s
        self.title = title
        self.owned = list(owned)
        self.env = Environment(loader=FileSystemLoader(str(_HERE / "templates")),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.filters.update(utc=_utc, seconds=_seconds, mib=_mib)

    # -- rendering ------------------------------------------------------------------------
    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = request.cookies.get(security.CSRF_COOKIE)
        fresh = not nonce or len(nonce) != 32
        if fresh:
            nonce = security.Csrf.new_nonce()
        root = request.scope.get("root_path", "")
        html = self.env.get_template(template).render(
            root=root, title=self.title, read_only=self.read_only, csrf_token=self.csrf.token_for(nonce),
            csrf_field=security.CSRF_FIELD, broker_url=mask_url(getattr(self.broker, "url", "") or ""),
            backend_url=mask_url(getattr(self.backend, "url", "") or ""), refresh_ms=int(self.refresh_s * 1000),
            now=time.time(), **context)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            response.set_cookie(security.CSRF_COOKIE, nonce, path=root or "/", httponly=True, samesite="strict")
        return response

    def failure(self, request: Request, exc: _Failure) -> HTMLResponse:
        return self.render(request, "message.html", exc.status, heading=f"Error {exc.status}",
                           message=mask_urls(exc.message), ok=False)

    # -- checks every action passes -----------------------------------------------------
    async def action_form(self, request: Request) -> dict[str, list[str]]:
        if self.read_only:
            raise _Failure(403, "this dashboard is read-only: actions are off")
        if not security.same_origin(request.scope):
            raise _Failure(403, "the form came from another site")
        form = await request.form()
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
        token = (fields.get(security.CSRF_FIELD) or [None])[0]
        if not self.csrf.check(request.cookies.get(security.CSRF_COOKIE), token):
            raise _Failure(403, "missing or stale CSRF token: reload the page and try again")
        return fields

    def confirm(self, request: Request, fields: dict[str, list[str]], question: str) -> HTMLResponse | None:
        """The confirmation page, unless the form says it was confirmed."""
        if (fields.get("confirmed") or [""])[0] == "1":
            return None
        keep = [(k, v) for k, values in fields.items() if k not in (security.CSRF_FIELD, "confirmed")
                for v in values]
        return self.render(request, "confirm.html", question=question, action=request.url.path, fields=keep)

    def known_queue(self, queue: str) -> str:
        try:
            checks.queue_name(queue)
        except ConfigurationError as exc:
            raise _Failure(400, str(exc)) from None
        if queue not in self.broker.queues():
            raise _Failure(404, f"no queue {queue!r} in this broker")
        return queue

    def control(self) -> Control:
        return Control(self.broker, self.backend, self.signer)

    def known_worker(self, worker: str) -> list[str] | None:
        """None (every live worker) for an empty field, else the one live worker named."""
        if not worker:
            return None
        live = [w["worker_id"] for w in self.control().workers()]
        if worker not in live:
            raise _Failure(404, f"no live worker {worker!r}")
        return [worker]


def _one(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    return (fields.get(name) or [default])[0].strip()


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise _Failure(400, f"the number of children must be a whole number >= 1, got {text!r}") from None
    if not 1 <= n <= 1000:
        raise _Failure(400, f"the number of children must be between 1 and 1000, got {n}")
    return n


def _endpoint(dash: Dashboard, fn: Callable[..., Any], *, is_async: bool = False) -> Callable[..., Any]:
    """Turns ``_Failure`` and stem's errors into an error page (URLs masked)."""
    if is_async:
        async def handle_async(request: Request) -> Response:
            try:
                return await fn(dash, request)
            except _Failure as exc:
                return dash.failure(request, exc)
            except StemError as exc:
                return dash.failure(request, _Failure(502, f"{type(exc).__name__}: {exc}"))
        return handle_async

    def handle(request: Request) -> Response:
        try:
            return fn(dash, request)
        except _Failure as exc:
            return dash.failure(request, exc)
        except StemError as exc:
            return dash.failure(request, _Failure(502, f"{type(exc).__name__}: {exc}"))
    return handle


# -- pages --------------------------------------------------------------------------------------
def overview_page(dash: Dashboard, request: Request) -> Response:
    return dash.render(request, "overview.html", page="overview", data=views.overview(dash.broker, dash.backend))


def overview_live(dash: Dashboard, request: Request) -> Response:
    return dash.render(request, "_live.html", data=views.overview(dash.broker, dash.backend))


def overview_json(dash: Dashboard, request: Request) -> Response:
    return JSONResponse(views.overview(dash.broker, dash.backend))


def task_search(dash: Dashboard, request: Request) -> Response:
    task_id = request.query_params.get("id", "").strip()
    if not task_id:
        return dash.render(request, "task_search.html", page="tasks")
    try:
        views.check_task_id(task_id)
    except ConfigurationError as exc:
        raise _Failure(400, str(exc)) from None
    return RedirectResponse(f"{request.scope.get('root_path', '')}/tasks/{quote(task_id, safe='/')}", status_code=303)


def task_page(dash: Dashboard, request: Request) -> Response:
    task_id = request.path_params["task_id"]
    try:
        task = views.task_view(dash.broker, dash.backend, task_id, dash.redact, dash.rule_of)
    except ConfigurationError as exc:
        raise _Failure(400, str(exc)) from None
    if task is None:
        raise _Failure(404, f"no task {task_id!r} in the result backend: it is still queued (a task has no "
                            "status until a worker takes it), its status expired, or the id is wrong")
    return dash.render(request, "task.html", page="tasks", task=task)


def workers_page(dash: Dashboard, request: Request) -> Response:
    data = views.overview(dash.broker, dash.backend)
    return dash.render(request, "workers.html", page="workers", data=data)


def dead_letters_index(dash: Dashboard, request: Request) -> Response:
    queues = [q for q in views.queue_rows(dash.broker)]
    return dash.render(request, "dead_letters_index.html", page="dead", queues=queues)


def dead_letters_page(dash: Dashboard, request: Request) -> Response:
    queue = dash.known_queue(request.path_params["queue"])
    view = views.dead_letter_view(dash.broker, queue, reason=request.query_params.get("reason", ""),
                                  search=request.query_params.get("q", "").strip())
    return dash.render(request, "dead_letters.html", page="dead", view=view)


def schedules_page(dash: Dashboard, request: Request) -> Response:
    rows = views.schedule_rows(dash.backend, dash.code_schedules)
    return dash.render(request, "schedules.html", page="schedules", rows=rows)


# -- actions ------------------------------------------------------------------------------------
def _replies_page(dash: Dashboard, request: Request, heading: str, replies: list[dict[str, Any]]) -> Response:
    if not replies:
        raise _Failure(504, f"{heading}: no worker replied within {_CONTROL_TIMEOUT_S:g} s")
    refused = [r for r in replies if "error" in r]
    return dash.render(request, "message.html", 502 if refused else 200, heading=heading, ok=not refused,
                       message=(f"{len(refused)} of {len(replies)} worker(s) refused" if refused
                                else f"{len(replies)} worker(s) answered"),
                       replies=[{"worker": r.get("worker"), "error": r.get("error"),
                                 "reply": views.dumps(r.get("reply"))} for r in replies],
                       back=f"{request.scope.get('root_path', '')}/workers")


async def queue_action(dash: Dashboard, request: Request) -> Response:
    verb = request.path_params["verb"]
    fields = await dash.action_form(request)
    queue, worker = _one(fields, "queue"), _one(fields, "worker")
    try:
        checks.queue_name(queue)
    except ConfigurationError as exc:
        raise _Failure(400, str(exc)) from None
    workers = await _threaded(dash.known_worker, worker)
    asked = dash.confirm(request, fields, f"{verb.capitalize()} queue {queue!r} on "
                                          f"{'worker ' + repr(worker) if worker else 'every live worker'}?")
    if asked is not None:
        return asked
    control = dash.control()
    method = control.pause if verb == "pause" else control.resume
    replies = await _threaded(lambda: method(queue, workers=workers, timeout=_CONTROL_TIMEOUT_S))
    return _replies_page(dash, request, f"{verb} {queue}", replies)


async def pool_action(dash: Dashboard, request: Request) -> Response:
    verb = request.path_params["verb"]
    fields = await dash.action_form(request)
    n = _count(_one(fields, "n", "1"))
    worker = _one(fields, "worker")
    workers = await _threaded(dash.known_worker, worker)
    asked = dash.confirm(request, fields, f"{'Grow' if verb == 'grow' else 'Shrink'} the pool of "
                                          f"{'worker ' + repr(worker) if worker else 'every live worker'} by {n}?")
    if asked is not None:
        return asked
    control = dash.control()
    method = control.pool_grow if verb == "grow" else control.pool_shrink
    replies = await _threaded(lambda: method(n, workers=workers, timeout=_CONTROL_TIMEOUT_S))
    return _replies_page(dash, request, f"pool {verb} {n}", replies)


async def shutdown_action(dash: Dashboard, request: Request) -> Response:
    fields = await dash.action_form(request)
    worker = _one(fields, "worker")
    if not worker:
        raise _Failure(400, "name the worker to shut down")
    workers = await _threaded(dash.known_worker, worker)
    asked = dash.confirm(request, fields, f"Shut worker {worker!r} down (warm: it finishes the tasks it runs)?")
    if asked is not None:
        return asked
    replies = await _threaded(lambda: dash.control().shutdown("warm", workers=workers, timeout=_CONTROL_TIMEOUT_S))
    return _replies_page(dash, request, "warm shutdown", replies)


async def revoke_action(dash: Dashboard, request: Request) -> Response:
    fields = await dash.action_form(request)
    task_id = _one(fields, "task_id")
    try:
        views.check_task_id(task_id)
    except ConfigurationError as exc:
        raise _Failure(400, str(exc)) from None
    terminate = _one(fields, "terminate") == "1"
    asked = dash.confirm(request, fields, f"Revoke task {task_id!r}" +
                         (" and terminate it if it is running?" if terminate else "?"))
    if asked is not None:
        return asked
    try:
        replies = await _threaded(lambda: dash.control().revoke([task_id], terminate=terminate,
                                                                timeout=_CONTROL_TIMEOUT_S))
    except ControlError as exc:
        raise _Failure(400, str(exc)) from None
    # the revocation is stored even when no worker is up to hear it
    return dash.render(request, "message.html", heading=f"revoked {task_id}", ok=True,
                       message=f"revocation stored; {len(replies)} live worker(s) told",
                       replies=[{"worker": r.get("worker"), "error": r.get("error"),
                                 "reply": views.dumps(r.get("reply"))} for r in replies],
                       back=f"{request.scope.get('root_path', '')}/tasks/{quote(task_id, safe='/')}")


async def replay_action(dash: Dashboard, request: Request) -> Response:
    fields = await dash.action_form(request)
    queue = await _threaded(dash.known_queue, request.path_params["queue"])
    everything = _one(fields, "all") == "1"
    ids = [i for i in dict.fromkeys(fields.get("id") or []) if i]
    if not everything and not ids:
        raise _Failure(400, "choose the dead letters to replay (or replay all)")
    if len(ids) > _MAX_IDS:
        raise _Failure(400, f"at most {_MAX_IDS} dead letters per replay")
    what = "every dead letter" if everything else f"{len(ids)} dead letter(s)"
    asked = dash.confirm(request, fields, f"Replay {what} of queue {queue!r} back into the queue?")
    if asked is not None:
        return asked
    moved = await _threaded(dash.broker.replay, queue, None if everything else ids)
    status = 200 if everything or moved == len(ids) else 404
    return dash.render(request, "message.html", status, heading=f"replay {queue}", ok=status == 200,
                       message=f"replayed {moved} dead letter(s)" +
                       ("" if status == 200 else f" of the {len(ids)} asked for (the others are gone)"),
                       back=f"{request.scope.get('root_path', '')}/dead-letters/{queue}")


async def purge_action(dash: Dashboard, request: Request) -> Response:
    fields = await dash.action_form(request)
    queue = await _threaded(dash.known_queue, request.path_params["queue"])
    asked = dash.confirm(request, fields, f"Delete every dead letter of queue {queue!r} for good?")
    if asked is not None:
        return asked
    dropped = await _threaded(dash.broker.purge_dead_letters, queue)
    return dash.render(request, "message.html", heading=f"purge {queue}", ok=True,
                       message=f"purged {dropped} dead letter(s)",
                       back=f"{request.scope.get('root_path', '')}/dead-letters/{queue}")


async def schedule_action(dash: Dashboard, request: Request) -> Response:
    verb, sid = request.path_params["verb"], request.path_params["schedule_id"]
    if verb not in ("pause", "resume"):
        raise _Failure(404, f"no schedule action {verb!r}")
    fields = await dash.action_form(request)
    try:
        stored = await _threaded(dash.backend.schedule_records, [sid])
    except ConfigurationError as exc:
        raise _Failure(400, str(exc)) from None
    if sid not in stored and sid not in {s.id for s in dash.code_schedules}:
        raise _Failure(404, f"no schedule {sid!r}")
    asked = dash.confirm(request, fields, f"{verb.capitalize()} schedule {sid!r}?")
    if asked is not None:
        return asked
    changed = await _threaded(dash.backend.pause_schedule, sid, verb == "pause")
    return dash.render(request, "message.html", heading=f"{verb} {sid}", ok=True,
                       message=f"schedule {sid} {'paused' if verb == 'pause' else 'resumed'}"
                               + ("" if changed else f" (it was {verb}d already)"),
                       back=f"{request.scope.get('root_path', '')}/schedules")


async def _threaded(fn: Callable[..., Any], *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool
    return await run_in_threadpool(fn, *args)


# -- login (token mode) -------------------------------------------------------------------------
async def login(dash: Dashboard, request: Request, token: str | None) -> Response:
    root = request.scope.get("root_path", "")
    if token is None:
        raise _Failure(404, "this dashboard takes no token: nothing to log in to")
    if request.method == "GET":
        return dash.render(request, "login.html", page="login", failed=False)
    form = await request.form()
    given = form.get("token")
    import hmac
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
        return dash.render(request, "login.html", 401, page="login", failed=True)
    response = RedirectResponse(f"{root}/", status_code=303)
    response.set_cookie(security.TOKEN_COOKIE, token, path=root or "/", httponly=True, samesite="strict")
    return response


def build_app(dash: Dashboard, *, auth: tuple[str, str] | None, token: str | None) -> Any:
    def page(fn):
        return _endpoint(dash, fn)

    def action(fn):
        return _endpoint(dash, fn, is_async=True)

    async def login_endpoint(request: Request) -> Response:
        try:
            return await login(dash, request, token)
        except _Failure as exc:
            return dash.failure(request, exc)

    routes = [
        Route("/", page(overview_page)),
        Route("/overview/live", page(overview_live)),
        Route("/api/overview", page(overview_json)),
        Route("/tasks", page(task_search)),
        Route("/tasks/revoke", action(revoke_action), methods=["POST"]),
        Route("/tasks/{task_id:path}", page(task_page)),
        Route("/workers", page(workers_page)),
        Route("/workers/{verb}", action(_workers_dispatch), methods=["POST"]),
        Route("/dead-letters", page(dead_letters_index)),
        Route("/dead-letters/{queue}", page(dead_letters_page)),
        Route("/dead-letters/{queue}/replay", action(replay_action), methods=["POST"]),
        Route("/dead-letters/{queue}/purge", action(purge_action), methods=["POST"]),
        Route("/schedules", page(schedules_page)),
        Route("/schedules/{schedule_id}/{verb}", action(schedule_action), methods=["POST"]),
        Route("/login", login_endpoint, methods=["GET", "POST"]),
        Mount("/static", app=StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    async def close_owned(_app: Any):
        yield
        for obj in dash.owned:
            obj.close()

    from contextlib import asynccontextmanager
    inner = Starlette(routes=routes, lifespan=asynccontextmanager(close_owned))

    async def not_found(request: Request, exc: Exception) -> Response:
        return dash.failure(request, _Failure(404, f"no page {request.url.path!r}"))

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return dash.failure(request, _Failure(405, f"{request.method} is not allowed here"))

    inner.add_exception_handler(404, not_found)
    inner.add_exception_handler(405, not_allowed)
    guarded = security.Guard(inner, auth=auth, token=token)
    guarded.dashboard = dash    # type: ignore[attr-defined]   (for tests and embedding code)
    return guarded


_WORKER_VERBS = {"pause": queue_action, "resume": queue_action, "grow": pool_action, "shrink": pool_action,
                 "shutdown": shutdown_action}


async def _workers_dispatch(dash: Dashboard, request: Request) -> Response:
    handler = _WORKER_VERBS.get(request.path_params["verb"])
    if handler is None:
        raise _Failure(404, f"no worker action {request.path_params['verb']!r}")
    return await handler(dash, request)
