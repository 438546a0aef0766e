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
* its lifetime.  In flight (not yet complete or interrupted) a record never
  expires: a sliding TTL refreshed by each member would still lapse behind a
  backlog longer than itself, the chord that then never fires (celery#5237).
  Once it ends it lives ``ttl`` seconds, as long as its members' results: each
  member recorded extends ``ttl`` to its own result's lifetime (the first one
  replaces the value given at creation, which stays only for a group no member
  of which ever ended).  A record ``held`` at creation (a task will read its
  outcomes after it ends: a chord's callback, the chain step after a group)
  starts that lifetime not when it ends but when ``group_release`` says the
  reader is done (``ttl`` extended to the reader's own result lifetime, so the
  results outlive the status that says the canvas ended); an interrupted record
  is read by nobody and starts it at once.

Each operation is atomic per record and does O(1) work for one member
(``group_record``): no operation re-reads the whole group.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import _checks as checks
from ..errors import ConfigurationError

__all__ = ["GroupRecord", "check_group_id", "check_member", "check_create", "check_lifetime", "check_due",
           "GROUP_ID_MAX"]

_INF = float("inf")
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
    #: seconds the record lives once it ended (and, when held, was released)
    ttl: float
    #: a reader of its outcomes is still to come (``group_create(held=True)``, until ``group_release``)
    held: bool

    @property
    def complete(self) -> bool:
        """Sealed and every member finished: the moment the callback fires."""
        return self.sealed and self.finished >= self.expected


def check_group_id(group_id: object) -> str:
    if not isinstance(group_id, str) or not 0 < len(group_id) <= GROUP_ID_MAX:
        raise ConfigurationError(f"a group id is a non-empty string of at most {GROUP_ID_MAX} chars, "
                                 f"got {group_id!r}")
    return group_id


def check_lifetime(ttl: object, default: float) -> float:
    """A member's or reader's result lifetime: finite seconds > 0, or None (``default``, the
    backend's ``result_expires``)."""
    return default if ttl is None else checks.seconds("ttl", ttl)


def check_member(group_id: object, member_id: object, index: object, outcome: object, ttl: object,
                 default: float) -> tuple[str, str, int, bytes, float]:
    """One member's record: ``ttl`` is its result's lifetime (None: ``default``)."""
    # the worker's settle checks every member it records: the common case in a few type tests
    if (type(group_id) is str and 0 < len(group_id) <= GROUP_ID_MAX and type(member_id) is str and member_id
            and type(index) is int and index >= 0 and type(outcome) is bytes
            and (ttl is None or (type(ttl) is float and 0.0 < ttl < _INF))):
        return group_id, member_id, index, outcome, default if ttl is None else ttl
    check_group_id(group_id)
    if not isinstance(member_id, str) or not member_id:
        raise ConfigurationError(f"a member id is a non-empty string, got {member_id!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigurationError(f"a member index is an int >= 0, got {index!r}")
    if not isinstance(outcome, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"a member outcome is bytes, got {type(outcome).__name__}")
    return group_id, member_id, index, bytes(outcome), check_lifetime(ttl, default)   # type: ignore[return-value]


def check_create(group_id: object, expected: object, data: object, seal_by: object, ttl: object,
                 held: object) -> tuple[str, int, bytes, float, float, bool]:
    check_group_id(group_id)
    expected = checks.integer("expected", expected, minimum=0)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"group data is bytes, got {type(data).__name__}")
    if not checks.is_number(seal_by):
        raise ConfigurationError(f"seal_by must be finite epoch seconds, got {seal_by!r}")
    ttl = checks.seconds("ttl", ttl)
    checks.flag("held", held)
    return group_id, expected, bytes(data), float(seal_by), ttl, held   # type: ignore[return-value]


def check_due(before: object, limit: object) -> tuple[float, int]:
    """``group_completions_due``'s arguments: epoch seconds, and how many at most (>= 1)."""
    if not checks.is_number(before):
        raise ConfigurationError(f"before must be finite epoch seconds, got {before!r}")
    return float(before), checks.integer("limit", limit, minimum=1)   # type: ignore[arg-type]
