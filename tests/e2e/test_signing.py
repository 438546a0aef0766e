"""A frame that does not verify never runs: it ends DEAD with reason ``signature-invalid`` and
its copy in the dead-letter queue, on every broker."""

from __future__ import annotations

import pytest

from stem import PayloadSigner, TaskState
from stem.brokers.base import Message
from tests.support import wait_for

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

KEY = b"e2e-test-signing-key-0123456789"


def flip_a_byte_in_the_queue(broker, queue: str = "default") -> None:
    """Take the only message of ``queue`` out and put it back with the last byte of its signed
    body flipped (the broker's public operations: consume, ack, publish)."""
    [delivery] = broker.consume([queue], 1, 5.0)
    frame = bytearray(delivery.frame)
    frame[-1] ^= 0x01
    broker.ack([delivery])
    broker.publish(Message(delivery.task_id, queue, bytes(frame)))


@pytest.mark.parametrize("tamper", ["flipped-byte", "unsigned"])
def test_a_tampered_or_unsigned_frame_ends_in_the_dead_letter_queue(store, fleet, tamper):
    stem = store.producer(signer=PayloadSigner({"k1": KEY}) if tamper == "flipped-byte" else None)
    task_id = stem.enqueue("e2e.add", args={"a": 1, "b": 2})
    if tamper == "flipped-byte":
        flip_a_byte_in_the_queue(stem.broker)
    fleet.in_process(store, signer=PayloadSigner({"k1": KEY}))
    status = stem.wait_for_task(task_id, timeout=20)
    assert (status.state, status.reason) == (TaskState.DEAD, "signature-invalid")
    # the DEAD status is stored before the dead-letter copy is made: wait for the copy
    wait_for(lambda: stem.broker.dead_letters("default"), what="the dead letter")
    [dead] = stem.broker.dead_letters("default")
    assert (dead.task_id, dead.reason) == (task_id, "signature-invalid")
    assert stem.broker.stats("default")[1:5] == (0, 0, 0, 1)
