"""How long the dashboard takes to render its pages against Redis with 50 workers and 200 queues.

    .venv/bin/python benchmarks/dashboard_render.py [--workers 50] [--queues 200] [--renders 30]

It writes 50 heartbeats (each with 4 children) and 200 queues (each with ready, delayed
and dead messages) under a namespace of its own on the Redis at ``--redis`` (deleted at the
end), then times full renders of each page through Starlette's TestClient, in this process:
the HTTP parsing of a real server is left out, the broker and backend reads and the template
rendering are in.  Target: the overview under 200 ms.  Figures: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

PAGES = ("/", "/overview/live", "/api/overview", "/workers", "/dead-letters", "/dead-letters/q-0000")


def populate(broker, backend, workers: int, queues: int) -> None:
    from stem.brokers.base import Message
    from stem.envelope import Envelope, encode_frame
    names = [f"q-{i:04d}" for i in range(queues)]
    for w in range(workers):
        backend.put_heartbeat(f"host-{w % 10}:{1000 + w}:{uuid.uuid4().hex[:8]}", {
            "host": f"host-{w % 10}", "pid": 1000 + w, "queues": names[w % queues: w % queues + 4],
            "concurrency": 4, "heartbeat_interval": 10.0, "processed": 1000 * w, "succeeded": 990 * w,
            "failed": 10 * w, "running": w % 4, "in_flight": w % 5, "uptime": 3600.0,
            "children": [{"pid": 5000 + 4 * w + c, "state": "busy", "rss": 80 * 2**20, "tasks_done": 250 * w,
                          "running": 1} for c in range(4)]}, ttl=600)
    now = time.time()
    for q in names:
        frames = [Envelope(id=uuid.uuid4().hex, name="bench.task", args={"n": i}, queue=q, enqueued_at=now)
                  for i in range(5)]
        broker.publish_many([Message(e.id, q, encode_frame(e), 0, now + 3600 if i == 4 else None)
                             for i, e in enumerate(frames)])
        for d in broker.consume([q], 1, 1.0):
            broker.dead_letter(d, "failed")


def time_pages(client, renders: int) -> dict[str, dict[str, float]]:
    out = {}
    for page in PAGES:
        assert client.get(page).status_code == 200, page      # warm-up, and a check
        times = []
        for _ in range(renders):
            t0 = time.perf_counter()
            r = client.get(page)
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200
        times.sort()
        out[page] = {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
                     "min_ms": times[0], "bytes": len(r.content)}
    return out


def run(redis_url: str, workers: int, queues: int, renders: int) -> dict:
    import redis
    from starlette.testclient import TestClient

    from stem.backends import RedisResultBackend
    from stem.brokers import RedisBroker
    from stem.dashboard import app

    ns = "stembench_" + uuid.uuid4().hex[:10]
    broker, backend = RedisBroker(redis_url, namespace=ns), RedisResultBackend(redis_url, namespace=ns)
    try:
        populate(broker, backend, workers, queues)
        client = TestClient(app(broker, backend))
        return {"workers": workers, "queues": queues, "renders": renders, "pages": time_pages(client, renders)}
    finally:
        broker.close()
        backend.close()
        with redis.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(match=ns + ":*", count=1000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i:i + 1000])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--workers", type=int, default=50)
    p.add_argument("--queues", type=int, default=200)
    p.add_argument("--renders", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.redis, a.workers, a.queues, a.renders)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['workers']} workers, {res['queues']} queues, {res['renders']} renders per page")
    print(f"{'page':<24}{'median ms':>10}{'p95 ms':>10}{'min ms':>10}{'KiB':>8}")
    for page, f in res["pages"].items():
        print(f"{page:<24}{f['median_ms']:>10.1f}{f['p95_ms']:>10.1f}{f['min_ms']:>10.1f}{f['bytes'] / 1024:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
