"""stem.stores.local: one connection per thread and process, and the stores' one fork hook."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading

import pytest

from stem.stores import local
from stem.stores.local import PerThread, after_fork_in_child

_COUNT_HOOKS = r"""
import json, os
hooks = []
real = os.register_at_fork
def counting(**kwargs):
    fn = kwargs.get("after_in_child")
    hooks.append(f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', None)}")
    return real(**kwargs)
os.register_at_fork = counting
import stem, stem.stores.local
import stem.brokers.redis, stem.brokers.sqlite, stem.brokers.postgres
import stem.backends.redis, stem.backends.sqlite, stem.backends.postgres
ours = lambda: [h for h in hooks if h.startswith(("stem.stores", "stem.brokers", "stem.backends", "stem._sql"))]
at_import = ours()
from stem.brokers.redis import RedisBroker
from stem.brokers.sqlite import SqliteBroker
from stem.backends.postgres import PostgresResultBackend
made = [SqliteBroker(None), SqliteBroker(None), RedisBroker("redis://127.0.0.1:1/0"),
        PostgresResultBackend("postgresql://nobody@127.0.0.1:1/none")]   # none connects yet
print(json.dumps([at_import, ours()]))
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.register_at_fork")
def test_no_fork_hook_is_registered_at_import_and_one_once_stores_are_made():
    out = subprocess.run([sys.executable, "-c", _COUNT_HOOKS], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    at_import, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert at_import == []
    assert after == ["stem.stores.local._run_hooks"]


class _Conn:
    opened: list["_Conn"] = []

    def __init__(self):
        self.closed = False
        self.thread = threading.get_ident()
        _Conn.opened.append(self)

    def close(self):
        self.closed = True


def test_each_thread_gets_its_own_connection_closed_when_the_thread_ends():
    _Conn.opened = []
    holder = PerThread(_Conn)
    mine = holder.get()
    assert holder.get() is mine
    seen = []
    t = threading.Thread(target=lambda: seen.append(holder.get()))
    t.start()
    t.join()
    assert seen[0] is not mine and seen[0].thread != mine.thread
    gc.collect()
    assert seen[0].closed and not mine.closed
    assert holder.connections() == [mine]
    holder.close()
    assert mine.closed and holder.connections() == []
    assert holder.get() is not mine               # usable again after close: a new one


def test_a_connection_that_is_no_longer_usable_is_replaced():
    holder = PerThread(_Conn, usable=lambda c: not c.closed)
    first = holder.get()
    first.closed = True
    assert holder.get() is not first


def test_a_bound_method_hook_goes_with_its_object():
    class Holder:
        def reset(self):
            pass

    gc.collect()   # hooks of objects earlier tests left as garbage go now, not inside the count
    before = len(local._hooks)
    h = Holder()
    after_fork_in_child(h.reset)
    assert len(local._hooks) == before + 1
    del h
    gc.collect()
    assert len(local._hooks) == before


def test_a_function_hook_is_registered_once_however_often_given():
    def reset():
        pass

    before = len(local._hooks)
    for _ in range(3):
        after_fork_in_child(reset)
    assert len(local._hooks) == before + 1
    local._hooks.pop(reset)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection_and_never_closes_the_parents():
    holder = PerThread(_Conn)
    parent = holder.get()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            child = holder.get()
            holder.close()
            gc.collect()
            os.write(w, json.dumps([child is not parent, child.closed, parent.closed,
                                    any(c is parent for c in local._INHERITED)]).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = json.loads(os.read(r, 256))
    os.close(r)
    os.waitpid(pid, 0)
    assert got == [True, True, False, True]        # own one, closed; the parent's kept, untouched
    assert not parent.closed and holder.get() is parent
