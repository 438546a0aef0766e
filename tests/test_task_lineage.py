"""What a worker's statuses say about where a task came from (issue 26's task page): its
enqueue time, parent, root, children and group, and its arguments as they may be shown,
with secrets hidden and large values cut, on every path a status is stored.  Both engines
run every test (in-memory adapters); the browser suite does the same on Redis."""

from __future__ import annotations

import os
import time

import pytest

from stem import Stem, TaskOptions, TaskRegistry, TaskState
from stem.canvas import chain, chord, group
from stem.redact import ARGS_SHOWN_BYTES, MASK, TRUNCATED
from stem.results import encode_status
from stem.testing import EagerStem

from .support import wait_for, worker_env

SECRET = "hunter2-never-stored"
CARD = "4111-1111-1111-1111"


@pytest.fixture(params=["inline", "process"])
def env(request, tmp_path):
    yield from worker_env(request.param, start=True, tmp=tmp_path)


def never_stored(status) -> None:
    """No secret in the status as any backend stores it (the msgpack record)."""
    data = encode_status(status)
    assert SECRET.encode() not in data and CARD.encode() not in data


def test_a_success_keeps_its_enqueue_time_and_its_arguments_with_secrets_hidden(env):
    env.registry.task("pay", options=TaskOptions(redact=["card"]))(lambda ctx, **kw: "paid")
    env.worker()
    t0 = time.time()
    task_id = env.stem.enqueue("pay", {"user": "bob", "password": SECRET, "payment": {"card": CARD, "cents": 5}})
    t1 = time.time()
    status = env.stem.wait_for_task(task_id, timeout=20)
    assert status.state is TaskState.SUCCEEDED
    assert t0 <= status.enqueued_at <= t1 <= status.finished_at and status.enqueued_at <= status.started_at
    assert status.args == {"user": "bob", "password": MASK, "payment": {"card": MASK, "cents": 5}}
    assert (status.parent_id, status.root_id, status.group_id, status.children) == (None, None, None, None)
    never_stored(env.backend.get(task_id))


def test_large_arguments_are_cut_in_the_status_with_a_marker(env):
    env.registry.task("load")(lambda ctx, **kw: len(kw["blob"]))
    env.worker()
    status = env.stem.wait_for_task(env.stem.enqueue("load", {"blob": "x" * 200_000, "id": 9}), timeout=20)
    assert status.result == 200_000                       # the task had all of it
    assert status.args["id"] == 9 and TRUNCATED in status.args["blob"] and "200,005 bytes" in status.args["blob"]
    assert len(encode_status(status)) < ARGS_SHOWN_BYTES + 1024


def test_a_callable_redact_decides_what_the_status_keeps(env):
    env.registry.task("login", options=TaskOptions(redact=lambda args: {"user": args["user"]}))(
        lambda ctx, user, secret_answer: user)
    env.registry.task("quiet", options=TaskOptions(redact=lambda args: None))(lambda ctx, **kw: 1)
    env.worker()
    shown = env.stem.wait_for_task(env.stem.enqueue("login", {"user": "amy", "secret_answer": SECRET}), timeout=20)
    assert shown.args == {"user": "amy"}
    hidden = env.stem.wait_for_task(env.stem.enqueue("quiet", {"password": SECRET}), timeout=20)
    assert hidden.state is TaskState.SUCCEEDED and hidden.args is None and hidden.enqueued_at is not None
    never_stored(shown)
    never_stored(hidden)


def test_retries_and_failures_keep_the_arguments_hidden(env):
    def flaky(ctx, **kw):
        if kw.get("hold"):
            ctx.retry(countdown=60)
        raise ValueError("boom")

    env.registry.task("flaky", options=TaskOptions(max_retries=1, redact=["card"]))(flaky)
    env.worker()
    failed = env.stem.wait_for_task(env.stem.enqueue("flaky", {"password": SECRET, "card": CARD}), timeout=20)
    assert failed.state is TaskState.FAILED and failed.attempt == 1
    assert failed.args == {"password": MASK, "card": MASK} and failed.enqueued_at is not None
    never_stored(failed)
    held = env.stem.enqueue("flaky", {"password": SECRET, "card": CARD, "hold": True})
    wait_for(lambda: (s := env.backend.get(held)) is not None and s.state is TaskState.RETRYING, 20, "RETRYING")
    retrying = env.backend.get(held)
    assert retrying.args == {"password": MASK, "card": MASK, "hold": True}
    never_stored(retrying)


def test_a_task_that_never_runs_keeps_its_arguments_hidden_by_its_handler(env):
    env.registry.task("pay", options=TaskOptions(redact=["card"]))(lambda ctx, **kw: "paid")
    env.stem.revoke(["revoked-1"])
    env.stem.enqueue("pay", {"card": CARD, "token": SECRET, "n": 1}, task_id="revoked-1")
    no_registry = Stem(env.broker, env.backend)       # a producer that cannot check the name
    unknown = no_registry.enqueue("no.such.task", {"password": SECRET, "card": CARD})
    env.worker()
    revoked = env.stem.wait_for_task("revoked-1", timeout=20)
    assert revoked.state is TaskState.REVOKED and revoked.args == {"card": MASK, "token": MASK, "n": 1}
    dead = env.stem.wait_for_task(unknown, timeout=20)
    # no handler here, so only the name rule: "card" is not a secret-looking name
    assert dead.state is TaskState.DEAD and dead.args == {"password": MASK, "card": CARD}
    assert dead.enqueued_at is not None and dead.queue == "default"
    never_stored(revoked)


def test_the_tasks_a_task_enqueues_are_its_children_and_name_it_their_parent(env):
    @env.registry.task("fan")
    def fan(ctx, n):
        return [ctx.enqueue("leaf", {"i": i, "depth": 1}) for i in range(n)]

    @env.registry.task("leaf")
    def leaf(ctx, i, depth):
        return ctx.enqueue("leaf", {"i": i, "depth": 2}) if depth == 1 and i == 0 else None

    env.worker()
    parent = env.stem.wait_for_task(env.stem.enqueue("fan", {"n": 3}), timeout=20)
    assert parent.children == parent.result and len(parent.children) == 3
    children = [env.stem.wait_for_task(c, timeout=20) for c in parent.children]
    assert {(c.parent_id, c.root_id) for c in children} == {(parent.id, parent.id)}
    grandchild = env.stem.wait_for_task(children[0].result, timeout=20)
    assert children[0].children == [grandchild.id]
    assert (grandchild.parent_id, grandchild.root_id) == (children[0].id, parent.id)
    assert [c.children for c in children[1:]] == [None, None]


def test_a_running_status_shows_the_arguments_and_the_children_so_far(env):
    flag = str(env.tmp / "go")

    @env.registry.task("slow")
    def slow(ctx, flag, api_key):
        child = ctx.enqueue("noop")
        ctx.progress(0.5)
        deadline = time.monotonic() + 20
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        return child

    env.registry.task("noop")(lambda ctx: None)
    env.worker()
    task_id = env.stem.enqueue("slow", {"flag": flag, "api_key": SECRET})
    wait_for(lambda: (s := env.backend.get(task_id)) is not None and s.progress == 0.5, 20, "the progress note")
    running = env.backend.get(task_id)
    assert running.state is TaskState.RUNNING and running.args == {"flag": flag, "api_key": MASK}
    assert len(running.children) == 1 and running.enqueued_at is not None
    never_stored(running)
    open(flag, "w").close()
    done = env.stem.wait_for_task(task_id, timeout=20)
    assert done.children == running.children == [done.result]


def test_chain_steps_link_to_the_step_before_and_the_step_after(env):
    sig = env.registry.signature
    env.registry.task("step")(lambda ctx, n: (ctx.previous or 0) + n)
    env.worker()
    handle = env.stem.apply(chain(sig("step", {"n": 1}), sig("step", {"n": 2}), sig("step", {"n": 3})))
    assert handle.get(timeout=20) == 6
    c = handle.id
    first, second, last = (env.backend.get(i) for i in (f"{c}.s0", f"{c}.s1", c))
    assert (first.parent_id, first.children, first.root_id, first.args) == (None, [f"{c}.s1"], c, {"n": 1})
    assert (second.parent_id, second.children, second.root_id) == (f"{c}.s0", [c], c)
    assert (last.parent_id, last.children, last.root_id) == (f"{c}.s1", None, c)


def test_chord_members_name_their_group_and_a_step_after_a_group_names_the_group(env):
    sig = env.registry.signature
    env.registry.task("part")(lambda ctx, i: i)
    env.registry.task("done")(lambda ctx: "all done")
    env.worker()
    handle = env.stem.apply(chord(group(sig("part", {"i": i}) for i in range(3)), sig("done")))
    assert handle.get(timeout=20) == "all done"
    g = handle.id
    members = [env.backend.get(f"{g}.{i}") for i in range(3)]
    assert {(m.group_id, m.root_id, m.parent_id) for m in members} == {(g, g, None)}
    callback = env.backend.get(g)
    assert (callback.name, callback.group_id, callback.parent_id) == ("done", None, None)
    then = env.stem.apply(chain(group(sig("part", {"i": 1}), sig("part", {"i": 2})), sig("done")))
    assert then.get(timeout=20) == "all done"
    after = env.backend.get(then.id)
    assert (after.parent_id, after.root_id) == (f"{then.id}.s0", then.id)
    assert env.backend.get(f"{then.id}.s0.1").group_id == f"{then.id}.s0"


def test_eager_mode_keeps_the_same_fields():
    registry = TaskRegistry()
    registry.task("pay", options=TaskOptions(redact=["card"]))(lambda ctx, **kw: "paid")
    stem = EagerStem(registry)
    status = stem.wait_for_task(stem.enqueue("pay", {"card": CARD, "password": SECRET, "n": 1}), timeout=5)
    assert status.args == {"card": MASK, "password": MASK, "n": 1} and status.enqueued_at is not None
