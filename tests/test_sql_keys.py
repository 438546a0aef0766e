"""Keys on the SQL brokers beyond the contract: the schema upgrade that brings them (version 2
-> 3, in place), and their release by the backend's fused result+ack transaction."""

from __future__ import annotations

import uuid

from stem.backends import from_url as backend_from_url
from stem.brokers import from_url as broker_from_url
from stem.brokers.base import Keyed, Message
from stem.results import TaskState, TaskStatus
from tests.support import current_version, old_broker_rows, schema_versions, sql_rows, store_at_version

Q = "upgraded"


def keyed(key: str, linger: float = 0.0) -> Keyed:
    return Keyed(Message(uuid.uuid4().hex, Q, b"new"), key, 600.0, linger)


def check_upgraded(broker) -> None:
    """The rows written under version 2 are delivered, dead-lettered and replayed as before (no
    key), and the upgraded tables take keys."""
    [d] = broker.consume([Q], 5, 5.0)
    assert (d.task_id, bytes(d.frame), d.key) == ("old-ready", b"old", None)
    broker.ack([d])
    [dl] = broker.dead_letters(Q)
    assert (dl.task_id, dl.reason, dl.key) == ("old-dead", "poison", None)
    assert broker.replay(Q) == 1
    [d] = broker.consume([Q], 5, 5.0)
    assert d.task_id == "old-dead" and d.key is None
    broker.dead_letter(d, "again")
    assert broker.replay(Q) == 1
    broker.ack(broker.consume([Q], 5, 5.0))

    first, second = keyed("k"), keyed("k")
    assert broker.publish_keyed([first, second]) == [None, first.message.task_id]
    [d] = broker.consume([Q], 5, 5.0)
    assert d.key == "k"
    broker.ack([d])
    assert broker.key_owner(Q, "k") is None
    assert broker.stats(Q)[1:5] == (0, 0, 0, 0)


def test_a_version_2_store_upgrades_in_place_keeps_its_rows_and_then_takes_keys(sql_url):
    with store_at_version(sql_url, 2, *old_broker_rows(sql_url, Q)) as url:
        broker = broker_from_url(url)
        try:
            assert broker.migrate() == current_version(url)
            assert schema_versions(url) == list(range(1, current_version(url) + 1))
            check_upgraded(broker)
        finally:
            broker.close()


def test_the_fused_result_and_ack_releases_keys_as_the_brokers_ack_does(sql_url):
    broker, backend = broker_from_url(sql_url), backend_from_url(sql_url)
    try:
        gone, lingering = keyed("gone"), keyed("lingering", linger=600.0)
        plain = Message("plain", Q, b"plain")
        assert broker.publish_keyed([gone, lingering]) == [None, None]
        broker.publish(plain)
        # "gone" is released early (unique_until="started") and another task takes it: the ack must spare it
        ds = broker.consume([Q], 3, 5.0)
        assert {d.key for d in ds} == {"gone", "lingering", None}
        assert broker.release_key(Q, "gone", gone.message.task_id) is True
        thief = keyed("gone")
        assert broker.publish_keyed([thief]) == [None]
        statuses = [TaskStatus(id=d.task_id, state=TaskState.SUCCEEDED, result=1) for d in ds]
        assert backend.store_many_and_ack(statuses, broker, ds) is True
        assert broker.key_owner(Q, "gone") == thief.message.task_id
        assert broker.key_owner(Q, "lingering") == lingering.message.task_id     # linger keeps it
        assert broker.publish_keyed([keyed("lingering")]) == [lingering.message.task_id]
        assert all(s is not None and s.succeeded for s in backend.get_many([d.task_id for d in ds]))
        assert broker.stats(Q).in_flight == 0 and broker.stats(Q).ready == 1    # the thief's message
    finally:
        broker.close()
        backend.close()


def _key_rows(url: str) -> list[str]:
    """Every row of stem_keys, expired or not."""
    return [r[0] for r in sql_rows(url, "SELECT key FROM stem_keys ORDER BY key")]


def test_publish_keyed_sweeps_expired_keys_now_and_then(sql_url):
    from tests.support import wait_for
    broker = broker_from_url(sql_url)
    try:
        short = Keyed(Message(uuid.uuid4().hex, Q, b"x"), "short", 0.2)
        assert broker.publish_keyed([short]) == [None]
        wait_for(lambda: broker.key_owner(Q, "short") is None, 10.0, what="the short key to expire")
        assert broker.publish_keyed([keyed("later")]) == [None]
        assert _key_rows(sql_url) == ["later", "short"]      # expired, not yet swept: reads as free
        broker._next_key_sweep = 0.0                           # the minute since the last sweep is up
        assert broker.publish_keyed([keyed("latest")]) == [None]
        assert _key_rows(sql_url) == ["later", "latest"]
    finally:
        broker.close()
