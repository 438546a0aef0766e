"""``stem enqueue NAME --chunks FILE --size N`` and ``stem group status ID``."""

from __future__ import annotations

import json

import pytest

from stem import ShutdownMode, TaskRegistry, Worker, WorkerLifecycleConfig

from .test_cli import invoke, strict_json

registry = TaskRegistry()


@registry.task("rows.count")
def count(ctx, items):
    return len(items)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/cli.db"


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"row": i}) + "\n" for i in range(7)) + "\n")
    return path


@pytest.fixture
def worker(url):
    w = Worker(url, url, registry, concurrency=2, isolation="inline",
               lifecycle=WorkerLifecycleConfig(install_signal_handlers=False))
    yield w
    w.shutdown(ShutdownMode.HARD, timeout=15)


def test_a_chunked_job_from_a_jsonl_file_is_one_group_of_size_item_tasks(url, rows, worker):
    out = invoke("enqueue", "rows.count", "--chunks", rows, "--size", 3, "--json", "--broker", url)
    assert out.exit_code == 0, out.output
    data = strict_json(out.output)
    assert (data["items"], data["tasks"]) == (7, 3)
    status = strict_json(invoke("group", "status", data["id"], "--json", "--broker", url).output)
    assert (status["kind"], status["expected"], status["finished"], status["sealed"]) == ("group", 3, 0, True)
    worker.run_in_background()
    from stem import Stem
    with Stem(url, url) as stem:
        assert stem.canvas_handle(data["id"]).results(timeout=30) == [3, 3, 1]
    text = invoke("group", "status", data["id"], "--broker", url).output
    assert "SUCCEEDED" in text and "3 of 3 done (3 succeeded, 0 failed)" in text


def test_chunks_with_wait_show_progress_and_exit_0_when_every_chunk_succeeded(url, rows, worker):
    worker.run_in_background()
    out = invoke("enqueue", "rows.count", "--chunks", rows, "--size", 2, "--wait", "--timeout", 30, "--broker", url)
    assert out.exit_code == 0, out.output
    assert "4 of 4 done" in out.output and "SUCCEEDED" in out.output


def test_chunks_from_stdin(url, worker):
    out = invoke("enqueue", "rows.count", "--chunks", "-", "--size", 5, "--json", "--broker", url,
                 input="1\n2\n3\n")
    assert out.exit_code == 0, out.output
    assert strict_json(out.output)["tasks"] == 1


def test_a_failed_chunk_makes_wait_exit_1_naming_it(url, tmp_path):
    r = TaskRegistry()

    @r.task("rows.count")
    def broken(ctx, items):
        raise ValueError("bad rows")

    path = tmp_path / "few.jsonl"
    path.write_text("1\n2\n")
    w = Worker(url, url, r, concurrency=1, isolation="inline", lifecycle=WorkerLifecycleConfig(
        install_signal_handlers=False))
    w.run_in_background()
    try:
        out = invoke("enqueue", "rows.count", "--chunks", path, "--size", 1, "--wait", "--timeout", 30,
                     "--broker", url)
    finally:
        w.shutdown(ShutdownMode.HARD, timeout=15)
    assert out.exit_code == 1, out.output
    assert "dependency-failed" in out.output and "failed:" in out.output


@pytest.mark.parametrize("args, code, message", [
    (["--args", '{"a": 1}'], 2, "--chunks does not go with --args"),
    (["--task-id", "x"], 2, "--chunks does not go with --task-id"),
    (["--size", "0"], 2, "0"),
])
def test_chunks_refuse_what_does_not_fit(url, rows, args, code, message):
    out = invoke("enqueue", "rows.count", "--chunks", rows, *args, "--broker", url)
    assert out.exit_code == code and message in out.output, out.output


def test_a_file_that_is_not_jsonl_or_is_empty_is_refused(url, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ok": 1}\nnot json\n')
    out = invoke("enqueue", "rows.count", "--chunks", bad, "--broker", url)
    assert out.exit_code == 2 and "line 2" in out.output, out.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = invoke("enqueue", "rows.count", "--chunks", empty, "--broker", url)
    assert out.exit_code == 1 and "no items" in out.output, out.output


def test_status_of_an_unknown_group_exits_1(url):
    out = invoke("group", "status", "nope", "--broker", url)
    assert out.exit_code == 1 and "no group nope" in out.output
