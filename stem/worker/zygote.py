"""The zygote: a small process forked once, early, that forks every child.

The supervisor forks the zygote when the worker starts, before the worker's
own threads run and before it opens broker connections, so the zygote holds
no lock another thread owned and no socket it could corrupt.  Each child is
then one ``fork()`` of that quiet process (a few ms), never a fresh
interpreter.  The zygote reaps its children and reports their exit codes.

Protocol: one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair (message boundaries
kept, file descriptors passed with ``SCM_RIGHTS``), pickled tuples:

    supervisor -> zygote   ("fork", name, capacity, bell_index, params)  + the channel's doorbell fds
                           ("stop",)
    zygote -> supervisor   ("forked", pid) | ("fork-failed", message)
                           ("exited", pid, exitcode)   (negative: killed by that signal)

When the supervisor's end closes (the supervisor died or stopped), the zygote
kills its children and exits: no orphan keeps running a task whose result
nobody will store.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import warnings
from typing import Any, Callable

from ..errors import WorkerError
from .ring import ChannelHandle

__all__ = ["Zygote"]

log = logging.getLogger("stem.worker.zygote")
_MAX_MSG = 1 << 16


class Zygote:
    def __init__(self, child_main: Callable[[ChannelHandle, dict[str, Any]], int]):
        self._child_main = child_main
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self._events: list[tuple] = []
        self._lock = threading.Lock()

    # -- supervisor side ----------------------------------------------------------
    def start(self) -> None:
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

    def fileno(self) -> int:
        return self.sock.fileno()

    def fork(self, handle: ChannelHandle, params: dict[str, Any]) -> int:
        """Fork one child attached to ``handle``; returns its pid."""
        unique = list(dict.fromkeys(handle.bells))
        index = tuple(unique.index(fd) for fd in handle.bells)
        msg = pickle.dumps(("fork", handle.name, handle.capacity, index, params))
        with self._lock:
            try:
                socket.send_fds(self.sock, [msg], unique)
            except OSError as exc:
                raise WorkerError(f"the zygote process is gone ({exc})") from None
            while True:
                reply = self._recv(block=True)
                if reply is None:
                    raise WorkerError("the zygote process exited while forking a child")
                if reply[0] == "forked":
                    return reply[1]
                if reply[0] == "fork-failed":
                    raise WorkerError(f"could not fork a child: {reply[1]}")
                self._events.append(reply)

    def events(self) -> list[tuple]:
        """Pending ("exited", pid, code) events; call when ``fileno()`` is readable."""
        with self._lock:
            while True:
                msg = self._recv(block=False)
                if msg is None:
                    break
                self._events.append(msg)
            out, self._events = self._events, []
            return out

    def _recv(self, block: bool):
        try:
            data = self.sock.recv(_MAX_MSG, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return ("zygote-gone",)
        if not data:
            return ("zygote-gone",) if not block else None
        return pickle.loads(data)

    def stop(self, timeout: float = 5.0) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(pickle.dumps(("stop",)))
        except OSError:
            pass
        self.sock.close()
        self.sock = None
        if self.pid:
            _reap(self.pid, timeout)
            self.pid = None

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
        while True:
            readable, _, _ = select.select([sock, wake_r], [], [], 1.0)
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
            if sock not in readable:
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
            sock.send(pickle.dumps(("forked", pid)))

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


def _reap(pid: int, timeout: float) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
