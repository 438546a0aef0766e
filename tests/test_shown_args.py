"""What stem keeps of a task's arguments for display (``stem.redact.shown_args``), the
``TaskOptions(redact=...)`` option, and the status fields that carry them: old statuses
still read, and newer ones read in an older stem."""

from __future__ import annotations

import time

import msgspec
import pytest

from stem import Stem, TaskOptions, TaskRegistry
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.errors import InvalidTaskOptionsError
from stem.redact import ARGS_SHOWN_BYTES, MASK, TRUNCATED, is_secret_name, shown_args
from stem.results import TaskState, TaskStatus, decode_status, encode_status

SECRET = "hunter2-do-not-show"


def encoded_size(value) -> int:
    return len(msgspec.msgpack.encode(value))


# -- the name rule ---------------------------------------------------------------------------------
def test_secret_looking_names_are_hidden_at_any_depth_and_the_rest_is_kept():
    args = {"user": "bob", "password": SECRET, "nested": {"api_key": SECRET, "n": [1, {"Auth_Token": SECRET}]},
            "pairs": ({"session": SECRET},)}
    shown = shown_args(args)
    assert SECRET not in repr(shown)
    assert shown == {"user": "bob", "password": MASK, "nested": {"api_key": MASK, "n": [1, {"Auth_Token": MASK}]},
                     "pairs": [{"session": MASK}]}
    assert args["password"] == SECRET            # the task's own arguments are untouched


def test_named_arguments_are_hidden_besides_the_secret_looking_ones():
    shown = shown_args({"card": {"number": "4111"}, "order": {"card": "4111", "id": 7}, "token": SECRET, "n": 1},
                       ("card",))
    assert shown == {"card": MASK, "order": {"card": MASK, "id": 7}, "token": MASK, "n": 1}


def test_arguments_with_nothing_to_hide_are_kept_as_they_are_without_a_copy():
    args = {"a": 1, "b": [1, {"c": (2, 3)}]}
    assert shown_args(args) is args and shown_args(args, size_hint=10) is args
    assert shown_args({}) == {}
    hidden = shown_args({"a": 1, "b": [1, {"token": 2}]})
    assert hidden == {"a": 1, "b": [1, {"token": MASK}]}


@pytest.mark.parametrize("name, secret", [("password", True), ("db_passwd", True), ("API-Key", True),
                                          ("authorization", True), ("private_key", True), ("cookie", True),
                                          ("user", False), ("path", False), ("keys", False)])
def test_which_names_look_like_secrets(name, secret):
    assert is_secret_name(name) is secret


# -- a callable ------------------------------------------------------------------------------------
def test_a_callable_says_what_is_shown_and_replaces_the_name_rule():
    seen = []

    def rule(args):
        seen.append(dict(args))
        args["mutated"] = True          # changes its own copy, never the task's arguments
        return {"account": args["account"], "token": "shown on purpose"}

    args = {"account": 7, "secret": SECRET}
    assert shown_args(args, rule) == {"account": 7, "token": "shown on purpose"}
    assert seen == [{"account": 7, "secret": SECRET}] and "mutated" not in args


def test_a_callable_returning_none_keeps_no_arguments():
    assert shown_args({"a": 1}, lambda args: None) is None


@pytest.mark.parametrize("rule, says", [
    (lambda args: 1 / 0, "raised ZeroDivisionError"),
    (lambda args: [args], "returned a list"),
    (lambda args: {1: "x"}, "not a dict with str keys"),
    (lambda args: {"x": object()}, "msgpack cannot carry"),
])
def test_a_broken_callable_hides_the_arguments_and_says_why(rule, says):
    shown = shown_args({"password": SECRET, "user": SECRET}, rule)
    assert list(shown) == ["…"] and says in shown["…"]
    assert SECRET not in repr(shown)


# -- large arguments ---------------------------------------------------------------------------------
def test_large_arguments_are_cut_with_a_marker_and_small_ones_kept_whole():
    args = {"id": 42, "blob": "x" * 50_000, "raw": b"\0" * 4096, "rows": list(range(5000)), "password": SECRET,
            "note": "short"}
    shown = shown_args(args)
    assert shown["id"] == 42 and shown["note"] == "short" and shown["password"] == MASK
    assert shown["blob"].startswith("x" * 64) and f"[{TRUNCATED}: 50,003 bytes]" in shown["blob"]
    assert TRUNCATED in shown["raw"] and "binary" in shown["raw"]
    assert TRUNCATED in shown["rows"] and "list" in shown["rows"]
    assert encoded_size(shown) <= ARGS_SHOWN_BYTES + 256


def test_many_arguments_are_cut_after_the_room_is_used_and_the_rest_counted():
    args = {f"field_{i:04d}": i for i in range(2000)}
    shown = shown_args(args)
    assert f"[{TRUNCATED}: " in shown["…"] and "more arguments]" in shown["…"]
    kept = len(shown) - 1
    assert 10 < kept < 2000 and shown["…"] == f"[{TRUNCATED}: {2000 - kept} more arguments]"
    assert encoded_size(shown) <= ARGS_SHOWN_BYTES + 256


def test_a_huge_argument_name_is_cut_too():
    shown = shown_args({"k" * 10_000: 1, "big": "y" * 5000})
    assert all(len(k) <= 65 for k in shown)
    assert encoded_size(shown) <= ARGS_SHOWN_BYTES + 256


def test_a_large_callable_result_is_cut_and_not_redacted_again():
    shown = shown_args({"a": 1}, lambda args: {"token": "kept", "blob": "z" * 5000})
    assert shown["token"] == "kept" and TRUNCATED in shown["blob"]


def test_a_secret_inside_a_large_argument_never_survives_the_cut():
    args = {"payload": {"password": SECRET, "filler": "f" * 5000}, "list": [{"token": SECRET}] * 500}
    assert SECRET not in repr(shown_args(args))


# -- the option -----------------------------------------------------------------------------------
def test_redact_takes_names_or_a_callable():
    assert TaskOptions(redact=["card", "ssn"]).redact == ("card", "ssn")
    assert TaskOptions(redact={"b", "a"}).redact == ("a", "b")
    fn = lambda args: None  # noqa: E731
    assert TaskOptions(redact=fn).redact is fn
    assert hash(TaskOptions(redact=["card"])) == hash(TaskOptions(redact=("card",)))


@pytest.mark.parametrize("bad", ["card", [""], [1], {"card": 1}, 3])
def test_redact_refuses_anything_else(bad):
    with pytest.raises(InvalidTaskOptionsError, match="redact must be"):
        TaskOptions(redact=bad)


def test_redact_is_an_option_of_the_handler_not_of_one_enqueue():
    registry = TaskRegistry()
    registry.task("t")(lambda ctx, **kw: None)
    stem = Stem(InMemoryBroker(), InMemoryResultBackend(), registry)
    with pytest.raises(InvalidTaskOptionsError, match="redact"):
        stem.enqueue("t", {"a": 1}, options=TaskOptions(redact=["a"]))
    from stem.canvas import Signature
    with pytest.raises(InvalidTaskOptionsError, match="redact"):
        Signature("t", {"a": 1}, TaskOptions(redact=["a"]))


# -- statuses old and new ------------------------------------------------------------------------
class _OldStatus(msgspec.Struct, omit_defaults=True):
    """TaskStatus as stem stored it before it kept enqueue times, lineage and arguments."""

    id: str
    state: TaskState
    name: str = ""
    queue: str = ""
    attempt: int = 0
    result: object = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    traceback: str | None = None
    meta: dict = msgspec.field(default_factory=dict)
    progress: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    worker: str | None = None
    ttl: float | None = None


def test_a_status_stored_by_an_older_stem_reads_with_the_new_fields_unset():
    old = msgspec.msgpack.encode(_OldStatus(id="t1", state=TaskState.SUCCEEDED, name="n", result=[1], started_at=2.0,
                                            updated_at=3.0, worker="w"))
    status = decode_status(old)
    assert (status.id, status.state, status.result, status.started_at, status.worker) == (
        "t1", TaskState.SUCCEEDED, [1], 2.0, "w")
    assert (status.enqueued_at, status.parent_id, status.root_id, status.group_id, status.children,
            status.args) == (None,) * 6


def test_an_older_stem_reads_a_new_status_and_ignores_the_new_fields():
    new = TaskStatus(id="t1", state=TaskState.FAILED, name="n", error="boom", enqueued_at=1.0, parent_id="p",
                     root_id="r", group_id="g", children=["c1"], args={"a": 1})
    old = msgspec.msgpack.Decoder(_OldStatus).decode(encode_status(new))
    assert (old.id, old.state, old.error) == ("t1", TaskState.FAILED, "boom")


def test_of_and_succeeded_with_fill_every_field_as_keywords_would():
    """They build a status by position: a field added or moved must not shift the others."""
    from stem.envelope import Envelope
    env = Envelope("t1", "n", {"a": 1}, {}, {"m": 1}, "q", 0, 2, 0, 5.0, parent_id="p", root_id="r",
                   result_ttl=60.0, canvas={"up": {"g": "grp"}})
    expected = TaskStatus(id="t1", state=TaskState.SUCCEEDED, name="n", queue="q", attempt=2, result=[1],
                          meta={"m": 1}, started_at=6.0, finished_at=7.0, updated_at=8.0, worker="w", ttl=60.0,
                          enqueued_at=5.0, parent_id="p", root_id="r", group_id="grp", children=["c"],
                          args={"a": 1})
    assert TaskStatus.succeeded_with(env, [1], 6.0, 7.0, 8.0, "w", {"a": 1}, ["c"]) == expected
    assert TaskStatus.of(env, TaskState.SUCCEEDED, result=[1], started_at=6.0, finished_at=7.0, updated_at=8.0,
                         worker="w", args={"a": 1}, children=["c"]) == expected
    failed = TaskStatus.of(env, TaskState.FAILED, error="boom", reason="error")
    assert (failed.error, failed.reason, failed.ttl, failed.group_id, failed.args) == ("boom", "error", 60.0, "grp",
                                                                                         None)
    assert abs(failed.updated_at - time.time()) < 5
    with pytest.raises(AttributeError):
        TaskStatus.of(env, TaskState.FAILED, no_such_field=1)


def test_a_status_with_every_field_still_opens_with_id_and_state():
    """The Redis backend's conditional store reads the state from the head of the record."""
    status = TaskStatus(id="t1", state=TaskState.FAILED, name="n", queue="q", attempt=1, result=1, error="e",
                        error_type="E", reason="error", traceback="tb", meta={"m": 1}, progress=0.5, started_at=1.0,
                        finished_at=2.0, worker="w", ttl=5.0, enqueued_at=0.5, parent_id="p", root_id="r",
                        group_id="g", children=["c"], args={"a": 1})
    data = encode_status(status)
    assert data[0] == 0xde                         # more than 15 entries: a map16
    keys = list(msgspec.msgpack.decode(data).keys())
    assert keys[:2] == ["id", "state"] and keys[-6:] == ["enqueued_at", "parent_id", "root_id", "group_id",
                                                         "children", "args"]
    assert decode_status(data) == status


@pytest.mark.parametrize("value", ["", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "é" * 40,
                                   b"", b"x" * 255, b"x" * 256, b"x" * 70_000, [1, "two"], {"k": 1.5}, None])
def test_the_sizes_a_cut_reports_are_the_msgpack_sizes(value):
    from stem.redact import _size
    assert _size(value) == encoded_size(value)
