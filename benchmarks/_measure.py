"""Measurement helpers shared by ``benchmarks/e2e.py`` and ``benchmarks/peers/``.

CPU of a process tree: for every live process in the tree, user + system time
plus the time of its children that already exited and were reaped
(``children_user``/``children_system``), so a process that starts and ends
inside a measured phase (an RQ work horse, a recycled child) still counts.
Each process is counted once: a live process through its own times, a reaped
one through its parent's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from typing import Iterable, Sequence

import psutil

__all__ = ["source_revision", "TreeMeter", "cpu_seconds", "redis_server_pid", "redis_benchmark", "steady_rate",
           "median", "drop_keys", "machine_probe_ms"]


def source_revision() -> str | None:
    """The checkout's commit, with "+dirty" when stem/ or _speedups/ have uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "stem", "_speedups"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class TreeMeter:
    """CPU seconds and RSS of a process and all its descendants."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return []

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs():
            try:
                total += cpu_seconds(p)
            except psutil.Error:
                pass
        return total

    def cpu_split(self) -> tuple[float, float]:
        """(CPU seconds of the root process, of all its descendants).

        When the root is this process (an in-process worker), its own CPU comes
        from ``time.process_time()``: the kernel's tick-rounded times (10 ms)
        would make "process CPU minus the producer thread's" (nanoseconds) come
        out negative over a short phase.
        """
        root = kids = 0.0
        for p in self.procs():
            try:
                c = cpu_seconds(p)
            except psutil.Error:
                continue
            if p.pid == self.root.pid:
                t = p.cpu_times()
                root += time.process_time() if p.pid == os.getpid() else t.user + t.system
                kids += t.children_user + t.children_system
            else:
                kids += c
        return root, kids

    def rss(self) -> tuple[int, list[int]]:
        """(root RSS, [RSS of each descendant]) in bytes."""
        root, kids = 0, []
        for p in self.procs():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            if p.pid == self.root.pid:
                root = rss
            else:
                kids.append(rss)
        return root, kids


def redis_server_pid(client) -> int | None:
    """The redis-server pid (from INFO), when it runs on this machine and psutil can see it."""
    try:
        pid = int(client.info("server")["process_id"])
        psutil.Process(pid).cpu_times()
        return pid
    except Exception:  # noqa: BLE001 - remote server or no permission: no figure
        return None


def redis_benchmark(host: str, port: int, db: int, command: Sequence[str], *, n: int = 200_000,
                    pipeline: int = 64, clients: int | None = None) -> float | None:
    """Requests/s that ``redis-benchmark -P <pipeline> -n <n> <command>`` reports, or None."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    argv = [exe, "-h", host, "-p", str(port), "--dbnum", str(db), "-P", str(pipeline), "-n", str(n), "-q"]
    if clients is not None:
        argv += ["-c", str(clients)]
    out = subprocess.run(argv + list(command), check=True, capture_output=True, text=True, timeout=300).stdout
    # progress lines end in "\r"; the last one reads "XADD k * ...: 111023.30 requests per second, p50=..."
    for line in reversed(out.replace("\r", "\n").splitlines()):
        if "requests per second" in line:
            return float(line.split(" requests per second")[0].rsplit(": ", 1)[-1].replace(",", ""))
    return None


def steady_rate(samples: Sequence[tuple[float, int]], total: int, lo: float = 0.1, hi: float = 0.9) -> float | None:
    """Tasks/s between the first sample at ``lo`` * total done and the first at ``hi`` * total."""
    a = next(((t, n) for t, n in samples if n >= lo * total), None)
    b = next(((t, n) for t, n in samples if n >= hi * total), None)
    if a is None or b is None or b[0] <= a[0] or b[1] <= a[1]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def drop_keys(client, match: str) -> None:
    """Unlink every key matching ``match`` (a run's namespace), in chunks: a benchmark
    leaves nothing behind on a shared Redis."""
    keys = list(client.scan_iter(match=match, count=1000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i:i + 1000])


def machine_probe_ms(loops: int = 1_000_000) -> float:
    """Milliseconds for a fixed pure-Python loop: how fast this machine runs right now.

    A shared VM's speed drifts (this loop read 36-70 ms across one bench-peers run
    on the benchmark VM), and every system's figures move with it; recorded
    beside each run, it tells a slow run of the machine from a slow system."""
    start = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i
    return (time.perf_counter() - start) * 1000.0

