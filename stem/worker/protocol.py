"""Messages between the supervisor and its children, and the exit codes a child uses.

Messages are msgpack arrays over a child's channel (``stem.worker.channel``),
one tagged ``msgspec.Struct`` per kind (the tag is the first element):

    supervisor -> child   [TASK, seq, frame]      run the frame's task
                          [STOP]                  finish what runs, then exit 0
                          [OFFER, seq, frame, slot]   run it if ``channel.claim(seq, slot)``
                                                  wins (the supervisor may take it back until then)
    child -> supervisor   [READY, pid]
                          [RESULT, seq, outcome, rss]   (rss: bytes, 0 when not measured)
                          [HEARTBEAT, task_id]
                          [PROGRESS, task_id, fraction, data]
                          [ENQUEUE, new_id, name, args, options, parent_id, root_id]
                          [FATAL, message]        could not start (then exit STARTUP_FAILED)

Both ends always run the same stem (children are forked from the worker's own
zygote), so the layout can change with the code; only the frames inside are a
wire format.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from .execution import Outcome

__all__ = ["ChildExit", "TASK", "STOP", "OFFER", "READY", "RESULT", "HEARTBEAT", "PROGRESS", "ENQUEUE", "FATAL",
           "Task", "Stop", "Offer", "Ready", "Result", "Heartbeat", "Progress", "Enqueue", "Fatal",
           "decode_to_child", "decode_from_child", "encode_message"]

TASK, STOP, OFFER = 0, 1, 2
READY, RESULT, HEARTBEAT, PROGRESS, ENQUEUE, FATAL = 0, 1, 2, 3, 4, 5


class Task(msgspec.Struct, array_like=True, tag=TASK):
    seq: int
    frame: bytes


class Stop(msgspec.Struct, array_like=True, tag=STOP):
    pass


class Offer(msgspec.Struct, array_like=True, tag=OFFER):
    seq: int
    frame: bytes
    slot: int = 0


class Ready(msgspec.Struct, array_like=True, tag=READY):
    pid: int


class Result(msgspec.Struct, array_like=True, tag=RESULT):
    seq: int
    outcome: Outcome
    rss: int = 0


class Heartbeat(msgspec.Struct, array_like=True, tag=HEARTBEAT):
    task_id: str


class Progress(msgspec.Struct, array_like=True, tag=PROGRESS):
    task_id: str
    fraction: float
    data: Any = None


class Enqueue(msgspec.Struct, array_like=True, tag=ENQUEUE):
    new_id: str
    name: str
    args: Any          # checked by the supervisor's producer, like any enqueue
    options: Any
    parent_id: str
    root_id: str | None


class Fatal(msgspec.Struct, array_like=True, tag=FATAL):
    message: str


encode_message = msgspec.msgpack.Encoder().encode
#: supervisor side: bytes from a child -> Ready | Result | Heartbeat | Progress | Enqueue | Fatal
decode_from_child = msgspec.msgpack.Decoder(Ready | Result | Heartbeat | Progress | Enqueue | Fatal).decode
#: child side: bytes from the supervisor -> Task | Stop | Offer
decode_to_child = msgspec.msgpack.Decoder(Task | Stop | Offer).decode


class ChildExit(enum.IntEnum):
    """Exit codes a child uses on purpose; anything else (or a signal) is a crash."""
    OK = 0                 # asked to stop (recycle or shutdown)
    STARTUP_FAILED = 70    # could not attach or load the registry: do not respawn in a loop
    SUPERVISOR_GONE = 71   # the supervisor disappeared: nobody would store our results
