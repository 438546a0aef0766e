"""Helpers shared by the tests: wait on a condition with a deadline (never sleep-and-hope), and
the end-to-end harness: a store by URL (``Store``), worker processes and in-process workers that
are always cleaned up (``Fleet``), what the tasks of ``tests.apps.e2e`` ran (``Ledger``), and a
private PostgreSQL cluster to restart (``private_postgres_cluster``)."""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

from stem import WorkerLifecycleConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
E2E_REGISTRY = "tests.apps.e2e:registry"
READY = "E2E-READY"      # what tests/apps/e2e_worker.py prints once its worker is ready


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.01) -> None:
    """As ``wait_until``, but raise AssertionError naming ``what`` on timeout."""
    if not wait_until(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def flaky(exc: Exception, times: int) -> tuple[Callable[[], str], list[int]]:
    """A call that raises ``exc`` its first ``times`` calls, then returns "ok"; and its calls."""
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "ok"
    return fn, calls


def drop_namespace(client, namespace: str) -> None:
    """Delete every Redis key of ``namespace``: a test's results would outlive it by a day.
    On a cluster client, SCAN covers every primary and each key is deleted on its own node."""
    keys = list(client.scan_iter(match=namespace + ":*", count=1000))
    if hasattr(client, "get_primaries"):
        for key in keys:
            client.delete(key)
        return
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])


def record_peak_in_flight(broker, queue: str = "default") -> list[int]:
    """Wrap ``broker.consume`` so that ``peak[0]`` is the most deliveries of ``queue`` in flight
    right after any consume (what the prefetch window let the worker lease)."""
    peak = [0]
    real_consume = broker.consume

    def consume(*a, **kw):
        out = real_consume(*a, **kw)
        peak[0] = max(peak[0], broker.stats(queue).in_flight)
        return out

    broker.consume = consume
    return peak


# -- a store ------------------------------------------------------------------------------------
class Store:
    """One test's broker and result backend, by URL: the producer, in-process workers and worker
    processes each open their own (``options`` go to both ``from_url`` calls: a Redis namespace).
    ``close`` closes every adapter opened through it, then runs the ``on_close`` cleanups (drop
    the namespace or schema).  ``memory://NAME`` gives one shared instance per process: its first
    ``broker(...)`` call decides the broker's options."""

    def __init__(self, kind: str, url: str, options: dict[str, Any] | None = None):
        self.kind, self.url, self.options = kind, url, dict(options or {})
        self.opened: list[Any] = []
        self.cleanups: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"Store({self.kind!r}, {self.url!r}, {self.options!r})"

    @property
    def in_process_only(self) -> bool:
        """An in-memory store cannot be shared with another process."""
        return self.kind == "memory"

    def broker(self, **kwargs: Any):
        from stem.brokers import from_url
        broker = from_url(self.url, **self.options, **kwargs)
        self.opened.append(broker)
        return broker

    def backend(self, **kwargs: Any):
        from stem.backends import from_url
        backend = from_url(self.url, **self.options, **kwargs)
        self.opened.append(backend)
        return backend

    def producer(self, signer: Any = None, **broker_kwargs: Any):
        """A ``Stem`` over this store that knows the tasks of ``tests.apps.e2e``."""
        from stem import Stem
        from tests.apps.e2e import registry
        return Stem(self.broker(**broker_kwargs), self.backend(), registry, signer)

    def config(self) -> dict[str, Any]:
        """What a worker process needs to open this store (JSON)."""
        if self.in_process_only:
            raise AssertionError(f"{self.url} lives in this process: a worker process cannot open it")
        return {"url": self.url, "options": self.options}

    def on_close(self, cleanup: Callable[[], None]) -> None:
        self.cleanups.append(cleanup)

    def close(self) -> None:
        for adapter in reversed(self.opened):
            with contextlib.suppress(Exception):   # closed already (Stem.close), or its server is gone
                adapter.close()
        self.opened.clear()
        for cleanup in self.cleanups:
            cleanup()
        self.cleanups.clear()


def all_succeeded(backend, ids: Sequence[str]) -> bool:
    """Every task of ``ids`` is SUCCEEDED (statuses read in batches of 1000)."""
    from stem import TaskState
    for i in range(0, len(ids), 1000):
        if not all(s is not None and s.state is TaskState.SUCCEEDED for s in backend.get_many(ids[i:i + 1000])):
            return False
    return True


# -- what ran -----------------------------------------------------------------------------------
class Ledger:
    """The directory ``tests.apps.e2e.effect`` writes to: one file per (worker, child process)."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.path)

    def _files(self) -> list[pathlib.Path]:
        return list(self.path.glob("ran-*"))

    def ran(self) -> collections.Counter:
        """task id -> how many times it ran, over every process."""
        counts: collections.Counter = collections.Counter()
        for f in self._files():
            counts.update(line for line in f.read_text().split("\n") if line)
        return counts

    def total(self) -> int:
        """How many runs, over every process."""
        return sum(f.read_text().count("\n") for f in self._files())

    def by_worker(self) -> dict[str, int]:
        """worker label -> how many runs its processes made."""
        counts: collections.Counter = collections.Counter()
        for f in self._files():
            counts[f.name.split("-")[1]] += f.read_text().count("\n")
        return dict(counts)

    def twice(self) -> list[str]:
        return [task_id for task_id, n in self.ran().items() if n > 1]


# -- workers ------------------------------------------------------------------------------------
def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class WorkerProcess:
    """One process the fleet started, in its own session (its children die with it), its
    output in a file (a full pipe would block it)."""

    def __init__(self, label: str, popen: subprocess.Popen, log: pathlib.Path):
        self.label, self.popen, self.log = label, popen, log
        self.worker_id: str | None = None
        self.expect_exit = False      # set by kill/send/stop: its exit is not a failure

    def __repr__(self) -> str:
        return f"WorkerProcess({self.label!r}, pid={self.pid}, returncode={self.popen.poll()})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self, text: str) -> list[str]:
        return [line for line in self.output().splitlines() if text in line]

    def send(self, sig: int) -> None:
        """Signal the worker itself (SIGTERM: warm shutdown, SIGINT: soft, SIGQUIT: hard)."""
        self.expect_exit = True
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker, its zygote and children) and reap it."""
        self.expect_exit = True
        _killpg(self.pid)
        self.popen.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """``sig``, then its exit code; SIGKILL and fail when it has not exited within ``timeout``."""
        self.send(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.label} did not exit within {timeout}s of signal {sig}:\n"
                                 f"{self.output()[-5000:]}") from None

    def exited_unexpectedly(self) -> bool:
        return not self.expect_exit and self.popen.poll() is not None


class Fleet:
    """The workers of one test: processes (``process``, ``start``) and in-process workers
    (``in_process``).  ``wait_for`` fails at once, with the output, when a process exits that
    no test step stopped; ``close`` stops everything (SIGTERM, then SIGKILL of each process
    group), whatever the test did, and prints each process's output (pytest shows it when the
    test failed)."""

    def __init__(self, directory: pathlib.Path, stop_timeout: float = 15.0):
        self.dir = pathlib.Path(directory)
        self.stop_timeout = stop_timeout      # what ``close`` gives a SIGTERM before SIGKILL
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[WorkerProcess] = []
        self.workers: list[Any] = []
        self.closed = False

    def start(self, argv: Sequence[str], *, label: str | None = None, env: dict[str, str] | None = None,
              ready: str | None = None, timeout: float = 30.0) -> WorkerProcess:
        """Run ``argv`` (cwd: the repository root, which is on its PYTHONPATH); with ``ready``,
        return once a line of its output holds that text, failing after ``timeout`` seconds or
        when it exits first."""
        label = label or f"w{len(self.procs)}"
        log = self.dir / f"{label}.log"
        environ = {**os.environ, **(env or {}), "STEM_E2E_WORKER": label,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as out:
            popen = subprocess.Popen(list(argv), cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = WorkerProcess(label, popen, log)
        self.procs.append(proc)
        if ready is not None:
            self.wait_for(lambda: proc.lines(ready), timeout, f"{label} to print {ready!r}")
        return proc

    def process(self, store: Store, *, concurrency: int = 2, visibility_timeout: float | None = None,
                signing_key: bytes | None = None, queues: Sequence[str] | None = None,
                label: str | None = None, timeout: float = 30.0, registry: str | None = None,
                **config_extra: Any) -> WorkerProcess:
        """A worker process (``tests/apps/e2e_worker.py``) on ``store``, running the tasks of
        ``tests.apps.e2e`` (or of ``registry``); returns once it is ready.  ``config_extra``:
        more of its config (``heartbeat_interval``, ``completion_grace``, ``crash_at_completion``)."""
        config = {**store.config(), "concurrency": concurrency, "visibility_timeout": visibility_timeout,
                  "signing_key": signing_key.hex() if signing_key else None, "queues": list(queues or []),
                  "registry": registry, **config_extra}
        proc = self.start([sys.executable, "-m", "tests.apps.e2e_worker", json.dumps(config)], label=label,
                          ready=READY, timeout=timeout)
        proc.worker_id = proc.lines(READY)[0].split()[-1]
        return proc

    def in_process(self, store: Store, *, concurrency: int = 1, visibility_timeout: float | None = None,
                   signer: Any = None, **worker_kwargs: Any):
        """A ``Worker`` in this process on ``store`` (``run_in_background``), shut down (hard)
        by ``close``."""
        from stem import Worker, WorkerLifecycleConfig
        broker_kwargs = {"default_visibility_timeout": visibility_timeout} if visibility_timeout else {}
        worker_kwargs.setdefault("lifecycle", WorkerLifecycleConfig(install_signal_handlers=False,
                                                                    soft_grace_period=5, force_shutdown_after=5))
        worker = Worker(store.broker(**broker_kwargs), store.backend(), E2E_REGISTRY, concurrency=concurrency,
                        signer=signer, **worker_kwargs)
        self.workers.append(worker)
        return worker.run_in_background()

    def unexpected_exits(self) -> list[WorkerProcess]:
        return [p for p in self.procs if p.exited_unexpectedly()]

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
                 interval: float = 0.02) -> None:
        """``wait_for`` that also fails as soon as a process exits that was not told to."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            dead = self.unexpected_exits()
            if dead:
                raise AssertionError(f"while waiting for {what}: " + "; ".join(
                    f"{p.label} exited with code {p.returncode}" for p in dead) + "\n" + self.logs())
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.label} (pid {p.pid}, exit {p.returncode}) ---\n{p.output()[-tail:]}"
                         for p in self.procs)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        from stem import ShutdownMode
        for worker in self.workers:            # all at once: each takes a fetch round to stop
            worker.shutdown_nowait(ShutdownMode.HARD)
        for p in self.procs:
            if p.popen.poll() is None:
                p.send(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for worker in self.workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            _killpg(p.pid)        # a straggler, or its zygote and children left behind
            p.popen.wait(10)
        if self.procs:
            print(self.logs())


# -- a private PostgreSQL cluster ------------------------------------------------------------------
def _pg_bindir() -> str | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P <= 55535)."""
    import random
    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class PrivateCluster:
    """A PostgreSQL cluster of one test (initdb on a free port), to stop and start under load."""

    def __init__(self, bindir: str, root: str, as_user: list[str]):
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data = os.path.join(root, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, os.path.join(self.bindir, args[0]), *args[1:]], check=True,
                       timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        import psycopg
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "-t", "30", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")


@contextlib.contextmanager
def private_postgres_cluster(require: bool = False) -> Iterator[PrivateCluster]:
    """A started ``PrivateCluster``, removed afterwards; skips the test without initdb (fails
    it instead with ``require``: STEM_REQUIRE_SERVICES=1)."""
    import pytest
    bindir = _pg_bindir()
    if bindir is None:
        if require:
            pytest.fail("initdb not found and STEM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("initdb not found (install postgresql)")
    root = tempfile.mkdtemp(prefix="stem-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:        # initdb refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PrivateCluster(bindir, root, as_user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


class RedisServer:
    """A private redis-server: ``start`` polls until it answers (with a deadline), ``kill`` is SIGKILL."""

    def __init__(self, directory, port: int | None = None, args: Sequence[str] = ()):
        self.dir = str(directory)
        self.port = port or free_port()
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        import redis
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir,
             "--logfile", os.path.join(self.dir, "redis.log"), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    if client.ping():
                        return self
                finally:
                    client.close()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.dir}/redis.log")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()


class SentinelSetup:
    """A Redis master, one replica and one sentinel (quorum 1) of the test's own, on free
    ports: ``url`` is the ``redis+sentinel://`` URL of its service; ``failover_by_kill``
    SIGKILLs the master and returns once the sentinel names the promoted replica."""

    SERVICE = "stemmaster"

    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        (self.dir / "master").mkdir(parents=True, exist_ok=True)
        (self.dir / "replica").mkdir(parents=True, exist_ok=True)
        (self.dir / "sentinel").mkdir(parents=True, exist_ok=True)
        self.master = RedisServer(self.dir / "master")
        self.replica = RedisServer(self.dir / "replica",
                                   args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/{db}"

    def _sentinel_client(self):
        import redis
        return redis.Redis(port=self.sentinel_port, socket_timeout=2, socket_connect_timeout=2,
                           decode_responses=True)

    def master_port(self) -> int | None:
        import redis
        try:
            with self._sentinel_client() as client:
                addr = client.execute_command("SENTINEL", "get-master-addr-by-name", self.SERVICE)
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        return int(addr[1]) if addr else None

    def _replica_known(self) -> bool:
        import redis
        try:
            with self._sentinel_client() as client:
                replicas = client.execute_command("SENTINEL", "replicas", self.SERVICE)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        for entry in replicas:
            fields = dict(zip(entry[::2], entry[1::2])) if isinstance(entry, list) else entry
            if (int(fields.get("port", 0)) == self.replica.port and "s_down" not in fields.get("flags", "")
                    and fields.get("master-link-status") == "ok"):
                return True
        return False

    def start(self, timeout: float = 30.0) -> "SentinelSetup":
        self.master.start()
        self.replica.start()
        conf = self.dir / "sentinel" / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir / 'sentinel'}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 500\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n")
        self.sentinel = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel", "--logfile", str(self.dir / "sentinel" / "sentinel.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.master_port() == self.master.port and self._replica_known(), timeout,
                 "the sentinel to know the master and its replica")
        return self

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Return once the replica has every write the master took so far (WAIT 1)."""
        import redis
        with redis.Redis(port=self.master.port, socket_timeout=timeout + 5) as client:
            acked = client.execute_command("WAIT", 1, int(timeout * 1000))
        if acked < 1:
            raise AssertionError(f"the replica did not catch up within {timeout}s")

    def failover_by_kill(self, timeout: float = 60.0) -> None:
        self.master.kill()
        wait_for(lambda: self.master_port() == self.replica.port, timeout,
                 "the sentinel to promote the replica")

    def stop(self) -> None:
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait(10)
        self.sentinel = None
        self.replica.kill()
        self.master.kill()


class ClusterSetup:
    """A Redis Cluster of the test's own: ``masters`` primaries with ``replicas`` replicas
    each, on free ports, made with ``redis-cli --cluster create``; ``start`` returns once every
    node says ``cluster_state:ok`` and every replica is in sync.  ``url`` is its
    ``redis+cluster://`` URL; ``failover_by_kill`` SIGKILLs the primary of a key's slot and
    returns once its replica took the slot over."""

    def __init__(self, directory, masters: int = 3, replicas: int = 0):
        self.dir = pathlib.Path(directory)
        self.masters, self.replicas = masters, replicas
        self.nodes: list[RedisServer] = []
        for i in range(masters * (1 + replicas)):
            d = self.dir / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(d, port=free_cluster_port(), args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                "--appendonly", "no", "--appendfsync", "everysec"]))

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2]) + "/"

    def client(self):
        """A plain redis-py cluster client (the tests' view of the data, and their cleanup)."""
        from redis.cluster import RedisCluster
        return RedisCluster(host="127.0.0.1", port=self.live()[0].port, socket_timeout=5)

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def _info(self, node: RedisServer, section: str) -> dict[str, str]:
        import redis
        with redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True) as c:
            text = c.execute_command("CLUSTER", "INFO") if section == "cluster" else None
            if text is None:
                return {k: str(v) for k, v in c.info(section).items()}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def _healthy(self) -> bool:
        import redis
        try:
            for node in self.live():
                if self._info(node, "cluster").get("cluster_state") != "ok":
                    return False
                info = self._info(node, "replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            with self.client() as c:
                masters = {n.port for n in self.live()
                           if self._info(n, "replication").get("role") == "master"}
                return len(masters) >= self.masters and len(c.get_primaries()) == self.masters
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError):
            return False

    def start(self, timeout: float = 60.0) -> "ClusterSetup":
        for node in self.nodes:
            node.start()
        done = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                               "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        wait_for(self._healthy, timeout, "the cluster to say cluster_state:ok with every replica in sync")
        return self

    def primary_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        with self.client() as c:
            node = c.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == node.port)

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Return once every replica has every write its primary took before this call."""
        wanted: dict[int, int] = {}
        for node in self.live():
            info = self._info(node, "replication")
            if info.get("role") == "master" and int(info.get("connected_slaves", 0)):
                wanted[node.port] = int(info["master_repl_offset"])

        def caught_up() -> bool:
            for node in self.live():
                if node.port in wanted:
                    replica = self._raw_info_line(node, "slave0")
                    if replica is None or int(replica.get("offset", -1)) < wanted[node.port]:
                        return False
            return True
        wait_for(caught_up, timeout, "the replicas to catch up")

    def _raw_info_line(self, node: RedisServer, name: str) -> dict[str, str] | None:
        import redis
        with redis.Redis(port=node.port, socket_timeout=2, decode_responses=True) as c:
            value = c.info("replication").get(name)
        return value if isinstance(value, dict) else None

    def failover_by_kill(self, key: str, timeout: float = 60.0) -> RedisServer:
        """SIGKILL the primary of ``key``'s slot; return it once another node serves the slot
        and the cluster is ok again."""
        victim = self.primary_of(key)
        victim.kill()

        def promoted() -> bool:
            import redis
            try:
                return self.primary_of(key).port != victim.port and all(
                    self._info(n, "cluster").get("cluster_state") == "ok" for n in self.live())
            except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, StopIteration):
                return False
        wait_for(promoted, timeout, "a replica to take over the killed primary's slots")
        return victim

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def raw_client(url: str):
    """A plain redis-py client on what ``url`` names: a ``RedisCluster`` for a
    ``redis+cluster://`` URL (its first node), else ``redis.Redis``."""
    import redis
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster
        host, _, port = url[len("redis+cluster://"):].split(",")[0].rstrip("/").rpartition(":")
        return RedisCluster(host=host, port=int(port), socket_timeout=5)
    return redis.Redis.from_url(url)


# -- in-process workers on the in-memory adapters ---------------------------------------------
#: An in-process worker's lifecycle in a test: no signal handlers, short grace periods.
NO_SIGNALS = WorkerLifecycleConfig(install_signal_handlers=False, soft_grace_period=5, force_shutdown_after=5)


class WorkerEnv:
    """A registry, in-memory adapters, a producer (``stem``) and a worker factory (``worker(**kw)``:
    a ``Worker`` with ``isolation``, ``concurrency``, no signal handlers and a fixed 10 ms retry
    unless ``kw`` says otherwise; started in the background when ``start``).  ``attrs`` become
    attributes (``tmp``, ...).  ``close`` shuts every worker down."""

    def __init__(self, isolation: str, *, concurrency: int = 2, start: bool = False, **attrs: Any):
        from stem import Stem, TaskRegistry
        from stem.backends import InMemoryResultBackend
        from stem.brokers import InMemoryBroker
        self.registry = TaskRegistry()
        self.broker, self.backend = InMemoryBroker(), InMemoryResultBackend()
        self.stem = Stem(self.broker, self.backend, self.registry)
        self.isolation = isolation
        self._concurrency, self._start = concurrency, start
        self._workers: list[Any] = []
        self.__dict__.update(attrs)

    def worker(self, **kw: Any) -> Any:
        from stem import Worker
        from stem.retry import FixedRetryStrategy
        kw.setdefault("concurrency", self._concurrency)
        kw.setdefault("lifecycle", NO_SIGNALS)
        kw.setdefault("retry_strategy", FixedRetryStrategy(0.01))
        kw.setdefault("isolation", self.isolation)
        w = Worker(self.broker, self.backend, self.registry, **kw)
        self._workers.append(w)
        if self._start:
            w.run_in_background()
        return w

    def close(self) -> None:
        from stem import ShutdownMode
        for w in self._workers:
            w.shutdown(ShutdownMode.HARD, timeout=15)


def worker_env(isolation: str, **kw: Any) -> Iterator[WorkerEnv]:
    """The body of an ``env`` fixture: ``yield from worker_env(isolation, ...)``."""
    env = WorkerEnv(isolation, **kw)
    try:
        yield env
    finally:
        env.close()


# -- SQL stores as an older stem left them ------------------------------------------------------
@contextlib.contextmanager
def store_at_version(url: str, version: int, *rows: tuple[str, Sequence[Any]]) -> Iterator[str]:
    """A SQLite file (``sqlite:///path``) or a Postgres schema (``postgresql://...?schema=name``) as
    stem of schema ``version`` left it: the migrations up to it (versions are append-only, so
    these are what that stem wrote), then ``rows``, each (statement, params) in the store's
    dialect (``{s}``: the quoted Postgres schema).  Yields ``url``; a Postgres schema is dropped
    on exit."""
    if url.startswith("sqlite:///"):
        import sqlite3
        from stem.stores import sqlite_schema
        raw = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        try:
            raw.execute("CREATE TABLE stem_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            for v in range(1, version + 1):
                for statement in sqlite_schema.MIGRATIONS[v]:
                    raw.execute(statement)
                raw.execute("INSERT INTO stem_schema_version VALUES (?, ?)", (v, time.time()))
            for statement, params in rows:
                raw.execute(statement, params)
        finally:
            raw.close()
        yield url
        return
    import psycopg
    from stem.stores import postgres_schema
    base, _, schema = url.partition("?schema=")
    s = postgres_schema.quote_schema(schema)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(f"CREATE TABLE {s}.stem_schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for v in range(1, version + 1):
            for statement in postgres_schema.MIGRATIONS[v]:
                conn.execute(statement.format(s=s))
            conn.execute(f"INSERT INTO {s}.stem_schema_version (version) VALUES (%s)", (v,))
        for statement, params in rows:
            conn.execute(statement.format(s=s), params)
    try:
        yield url
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")


def sql_rows(url: str, sql: str) -> list[tuple]:
    """The rows of ``sql`` in a SQLite file or a Postgres schema (``store_at_version``'s URLs;
    on Postgres the schema is the search path, so tables are named bare)."""
    if url.startswith("sqlite:///"):
        import sqlite3
        raw = sqlite3.connect(url[len("sqlite:///"):])
        try:
            return raw.execute(sql).fetchall()
        finally:
            raw.close()
    import psycopg
    base, _, schema = url.partition("?schema=")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        return conn.execute(sql).fetchall()


def schema_versions(url: str) -> list[int]:
    """The versions a SQLite file or Postgres schema records as applied."""
    return [v for (v,) in sql_rows(url, "SELECT version FROM stem_schema_version ORDER BY 1")]


def current_version(url: str) -> int:
    """This stem's schema version for the store ``url`` names (SQLite or Postgres)."""
    from stem.stores import postgres_schema, sqlite_schema
    return (sqlite_schema if url.startswith("sqlite:///") else postgres_schema).SCHEMA_VERSION


def old_broker_rows(url: str, queue: str) -> list[tuple[str, tuple]]:
    """A queue, a ready message (``old-ready``) and a dead letter (``old-dead``) as every schema
    version since 1 writes them, for ``store_at_version``."""
    now = time.time()
    if url.startswith("sqlite:///"):
        return [("INSERT INTO stem_queues VALUES (?)", (queue,)),
                ("INSERT INTO stem_messages (queue, task_id, priority, state, available_at, frame) "
                 "VALUES (?, 'old-ready', 0, 0, ?, ?)", (queue, now, b"old")),
                ("INSERT INTO stem_dead_letters (queue, task_id, reason, failed_at, frame) "
                 "VALUES (?, 'old-dead', 'poison', ?, ?)", (queue, now, b"dead"))]
    return [("INSERT INTO {s}.stem_queues VALUES (%s)", (queue,)),
            ("INSERT INTO {s}.stem_jobs (queue, task_id, priority, state, available_at, frame) "
             "VALUES (%s, 'old-ready', 0, 0, %s, %s)", (queue, now, b"old")),
            ("INSERT INTO {s}.stem_dead_letters (queue, task_id, reason, failed_at, frame) "
             "VALUES (%s, 'old-dead', 'poison', %s, %s)", (queue, now, b"dead"))]
