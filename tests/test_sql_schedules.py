"""Schedule records on the SQL backends beyond the contract: the schema upgrade that brings
``stem_schedules`` (version 3 -> 4, in place) keeps what a version-3 store holds."""

from __future__ import annotations

import time

from stem.backends import from_url as backend_from_url
from tests.support import current_version, schema_versions, sql_rows, store_at_version


def check_upgraded(backend) -> None:
    """The status and key rows written under version 3 are still there; schedules work."""
    assert backend.get("old-task").result == "kept"
    assert backend.revoked(["old-revoked"]) == {"old-revoked"}
    assert backend.schedule_records() == {}
    backend.put_schedule("nightly", b"def")
    backend.mark_fired("nightly", 1_700_000_000.5, "sched:nightly:1700000000500")
    assert backend.pause_schedule("nightly", True) is True
    r = backend.schedule_records()["nightly"]
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (b"def", True, 1_700_000_000.5,
                                                                     "sched:nightly:1700000000500")


def old_status() -> bytes:
    from stem.results import TaskState, TaskStatus, encode_status
    return encode_status(TaskStatus(id="old-task", state=TaskState.SUCCEEDED, result="kept"))


def _rows_of_version_3(url: str) -> list[tuple[str, tuple]]:
    """A stored status, a revocation and a key, as stem of schema version 3 wrote them."""
    later = time.time() + 600
    if url.startswith("sqlite"):
        return [("INSERT INTO stem_results VALUES ('old-task', 'SUCCEEDED', ?, ?)", (later, old_status())),
                ("INSERT INTO stem_revocations VALUES ('old-revoked', ?, NULL)", (later,)),
                ("INSERT INTO stem_keys VALUES ('q', 'k', 'owner', ?)", (later,))]
    return [("INSERT INTO {s}.stem_results VALUES ('old-task', 'SUCCEEDED', %s, %s)", (later, old_status())),
            ("INSERT INTO {s}.stem_revocations VALUES ('old-revoked', %s, NULL)", (later,)),
            ("INSERT INTO {s}.stem_keys VALUES ('q', 'k', 'owner', %s, 1)", (later,))]


def test_a_version_3_store_upgrades_in_place_and_then_keeps_schedules(sql_url):
    with store_at_version(sql_url, 3, *_rows_of_version_3(sql_url)) as url:
        backend = backend_from_url(url)
        try:
            assert backend.migrate() == current_version(url) >= 4
            assert schema_versions(url) == list(range(1, current_version(url) + 1))
            assert sql_rows(url, "SELECT queue, key, owner FROM stem_keys") == [("q", "k", "owner")]
            check_upgraded(backend)
            assert backend.migrate() == current_version(url)        # idempotent
        finally:
            backend.close()
