"""Control-plane authentication: signed revocations, commands bound to their target, replies
from workers that can only verify (Ed25519 public keys)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stem import PayloadSigner, ShutdownMode, Stem, TaskRegistry, TaskState, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.brokers.base import Message
from stem.control import COMMAND_TTL, Control, control_queue
from stem.envelope import Envelope, decode_frame, encode_frame
from stem.errors import ConfigurationError, ControlError

from .test_control import ADAPTERS
from .test_worker import NO_SIGNALS, wait_until

pytestmark = pytest.mark.pg_heavy   # worker processes: many PostgreSQL connections at once

HMAC = PayloadSigner({"k": b"k" * 32})
OTHER_HMAC = PayloadSigner({"k": b"o" * 32})
SEED = bytes(range(32))


def ed25519_pair() -> tuple[PayloadSigner, PayloadSigner]:
    """(a signer with the private key, a verify-only signer with its public key)."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    public = ed25519.Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return (PayloadSigner({"ed": SEED}, algorithm="ed25519"),
            PayloadSigner({}, algorithm="ed25519", public_keys={"ed": public}))


class Stack:
    """A broker and backend of one adapter, a registry, and workers started on demand."""

    def __init__(self, broker, backend):
        self.broker, self.backend = broker, backend
        self.registry = TaskRegistry()
        self.registry.task("add")(lambda ctx, a, b: a + b)
        self.workers: list[Worker] = []

    def start(self, signer, **kw) -> Worker:
        kw.setdefault("concurrency", 1)
        kw.setdefault("isolation", "inline")
        w = Worker(self.broker, self.backend, self.registry, lifecycle=NO_SIGNALS, signer=signer,
                   heartbeat_interval=0.2, **kw)
        w.run_in_background()
        self.workers.append(w)
        assert wait_until(lambda: w.id in {h["worker_id"] for h in self.backend.heartbeats()}, timeout=30)
        return w

    def close(self) -> None:
        for w in self.workers:
            w.shutdown(ShutdownMode.HARD, timeout=20)
        self.broker.close()
        self.backend.close()


@pytest.fixture(params=sorted(ADAPTERS))
def stack(request, tmp_path):
    s = Stack(*ADAPTERS[request.param](request, tmp_path))
    yield s
    s.close()


@pytest.fixture
def memory_stack():
    s = Stack(InMemoryBroker(), InMemoryResultBackend())
    yield s
    s.close()


# -- D: revocations need the same authority as other commands ---------------------------------
@pytest.mark.timeout(90)
def test_unsigned_revoke_is_ignored_by_workers_that_verify(stack):
    producer = Stem(stack.broker, stack.backend, stack.registry, HMAC)
    by_control, by_stem = producer.enqueue("add", {"a": 1, "b": 2}), producer.enqueue("add", {"a": 2, "b": 2})
    Control(stack.broker, stack.backend).revoke(by_control, timeout=0.5)     # `stem worker revoke` without keys
    Stem(stack.broker, stack.backend, stack.registry).revoke(by_stem)
    assert stack.backend.revoked([by_control, by_stem]) == {by_control, by_stem}   # stored, but unproven
    stack.start(HMAC)
    assert producer.wait_for_task(by_control, timeout=30).result == 3
    assert producer.wait_for_task(by_stem, timeout=30).result == 4


@pytest.mark.timeout(90)
def test_signed_revoke_is_honoured_by_workers_that_verify(stack):
    producer = Stem(stack.broker, stack.backend, stack.registry, HMAC)
    by_control, by_stem = producer.enqueue("add", {"a": 1, "b": 2}), producer.enqueue("add", {"a": 2, "b": 2})
    Control(stack.broker, stack.backend, HMAC).revoke(by_control, timeout=0.5)
    producer.revoke(by_stem)
    stack.start(HMAC)
    for tid in (by_control, by_stem):
        status = producer.wait_for_task(tid, timeout=30)
        assert status.state is TaskState.REVOKED and status.reason == "revoked"


def test_a_verify_only_ed25519_worker_honours_a_revoke_signed_with_the_private_key(memory_stack):
    private, public = ed25519_pair()
    producer = Stem(memory_stack.broker, memory_stack.backend, memory_stack.registry, private)
    revoked, unsigned = producer.enqueue("add", {"a": 1, "b": 1}), producer.enqueue("add", {"a": 1, "b": 2})
    producer.revoke(revoked)
    memory_stack.backend.revoke([unsigned])
    memory_stack.start(public)
    assert producer.wait_for_task(revoked, timeout=30).state is TaskState.REVOKED
    assert producer.wait_for_task(unsigned, timeout=30).result == 3


def test_a_worker_without_a_signer_still_honours_unsigned_revokes(memory_stack):
    producer = Stem(memory_stack.broker, memory_stack.backend, memory_stack.registry)
    tid = producer.enqueue("add", {"a": 1, "b": 1})
    producer.revoke(tid)
    memory_stack.start(None)
    assert producer.wait_for_task(tid, timeout=30).state is TaskState.REVOKED


def test_a_proof_counts_only_for_its_own_id_its_own_keys_and_its_lifetime():
    from stem.revocation import RevocationCheck, sign_proofs, verify_proof
    backend = InMemoryResultBackend()
    good, moved, foreign, expired, garbage, bare = (uuid.uuid4().hex for _ in range(6))
    until = time.time() + 60
    [proof_good, proof_other] = sign_proofs([good, uuid.uuid4().hex], until, HMAC)
    backend.revoke([good, moved, foreign, expired, garbage, bare],
                   proofs=[proof_good, proof_other, sign_proofs([foreign], until, OTHER_HMAC)[0],
                           sign_proofs([expired], time.time() - 1, HMAC)[0], b"\xa7S garbage", None])
    assert RevocationCheck(HMAC).honoured(backend, backend.revoked()) == {good}
    assert verify_proof(good, proof_good, HMAC) == pytest.approx(until)
    # a task's own signed frame is no proof that it was revoked
    task_frame = encode_frame(Envelope(id=moved, name="add", expires_at=until), HMAC)
    assert verify_proof(moved, task_frame, HMAC) is None


def test_the_revocation_check_fetches_each_proof_once_and_forgets_expired_revocations():
    from stem.revocation import RevocationCheck, sign_proofs
    backend = InMemoryResultBackend()
    calls = []
    real = backend.revocation_proofs
    backend.revocation_proofs = lambda ids: calls.append(sorted(ids)) or real(ids)
    a, b = "task-a", "task-b"
    backend.revoke([a], proofs=sign_proofs([a], time.time() + 60, HMAC))
    check = RevocationCheck(HMAC)
    assert check.honoured(backend, backend.revoked()) == {a}
    assert check.honoured(backend, backend.revoked()) == {a}
    backend.revoke([b], proofs=sign_proofs([b], time.time() + 60, HMAC))
    assert check.honoured(backend, backend.revoked()) == {a, b}
    assert calls == [[a], [b]]
    assert check.honoured(backend, {b}) == {b}          # a's revocation expired or was dropped


def test_revoking_with_a_verify_only_signer_fails_before_storing_anything(memory_stack):
    _, public = ed25519_pair()
    with pytest.raises(ConfigurationError, match="STEM_SIGNING_KEYS"):
        Stem(memory_stack.broker, memory_stack.backend, memory_stack.registry, public).revoke("t1")
    with pytest.raises(ControlError, match="STEM_SIGNING_KEYS"):
        Control(memory_stack.broker, memory_stack.backend, public).revoke("t1")
    with pytest.raises(ControlError, match="STEM_SIGNING_KEYS"):
        Control(memory_stack.broker, memory_stack.backend, public).ping()
    assert memory_stack.backend.revoked() == set()


def test_revoke_rejects_bad_ids_and_expiry_before_storing(memory_stack):
    stem = Stem(memory_stack.broker, memory_stack.backend, memory_stack.registry, HMAC)
    with pytest.raises(ConfigurationError, match="non-empty str"):
        stem.revoke(["ok", ""])
    with pytest.raises(ConfigurationError, match="expires"):
        stem.revoke("ok", expires=0)
    assert memory_stack.backend.revoked() == set()


# -- D: a signed command obeys only the worker it names ---------------------------------------
@pytest.mark.timeout(90)
def test_a_signed_command_for_one_worker_placed_on_another_workers_queue_is_refused(stack):
    a, b = stack.start(HMAC), stack.start(HMAC)
    now = time.time()
    forged_reply = f"stem.reply.{int((now + COMMAND_TTL) * 1000)}.{uuid.uuid4().hex}"
    command = Envelope(id=uuid.uuid4().hex, name="stem.control.shutdown", args={"mode": "hard"},
                       meta={"reply_to": forged_reply, "request_id": uuid.uuid4().hex, "target": a.id},
                       queue=control_queue(a.id), enqueued_at=now, expires_at=now + COMMAND_TTL)
    stack.broker.publish(Message(command.id, control_queue(b.id), encode_frame(command, HMAC), 9))
    # b serves its queue in order: once it answered a later ping, it has seen the forged command
    assert [r["worker"] for r in Control(stack.broker, stack.backend, HMAC).ping(workers=[b.id], timeout=20)] \
        == [b.id]
    assert not b.join(0.2) and not a.join(0)
    assert stack.broker.consume([forged_reply], 1, 0.2) == []


# -- 5: replies from workers that cannot sign ---------------------------------------------------
@pytest.mark.timeout(90)
def test_a_verify_only_ed25519_worker_answers_ping(stack):
    private, public = ed25519_pair()
    w = stack.start(public)
    control = Control(stack.broker, stack.backend, private)
    [pong] = control.ping(timeout=20)
    assert pong["worker"] == w.id and pong["reply"]["pong"]
    [stats] = control.stats(timeout=20)
    assert stats["reply"]["concurrency"] == 1
    assert Control(stack.broker, stack.backend).ping(timeout=0.5) == []     # unsigned commands: still refused


class FakeWorker:
    """Answers every command on its control queue with a reply signed by ``signer`` (None:
    unsigned) -- what a worker that cannot sign, or an impostor, would send."""

    def __init__(self, broker, backend, signer):
        self.id = "fake:" + uuid.uuid4().hex[:6]
        self.broker, self.signer = broker, signer
        backend.put_heartbeat(self.id, {"queues": ["default"]}, ttl=60)
        self.answered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for d in self.broker.consume([control_queue(self.id)], 1, 0.1):
                command = decode_frame(d.frame)
                reply = Envelope(id=uuid.uuid4().hex, name="stem.control.reply",
                                 args={"worker": self.id, "reply": {"pong": True, "fake": True}},
                                 meta={"request_id": command.meta["request_id"]}, queue=command.meta["reply_to"])
                self.broker.publish(Message(reply.id, reply.queue, encode_frame(reply, self.signer), 9))
                self.broker.ack([d])
                self.answered.set()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _ping_fake(memory_stack, controller_signer, reply_signer):
    fake = FakeWorker(memory_stack.broker, memory_stack.backend, reply_signer)
    try:
        replies = Control(memory_stack.broker, memory_stack.backend, controller_signer).ping(timeout=1.0)
        assert fake.answered.is_set()
        return replies
    finally:
        fake.stop()


def test_an_unsigned_reply_is_accepted_with_ed25519_where_workers_may_only_verify(memory_stack):
    private, _ = ed25519_pair()
    [reply] = _ping_fake(memory_stack, private, None)
    assert reply["reply"]["fake"]


def test_an_unsigned_reply_is_refused_with_hmac_where_every_worker_can_sign(memory_stack):
    assert _ping_fake(memory_stack, HMAC, None) == []


def test_a_reply_signed_with_an_unknown_key_is_refused(memory_stack):
    private, _ = ed25519_pair()
    other = PayloadSigner({"ed": bytes(range(1, 33))}, algorithm="ed25519")
    assert _ping_fake(memory_stack, private, other) == []
    assert _ping_fake(memory_stack, HMAC, OTHER_HMAC) == []


# -- the proof column: databases made by an older stem are upgraded --------------------------------
def _v1_sqlite(path: str) -> None:
    import sqlite3
    from stem.stores.sqlite_schema import MIGRATIONS
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE stem_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO stem_schema_version VALUES (1, 0)")
        conn.execute("INSERT INTO stem_revocations VALUES ('old', ?)", (time.time() + 60,))
    conn.close()


def test_a_version_1_sqlite_database_gains_revocation_proofs(tmp_path):
    from stem.backends.sqlite import SqliteResultBackend
    from stem.revocation import sign_proofs
    path = str(tmp_path / "v1.db")
    _v1_sqlite(path)
    backend = SqliteResultBackend(path)
    try:
        assert backend.revoked(["old"]) == {"old"} and backend.revocation_proofs(["old"]) == {}
        backend.revoke(["new"], proofs=sign_proofs(["new"], time.time() + 60, HMAC))
        assert set(backend.revocation_proofs(["old", "new"])) == {"new"}
    finally:
        backend.close()


def test_a_version_1_postgres_schema_gains_revocation_proofs(postgres_url, namespace):
    import psycopg
    from stem.backends.postgres import PostgresResultBackend
    from stem.stores.postgres_schema import MIGRATIONS
    from stem.revocation import sign_proofs
    s = f'"{namespace}"'
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(f"CREATE TABLE {s}.stem_schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for statement in MIGRATIONS[1]:
            conn.execute(statement.format(s=s))
        conn.execute(f"INSERT INTO {s}.stem_schema_version (version) VALUES (1)")
        conn.execute(f"INSERT INTO {s}.stem_revocations VALUES ('old', extract(epoch FROM now()) + 60)")
    backend = PostgresResultBackend(postgres_url, schema=namespace)
    try:
        assert backend.revoked(["old"]) == {"old"} and backend.revocation_proofs(["old"]) == {}
        backend.revoke(["new"], proofs=sign_proofs(["new"], time.time() + 60, HMAC))
        assert set(backend.revocation_proofs(["old", "new"])) == {"new"}
    finally:
        backend.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
