"""The examples run (the Redis ones against the local Redis)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run(name, env=None, timeout=60):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_minimal_producer_example():
    out = run("producer_minimal.py")
    assert "sent to a@b.c (attempt 0)" in out and "'rows': 70" in out


def test_minimal_worker_example():
    assert "100 tasks succeeded" in run("worker_minimal.py")


def test_signed_producer_example_on_memory():
    env = {"STEM_BROKER_URL": ""}
    assert "sent to signed@example.com" in run("producer_signed.py", env)


def test_retries_and_signals_example():
    out = run("worker_retries_signals.py")
    assert "SUCCEEDED succeeded on attempt 2 attempt 2" in out


@pytest.mark.timeout(120)
def test_redis_producer_and_worker_examples(redis_own_db_url):
    # the examples run in the default namespace: a db of its own, so they never meet other keys
    env = {"STEM_BROKER_URL": redis_own_db_url}
    worker = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "worker_redis.py")], cwd=EXAMPLES,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = run("producer_redis.py", env, timeout=90)
        assert out.count("SUCCEEDED") == 10
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err


def test_schedules_example():
    out = run("schedules.py")
    assert "published 290 runs" in out and "290 runs succeeded" in out
    assert "nightly-report ran for 2026-03-29T03:00:00+02:00" in out      # 02:30 skipped by the jump: once, at 03:00
    assert "nightly-report ran for 2026-03-30T02:30:00+02:00" in out


def test_batch_sales_report_example_chunks_and_chord():
    out = run("batch_sales_report.py", timeout=120)
    assert "20000 order lines in 40 chunks" in out and "40 of 40 done" in out
    assert "over 40 chunks (matches the order lines)" in out


def test_workflow_example_runs_an_order_through_every_durable_call():
    out = run("workflow_order.py", timeout=120)
    assert ("order-42: SUCCEEDED {'charge': 'ch_42_999', 'parcel': 'parcel-42', 'review': {'stars': 5}, "
            "'points': 10}") in out
