"""Instructions (valgrind's callgrind, ``Collected``) of ``benchmarks.chord``'s burst worker
draining N plain tasks, then an N-member chord, minus a drain of an empty queue (start and
stop), per task: a figure the machine's load does not move much (benchmarks/README.md,
"Canvas").  Runs the worker from ``TREE`` (a ``git archive`` of another commit with the same
``.so`` files gives a baseline), with this checkout's ``.venv``:

    .venv/bin/python benchmarks/chord_instructions.py TREE N REDIS_URL

Needs ``valgrind`` on PATH; N = 10,000 takes 5-15 minutes.
"""
import json, os, re, subprocess, sys, uuid


def main() -> None:
    root, n, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, root)
    os.chdir(root)
    from benchmarks.chord import _open
    from stem.canvas import Signature, chord, group
    py = sys.executable

    def drain(ns: str) -> int:
        config = {"url": url, "namespace": ns, "concurrency": 2, "isolation": "inline"}
        p = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", py, "-m",
                            "benchmarks.chord", "--worker", json.dumps(config)], cwd=root, capture_output=True,
                           text=True)
        m = re.search(r"Collected : (\d+)", p.stderr)
        return int(m.group(1))
    ns = "stembench_" + uuid.uuid4().hex[:8]
    stem = _open(url, ns)
    try:
        base = drain(ns)     # an empty queue: the startup and shutdown alone
        stem.enqueue_many([("bench.noop", {"i": i}) for i in range(n)])
        plain = drain(ns)
        members = group(Signature("bench.noop", {"i": i}) for i in range(n))
        h = stem.apply(chord(members, Signature("bench.total")))
        ch = drain(ns)
        assert h.wait(60).result == n * (n - 1) // 2
        print(json.dumps({"root": root, "n": n, "empty": base, "plain": plain, "chord": ch,
                          "plain_per_task": (plain - base) / n, "chord_per_task": (ch - base) / n,
                          "ratio": (ch - base) / (plain - base)}))
    finally:
        import redis
        c = redis.Redis.from_url(url)
        keys = list(c.scan_iter(f"{ns}:*", count=10000))
        for i in range(0, len(keys), 10000):
            c.delete(*keys[i:i + 10000])
        stem.close()


if __name__ == "__main__":
    main()
