"""Group records: what a result backend keeps for one group or chord of a canvas.

A record counts its members' completions by member id, so a member that is
redelivered, or runs twice, counts once; every terminal state counts (the
caller says whether it is a success).  It holds:

* ``expected`` members and a ``sealed`` flag: the producer creates the record
  unsealed, publishes the members, then seals it; a group is *complete* when it is
  sealed and ``finished == expected``;
* the set of finished member ids, the succeeded and failed counts, the ids of the
  failed members, and each member's outcome by index (bytes the canvas encodes);
* ``data``: the canvas's own description (callback, failure policy, where the
  group reports), opaque to the backend;
* ``seal_by``: a group left unsealed past it (its producer died between creating
  and sealing) is marked ``interrupted`` by ``group_interrupt_unsealed``;
* ``ttl``: seconds the record lives once complete or interrupted; before that it
  never expires.

Each operation is atomic per record and does O(1) work for one member
(``group_record``): no operation re-reads the whole group.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["GroupRecord", "check_group_id", "check_member", "check_create", "GROUP_ID_MAX"]

#: The longest group id: a task id's limit (members are ``<group id>.<index>``, also task ids).
GROUP_ID_MAX = 180


class GroupRecord(NamedTuple):
    """What ``ResultBackend.group_get`` (and the counting operations) return."""

    id: str
    expected: int
    sealed: bool
    finished: int
    succeeded: int
    failed: int
    #: marked by ``group_interrupt_unsealed``: never sealed by its deadline
    interrupted: bool
    data: bytes
    created_at: float
    seal_by: float

    @property
    def complete(self) -> bool:
        """Sealed and every member finished: the moment the callback fires."""
        return self.sealed and self.finished >= self.expected


def check_group_id(group_id: object) -> str:
    if not isinstance(group_id, str) or not 0 < len(group_id) <= GROUP_ID_MAX:
        raise ConfigurationError(f"a group id is a non-empty string of at most {GROUP_ID_MAX} chars, "
                                 f"got {group_id!r}")
    return group_id


def check_member(group_id: object, member_id: object, index: object, outcome: object) -> tuple[str, str, int, bytes]:
    check_group_id(group_id)
    if not isinstance(member_id, str) or not member_id:
        raise ConfigurationError(f"a member id is a non-empty string, got {member_id!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigurationError(f"a member index is an int >= 0, got {index!r}")
    if not isinstance(outcome, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"a member outcome is bytes, got {type(outcome).__name__}")
    return group_id, member_id, index, bytes(outcome)   # type: ignore[return-value]


def check_create(group_id: object, expected: object, data: object, seal_by: object,
                 ttl: object) -> tuple[str, int, bytes, float, float]:
    check_group_id(group_id)
    expected = checks.integer("expected", expected, minimum=0)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"group data is bytes, got {type(data).__name__}")
    if not checks.is_number(seal_by):
        raise ConfigurationError(f"seal_by must be finite epoch seconds, got {seal_by!r}")
    ttl = checks.seconds("ttl", ttl)
    return group_id, expected, bytes(data), float(seal_by), ttl   # type: ignore[return-value]
