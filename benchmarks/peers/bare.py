"""The floor: N processes, each a bare at-most-once loop: pop a batch, decode, call.

``LPOP key 64`` (BLPOP when the list is empty), msgpack decode, call the
function.  No acks, no leases, no results, no signatures: what running a
Redis-fed Python function costs at the least.  ``python bare.py`` is one loop.
"""

from __future__ import annotations

import os
import signal
import sys

import msgspec

from _common import PYTHON, QUEUE, chunks, client, incr

SETTINGS = "N processes, LPOP 64 / BLPOP, msgpack decode, call; at-most-once, nothing else"
KEY = "bench:bare:" + QUEUE
TASKS = {"incr": incr}


def loop() -> None:
    r = client()
    decode = msgspec.msgpack.Decoder().decode
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        batch = r.lpop(KEY, 64)
        if not batch:
            got = r.blpop([KEY], timeout=0.5)
            if not got:
                continue
            batch = [got[1]]
        for raw in batch:
            name, args = decode(raw)
            TASKS[name](**args)


def worker_argv(n: int) -> list[str]:
    return [PYTHON, os.path.abspath(__file__)]   # the runner starts n of these


PROCESSES_ARE_SEPARATE = True


def produce(n: int) -> None:
    r = client()
    frame = msgspec.msgpack.encode(["incr", {}])
    for k in chunks(n, 500):
        r.rpush(KEY, *([frame] * k))


def produce_single(n: int) -> None:
    r = client()
    frame = msgspec.msgpack.encode(["incr", {}])
    for _ in range(n):
        r.rpush(KEY, frame)


if __name__ == "__main__":
    sys.exit(loop())
