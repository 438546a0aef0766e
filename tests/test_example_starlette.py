"""examples/starlette_app.py serves requests through its lifespan's AsyncStem, a worker running beside it."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.timeout(120)
def test_starlette_example_enqueues_per_request_and_waits_for_results(redis_own_db_url, monkeypatch):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx2")            # what starlette's TestClient speaks (httpx is deprecated there)
    import importlib.util

    from starlette.testclient import TestClient
    monkeypatch.syspath_prepend(EXAMPLES)      # the example imports its neighbour tasks.py
    monkeypatch.setenv("STEM_BROKER_URL", redis_own_db_url)
    spec = importlib.util.spec_from_file_location("starlette_app", os.path.join(EXAMPLES, "starlette_app.py"))
    starlette_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(starlette_app)

    worker = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "worker_redis.py")], cwd=EXAMPLES,
                              env={**os.environ, "STEM_BROKER_URL": redis_own_db_url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with TestClient(starlette_app.create_app(redis_own_db_url)) as client:   # runs the lifespan
            ids = [client.post("/emails", params={"to": f"u{i}@x.y"}).json()["id"] for i in range(5)]
            results = [client.get(f"/tasks/{i}/result", params={"timeout": 60}).json() for i in ids]
            assert [r["result"] for r in results] == [f"sent to u{i}@x.y (attempt 0)" for i in range(5)]
            assert client.get(f"/tasks/{ids[0]}").json()["state"] == "SUCCEEDED"
            assert client.get("/tasks/unknown").json()["state"] == "PENDING"
            assert client.get("/tasks/nothing/result", params={"timeout": 0.1}).status_code == 504
            assert client.get("/tasks/nothing/result", params={"timeout": -1}).status_code == 400
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
