"""Task ids are random UUID4s in ``.hex`` form, whether made one at a time or a batch at a time."""

from __future__ import annotations

import uuid

import pytest

from stem.ids import new_task_id, new_task_ids


def assert_uuid4_hex(task_id: str) -> None:
    assert isinstance(task_id, str) and len(task_id) == 32
    u = uuid.UUID(hex=task_id)
    assert u.hex == task_id                      # lowercase, no dashes: what uuid4().hex gives
    assert u.version == 4 and u.variant == uuid.RFC_4122


@pytest.mark.parametrize("n", [1, 2, 17, 500, 5000])
def test_a_batch_of_ids_is_unique_valid_uuid4_hex(n):
    ids = new_task_ids(n)
    assert len(ids) == n and len(set(ids)) == n
    for task_id in ids:
        assert_uuid4_hex(task_id)


def test_a_single_id_is_valid_uuid4_hex_and_fresh_every_call():
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for task_id in ids:
        assert_uuid4_hex(task_id)


def test_no_ids_for_an_empty_batch():
    assert new_task_ids(0) == []


def test_every_random_bit_of_a_batch_varies():
    """Only the 6 version/variant bits are fixed: the other 122 take both values across a batch."""
    ones, zeros = 0, 0
    for task_id in new_task_ids(256):
        bits = int(task_id, 16)
        ones |= bits
        zeros |= ~bits
    fixed = (0xF << 76) | (0x3 << 62)          # version nibble, variant bits
    assert (ones & zeros) == ((1 << 128) - 1) & ~fixed

