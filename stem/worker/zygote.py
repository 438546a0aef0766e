"""The zygote: a small process, started once, that forks every child.

The supervisor forks the zygote when the worker starts, before the worker's
own threads run and before it opens broker connections, so the zygote holds
no lock another thread owned and no socket it could corrupt.  Each child is
then one ``fork()`` of that quiet process (a few ms), never a fresh
interpreter.  The zygote reaps its children and reports their exit codes.

Protocol: one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair (message boundaries
kept, file descriptors passed with ``SCM_RIGHTS``), pickled tuples:

    supervisor -> zygote   ("fork", name, capacity, bell_index, params)  + the channel's doorbell fds
                           ("stop",)
    zygote -> supervisor   ("ready",) | ("fatal", message)   a spawned zygote loaded the registry, or not
                           ("forked", pid) + the child's pidfd where Linux has them | ("fork-failed", message)
                           ("exited", pid, exitcode)   (negative: killed by that signal)

When the supervisor's end closes (the supervisor died or stopped), the zygote
kills its children and exits: no orphan keeps running a task whose result
nobody will store.

When the zygote dies (the OOM killer, ``kill -9``), the worker recovers
instead of stopping: the zygote is only the fork point, and nothing a child
needs goes through it.

- The children keep running: they talk to the supervisor through their
  shared-memory rings only.  They are orphans now (reparented to init), so
  their exits are watched through the pidfd each one came with (``forked``
  above; a pidfd names that very process, so a reused pid cannot fool it).
  An orphan's exit code is lost: one that held a task counts as a crash.
- Replacements come from a new zygote, started as a fresh interpreter
  (``subprocess``: fork+exec, safe from a threaded supervisor, unlike a
  ``fork()`` of it; it inherits no fd but its socket): it loads the registry
  by its ``module:attribute`` path, or unpickles the registry object, and
  says ``ready``.  Until then the children owed are counted and forked at
  once on ``ready``; the worker keeps serving with the children it has.
  Not ``multiprocessing``'s ``spawn``: that re-runs the main script, and a
  script that starts a worker without an ``if __name__ == "__main__"`` guard
  would start a second worker inside the zygote.  So a registry object whose
  tasks live in the main script cannot be loaded there: give the worker its
  ``module:attribute`` path.  Not one spawned child per replacement either
  (``start_method="spawn"``): it needs the registry loaded the same way, and
  a zygote keeps every later replacement a fork.
- The worker stops instead (hard: running tasks killed and requeued; the
  reason logged and kept as the pool's ``error``) when that cannot work: no
  pidfds (not Linux, or a kernel before 5.3: then the orphans are killed by
  pid at once, while known alive, and their tasks fail as crashed), a
  registry that cannot be pickled or loaded in a fresh interpreter, a new
  zygote that dies before it is ready or is not ready within
  ``STARTUP_TIMEOUT``, or zygotes that keep dying (``keeper.MAX_ZYGOTE_DEATHS``).

Known gaps: a child forked just before the zygote died, whose pid never
reached the supervisor, idles until the supervisor exits (it then notices
and exits); children of a new zygote do not inherit what the supervisor set
up at run time (logging handlers, ``stem.tracing.install()``, task hooks),
as with ``start_method="spawn"``.

Nothing here can spin on a dead socket: the first EOF or error marks the
zygote gone and is reported once; nothing reads the socket after that, and
the supervisor stops polling it.  The supervisor's waits for a reply have a
deadline.
"""

from __future__ import annotations

import array
import functools
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable

from ..errors import WorkerError
from .channel import ChannelHandle

__all__ = ["Zygote", "ZygoteGone", "GONE"]

log = logging.getLogger("stem.worker.zygote")
_MAX_MSG = 1 << 16

#: The event ``events()`` reports once when the zygote's socket reached EOF or failed.
GONE = ("gone",)

#: Seconds the supervisor waits for the zygote to answer a fork (it takes a few ms).
FORK_TIMEOUT = 10.0


class ZygoteGone(WorkerError):
    """The zygote died (or stopped answering); its last events are still in ``events()``."""


class Zygote:
    def __init__(self, child_main: Callable[[ChannelHandle, dict[str, Any]], int] | None = None):
        self._child_main = child_main
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.ready = False        # can fork: at once when forked, on "ready" when spawned
        self.was_ready = False    # ever was (a zygote that dies before it is ready never will be)
        self.gone = False         # its socket reached EOF: never read again
        self._process: subprocess.Popen | None = None   # a spawned zygote
        self._events: list[tuple] = []
        self._lock = threading.Lock()

    # -- supervisor side ----------------------------------------------------------
    def start(self) -> None:
        """Fork the zygote from this process (only while it has no other threads)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a multi-threaded process; the zygote
            # only serves this socket and forks, so no other thread's lock is ever used.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                parent.close()
                code = self._serve(child)
            except BaseException:  # noqa: BLE001 - report and leave without running any finalizer
                try:
                    import traceback
                    traceback.print_exc()
                finally:
                    code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.sock = parent
        self.ready = self.was_ready = True

    @classmethod
    def spawn(cls, registry: Any, *, normal_policy: bool = False) -> "Zygote":
        """A zygote in a fresh interpreter, for a supervisor that runs threads already.

        ``registry`` is a ``module:attribute`` path or a picklable ``TaskRegistry``
        (pickling errors raise here, in the caller).  Returns at once; the zygote
        says ``("ready",)`` once it loaded the registry, or ``("fatal", why)``."""
        boot = pickle.dumps({"registry": registry if isinstance(registry, str) else pickle.dumps(registry),
                             "sys_path": list(sys.path), "normal_policy": normal_policy})
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            flags = getattr(subprocess, "_args_from_interpreter_flags", lambda: [])()
            process = subprocess.Popen([sys.executable, *flags, "-c", _BOOT, str(child.fileno())],
                                       stdin=subprocess.PIPE, pass_fds=[child.fileno()])
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            process.stdin.write(boot)   # read at once by the zygote's first line
        except OSError:   # it died already: its socket says so
            pass
        finally:
            try:
                process.stdin.close()
            except OSError:
                pass
        zygote = cls()
        zygote._process = process
        zygote.pid = process.pid
        zygote.sock = parent
        return zygote

    def fileno(self) -> int:
        return self.sock.fileno()

    def fork(self, handle: ChannelHandle, params: dict[str, Any]) -> tuple[int, int | None]:
        """Fork one child attached to ``handle``; returns its pid and pidfd (None where
        the zygote could not open one).  Raises ``ZygoteGone`` when the zygote died."""
        unique = list(dict.fromkeys(handle.bells))
        index = tuple(unique.index(fd) for fd in handle.bells)
        msg = pickle.dumps(("fork", handle.name, handle.capacity, index, params))
        with self._lock:
            if self.gone:
                raise ZygoteGone(f"the zygote process ({self.pid}) is gone")
            try:
                socket.send_fds(self.sock, [msg], unique)
            except OSError as exc:
                self._mark_gone()
                raise ZygoteGone(f"the zygote process ({self.pid}) is gone ({exc})") from None
            deadline = time.monotonic() + FORK_TIMEOUT
            while True:
                reply, fds = self._recv(deadline - time.monotonic())
                if reply is None:   # alive but silent (stopped?): of no use any more
                    _signal(self.pid, signal.SIGKILL)
                    self._mark_gone()
                    raise ZygoteGone(f"the zygote process ({self.pid}) did not answer within {FORK_TIMEOUT}s")
                if reply[0] == "forked":
                    return reply[1], (fds[0] if fds else None)
                _close_all(fds)
                if reply[0] == "fork-failed":
                    raise WorkerError(f"could not fork a child: {reply[1]}")
                if reply is GONE:
                    raise ZygoteGone(f"the zygote process ({self.pid}) exited while forking a child")
                self._events.append(reply)

    def events(self) -> list[tuple]:
        """Pending events: ("exited", pid, code), ("ready",), ("fatal", message), and GONE
        once, last; call when ``fileno()`` is readable (returns at once when it is not)."""
        with self._lock:
            while not self.gone:
                msg, fds = self._recv(0.0)
                _close_all(fds)
                if msg is None:
                    break
                if msg is GONE:
                    break    # _mark_gone queued it
                self._events.append(msg)
            out, self._events = self._events, []
            return out

    def _recv(self, timeout: float) -> tuple[tuple | None, list[int]]:
        """One message and the fds it carried; (None, []) when none came within ``timeout``
        seconds; (GONE, []) on EOF or a socket error, which also marks the zygote gone."""
        if self.gone:
            return GONE, []
        if timeout > 0:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(timeout * 1000):
                return None, []
        try:
            data, fds = _recv_nowait(self.sock)
        except (BlockingIOError, InterruptedError):
            return None, []
        except OSError:
            data, fds = b"", []
        if not data:
            _close_all(fds)
            self._mark_gone()
            return GONE, []
        msg = pickle.loads(data)
        if msg[0] == "ready":   # (fork() may read it, when asked to fork by then)
            self.ready = self.was_ready = True
        return msg, fds

    def _mark_gone(self) -> None:
        """Under the lock: stop reading; the owner learns it from ``events()`` (GONE, once)."""
        if not self.gone:
            self.gone = True
            self.ready = False
            self._events.append(GONE)

    def close(self, timeout: float = 1.0) -> int | None:
        """Forget a zygote that is gone: close the socket and reap the process; its exit code."""
        with self._lock:
            self.gone = True
            self.ready = False
            if self.sock is not None:
                self.sock.close()
                self.sock = None
        return self._reap(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.sock is not None:
                try:
                    self.sock.send(pickle.dumps(("stop",)))
                except OSError:
                    pass
                self.sock.close()
                self.sock = None
            self.gone = True
            self.ready = False
        self._reap(timeout)

    def _reap(self, timeout: float) -> int | None:
        if self.pid is None:
            return None
        pid, self.pid = self.pid, None
        if self._process is not None:
            try:
                return self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                return self._process.wait()
        return _reap(pid, timeout)

    # -- zygote side ----------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        children: set[int] = set()
        # poll, not select: the zygote inherits its parent's descriptors, which in a busy
        # process run past select's limit of 1024
        poller = select.poll()
        sock_fd = sock.fileno()
        poller.register(sock_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            readable = {fd for fd, _ in poller.poll(1000)}
            if wake_r in readable:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                try:
                    sock.send(pickle.dumps(("exited", pid, os.waitstatus_to_exitcode(status))))
                except OSError:
                    pass
            if sock_fd not in readable:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MSG, 16)
            except OSError:
                data, fds = b"", []
            if not data:
                return self._shutdown(children)
            msg = pickle.loads(data)
            if msg[0] == "stop":
                return self._shutdown(children)
            _, name, capacity, index, params = msg
            handle = ChannelHandle(name, capacity, tuple(fds[i] for i in index), _received=True)
            try:
                pid = os.fork()
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                sock.send(pickle.dumps(("fork-failed", str(exc))))
                continue
            if pid == 0:  # the child
                code = 1
                try:
                    sock.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    code = self._child_main(handle, params)
                except BaseException:  # noqa: BLE001
                    import traceback
                    traceback.print_exc()
                    code = 1
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            children.add(pid)
            for fd in fds:
                os.close(fd)
            # opened before this loop can reap the child, so it names this very process
            pidfd = _pidfd_open(pid)
            try:
                reply = [pickle.dumps(("forked", pid))]
                if pidfd is None:
                    sock.sendmsg(reply)
                else:
                    socket.send_fds(sock, reply, [pidfd])
            except OSError:
                return self._shutdown(children)   # the supervisor is gone
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    @staticmethod
    def _shutdown(children: set[int]) -> int:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        return 0


#: The first line a spawned zygote runs: its boot data (stdlib pickle) says where to import from.
_BOOT = ("import pickle, sys; boot = pickle.load(sys.stdin.buffer); sys.path[:] = boot['sys_path']; "
         "from stem.worker.zygote import spawned_main; spawned_main(int(sys.argv[1]), boot)")


def spawned_main(fd: int, boot: dict[str, Any]) -> None:
    """Entry point of a zygote started by ``Zygote.spawn`` (a fresh interpreter)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):   # the supervisor decides
        signal.signal(sig, signal.SIG_IGN)
    code = 1
    try:
        sock = socket.socket(fileno=fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if boot["normal_policy"]:
            from .sched import normal_policy
            normal_policy()
        from .child import child_main
        try:
            registry = _load_registry(boot["registry"])
        except Exception as exc:  # noqa: BLE001 - the supervisor gets the reason
            sock.send(pickle.dumps(("fatal", f"cannot load the task registry: {exc!r}")))
            return
        sock.send(pickle.dumps(("ready",)))
        code = Zygote(functools.partial(child_main, registry=registry))._serve(sock)
    except BaseException:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _load_registry(registry: str | bytes):
    from ..task import TaskRegistry, load_registry
    if isinstance(registry, bytes):
        loaded = pickle.loads(registry)
        if not isinstance(loaded, TaskRegistry):
            raise TypeError(f"expected a TaskRegistry, got {type(loaded).__name__}")
        return loaded
    return load_registry(registry)


def _recv_nowait(sock: socket.socket) -> tuple[bytes, list[int]]:
    """``socket.recv_fds`` without blocking (Python 3.11's ignores its ``flags``)."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(_MAX_MSG, socket.CMSG_LEN(4 * fds.itemsize), socket.MSG_DONTWAIT)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _pidfd_open(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:   # ENOSYS (a kernel before 5.3), or a seccomp filter
        return None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _signal(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    except (ProcessLookupError, ChildProcessError):
        return None
