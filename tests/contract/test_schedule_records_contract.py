"""Schedule records on every result backend: the "schedule records" part of ``stem/backends/base.py``.

A backend adapter may give its instances ``contract_recipe``: ``(factory, args, kwargs)`` that
builds a backend on the same store in another process (absent for the in-memory backend, which
one process cannot share); the cases that need one run their process parts only where it is.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import threading
import time
import uuid

import pytest

from stem.backends.base import ScheduleRecord
from stem.errors import ConfigurationError

T0 = 1_700_000_000.25       # a fire time with a fraction, as cron and every() produce


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


def run_id(schedule_id: str, t: float) -> str:
    return f"sched:{schedule_id}:{round(t * 1000)}"


def record(backend, schedule_id: str) -> ScheduleRecord | None:
    return backend.schedule_records([schedule_id]).get(schedule_id)


def build(recipe):
    factory, args, kwargs = recipe
    return factory(*args, **kwargs)


def test_a_put_definition_reads_back_in_a_record_without_state(backend):
    i = sid()
    before = time.time()
    backend.put_schedule(i, b"\x81\xa4kind\xa5every")
    r = record(backend, i)
    assert isinstance(r, ScheduleRecord)
    assert (r.id, r.definition, r.paused, r.last_fired, r.last_run_id) == (i, b"\x81\xa4kind\xa5every", False,
                                                                            None, None)
    assert isinstance(r.definition, bytes)
    assert before - 5 <= r.updated_at <= time.time() + 5     # Postgres stamps it with the server's clock


def test_records_list_all_or_the_ids_asked_for(backend):
    assert backend.schedule_records() == {}
    ids = [sid() for _ in range(5)]
    for n, i in enumerate(ids):
        backend.put_schedule(i, bytes([n]))
    assert set(backend.schedule_records()) == set(ids)
    got = backend.schedule_records([ids[1], ids[3], "absent"])
    assert set(got) == {ids[1], ids[3]}
    assert got[ids[3]].definition == bytes([3])
    assert backend.schedule_records([]) == {}
    assert backend.schedule_records(tuple(ids[:1])).keys() == {ids[0]}


def test_an_empty_definition_is_kept_apart_from_none(backend):
    a, b = sid(), sid()
    backend.put_schedule(a, b"")
    backend.put_schedule(b, None)
    got = backend.schedule_records([a, b])
    assert (got[a].definition, got[b].definition) == (b"", None)


def test_put_replaces_the_definition_and_keeps_the_state(backend):
    i = sid()
    backend.put_schedule(i, b"v1")
    backend.mark_fired(i, T0, run_id(i, T0))
    assert backend.pause_schedule(i, True) is True
    backend.put_schedule(i, b"v2")
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (b"v2", True, T0, run_id(i, T0))
    backend.put_schedule(i, None)           # back to a schedule in code: the state stays
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (None, True, T0, run_id(i, T0))


def test_put_over_a_state_only_record_keeps_its_state(backend):
    i = sid()
    backend.mark_fired(i, T0, run_id(i, T0))
    backend.put_schedule(i, b"def")
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (b"def", False, T0, run_id(i, T0))


def test_remove_drops_the_record_and_its_state(backend):
    i, other = sid(), sid()
    backend.put_schedule(i, b"def")
    backend.put_schedule(other, b"other")
    backend.mark_fired(i, T0, run_id(i, T0))
    backend.pause_schedule(i, True)
    assert backend.remove_schedule(i) is True
    assert record(backend, i) is None
    assert set(backend.schedule_records()) == {other}
    assert backend.remove_schedule(i) is False
    backend.put_schedule(i, b"again")       # a new record starts from nothing
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (b"again", False, None, None)


def test_pause_and_resume_report_whether_they_changed_the_flag(backend):
    i = sid()
    backend.put_schedule(i, b"def")
    assert backend.pause_schedule(i, True) is True
    assert record(backend, i).paused is True
    assert backend.pause_schedule(i, True) is False
    assert backend.pause_schedule(i, False) is True
    assert record(backend, i).paused is False
    assert backend.pause_schedule(i, False) is False
    assert record(backend, i).definition == b"def"


def test_pausing_a_missing_schedule_creates_a_state_only_record(backend):
    i = sid()
    assert backend.pause_schedule(i, True) is True
    r = record(backend, i)
    assert (r.id, r.definition, r.paused, r.last_fired, r.last_run_id) == (i, None, True, None, None)
    assert i in backend.schedule_records()


def test_resuming_a_missing_schedule_creates_it_unpaused_and_changes_nothing(backend):
    i = sid()
    assert backend.pause_schedule(i, False) is False
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired) == (None, False, None)


def test_mark_fired_creates_a_missing_record(backend):
    i = sid()
    backend.mark_fired(i, T0, run_id(i, T0))
    r = record(backend, i)
    assert (r.definition, r.paused, r.last_fired, r.last_run_id) == (None, False, T0, run_id(i, T0))


def test_mark_fired_moves_forward_and_a_late_scheduler_cannot_rewind_it(backend):
    i = sid()
    backend.put_schedule(i, b"def")
    for t in (T0, T0 + 60, T0 + 30, T0 - 1e6, T0 + 60):
        backend.mark_fired(i, t, run_id(i, t))
    r = record(backend, i)
    assert (r.last_fired, r.last_run_id) == (T0 + 60, run_id(i, T0 + 60))
    backend.mark_fired(i, T0 + 60, "another-id-for-the-same-time")   # a tie changes nothing
    assert record(backend, i).last_run_id == run_id(i, T0 + 60)
    backend.mark_fired(i, T0 + 90, run_id(i, T0 + 90))
    r = record(backend, i)
    assert (r.last_fired, r.last_run_id, r.definition) == (T0 + 90, run_id(i, T0 + 90), b"def")


def test_fire_times_keep_their_exact_float_value(backend):
    i = sid()
    t = 1_774_746_000.123456789     # not representable in fewer digits than repr gives
    backend.mark_fired(i, t, "r")
    assert record(backend, i).last_fired == t
    backend.mark_fired(i, math.nextafter(t, math.inf), "next")
    assert record(backend, i).last_run_id == "next"
    backend.mark_fired(i, math.nextafter(t, -math.inf), "before")
    assert record(backend, i).last_run_id == "next"


def test_schedule_ids_use_the_whole_alphabet(backend):
    i = "Az09_.:-" + "x" * 120
    backend.put_schedule(i, b"d")
    backend.mark_fired(i, T0, run_id(i, T0))
    assert record(backend, i).last_run_id == run_id(i, T0)
    assert backend.remove_schedule(i) is True


BAD_IDS = ["", "a" * 129, "has space", "brace{x}", "slash/x", "é", None, 5, b"bytes"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_a_bad_schedule_id_is_refused_everywhere_and_stores_nothing(backend, bad):
    for call in (lambda: backend.put_schedule(bad, b"d"), lambda: backend.remove_schedule(bad),
                 lambda: backend.pause_schedule(bad, True), lambda: backend.mark_fired(bad, T0, "r"),
                 lambda: backend.schedule_records([bad])):
        with pytest.raises(ConfigurationError, match="schedule id"):
            call()
    assert backend.schedule_records() == {}


@pytest.mark.parametrize("fire_time", [math.nan, math.inf, -math.inf, True, "1700000000", None, 10**400],
                         ids=["nan", "inf", "-inf", "True", "str", "None", "10**400"])
def test_a_fire_time_that_is_not_a_finite_number_is_refused_and_stores_nothing(backend, fire_time):
    with pytest.raises(ConfigurationError, match="fire_time"):
        backend.mark_fired(sid(), fire_time, "r")
    assert backend.schedule_records() == {}


@pytest.mark.parametrize("bad", ["", "x" * 201, None, 7, b"bytes"], ids=repr)
def test_a_bad_run_id_is_refused_and_stores_nothing(backend, bad):
    with pytest.raises(ConfigurationError, match="run_id"):
        backend.mark_fired(sid(), T0, bad)
    assert backend.schedule_records() == {}


@pytest.mark.parametrize("bad", ["text", 5, {"kind": "every"}], ids=repr)
def test_a_definition_that_is_not_bytes_is_refused_and_stores_nothing(backend, bad):
    with pytest.raises(ConfigurationError, match="definition"):
        backend.put_schedule(sid(), bad)
    assert backend.schedule_records() == {}


def test_a_bytes_like_definition_is_stored_as_bytes(backend):
    i, j = sid(), sid()
    backend.put_schedule(i, bytearray(b"ba"))
    backend.put_schedule(j, memoryview(b"mv"))
    got = backend.schedule_records([i, j])
    assert (got[i].definition, got[j].definition) == (b"ba", b"mv")


@pytest.mark.parametrize("paused", [1, 0, "yes", None], ids=repr)
def test_pause_takes_only_a_bool_and_stores_nothing_otherwise(backend, paused):
    with pytest.raises(ConfigurationError, match="paused"):
        backend.pause_schedule(sid(), paused)
    assert backend.schedule_records() == {}


@pytest.mark.parametrize("ids", ["one-id", b"one-id", 5, {"a"}], ids=repr)
def test_records_take_a_sequence_of_ids_not_a_string(backend, ids):
    with pytest.raises(ConfigurationError, match="sequence of schedule ids"):
        backend.schedule_records(ids)


def _read_in_child(args):
    recipe, ids = args
    other = build(recipe)
    try:
        return other.schedule_records(ids)
    finally:
        other.close()


def test_records_are_read_back_over_new_connections_and_from_another_process(backend):
    recipe = getattr(backend, "contract_recipe", None)
    if recipe is None:
        pytest.skip("this backend lives in one process")
    i, j = sid(), sid()
    backend.put_schedule(i, b"def")
    backend.mark_fired(i, T0, run_id(i, T0))
    backend.pause_schedule(j, True)
    expected = backend.schedule_records([i, j])
    other = build(recipe)
    try:
        assert other.schedule_records([i, j]) == expected
        other.mark_fired(i, T0 + 1, run_id(i, T0 + 1))
    finally:
        other.close()
    assert record(backend, i).last_run_id == run_id(i, T0 + 1)
    expected = backend.schedule_records([i, j])
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_read_in_child, [(recipe, [i, j])])[0] == expected


N_FIRES = 40


def _fire_all(backend, schedule_id: str, seed: int) -> None:
    """Mark every fire time once, in an order of this racer's own."""
    order = list(range(N_FIRES))
    random.Random(seed).shuffle(order)
    for k in order:
        t = T0 + 1.5 * k
        backend.mark_fired(schedule_id, t, run_id(schedule_id, t))


def _wait_until(start_at: float) -> None:
    while time.time() < start_at:
        time.sleep(0.001)


def _race_in_child(args):
    recipe, schedule_id, seed, start_at = args
    backend = build(recipe)
    try:
        backend.schedule_records([schedule_id])       # connected (and migrated) before the start
        _wait_until(start_at)
        _fire_all(backend, schedule_id, seed)
    finally:
        backend.close()


@pytest.mark.pg_heavy
def test_mark_fired_never_rewinds_under_16_racing_threads_and_processes(backend):
    """Each racer marks the same 40 fire times in its own shuffled order while a reader
    samples the record: every sample pairs last_run_id with its last_fired, the samples
    never go back, and the newest fire time wins.  Processes race where the adapter names
    a recipe, all starting at one instant with the threads."""
    i = sid()
    backend.put_schedule(i, b"def")
    recipe = getattr(backend, "contract_recipe", None)
    n_threads, n_procs = 16, (16 if recipe is not None else 0)
    samples: list[ScheduleRecord] = []
    done = threading.Event()

    def read():
        while not done.is_set():
            r = record(backend, i)
            if r.last_fired is not None:
                samples.append(r)

    def racer(seed, start_at):
        _wait_until(start_at)
        _fire_all(backend, i, seed)

    # the children are forked before this process starts its threads
    pool = multiprocessing.get_context("fork").Pool(n_procs) if n_procs else None
    try:
        start_at = time.time() + (1.0 if pool is not None else 0.05)
        pending = None if pool is None else pool.map_async(
            _race_in_child, [(recipe, i, 1000 + n, start_at) for n in range(n_procs)])
        reader = threading.Thread(target=read)
        threads = [threading.Thread(target=racer, args=(n, start_at)) for n in range(n_threads)]
        for t in threads + [reader]:
            t.start()
        try:
            for t in threads:
                t.join(60)
            if pending is not None:
                pending.get(60)
        finally:
            done.set()
            reader.join(30)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    assert not any(t.is_alive() for t in threads)
    newest = T0 + 1.5 * (N_FIRES - 1)
    r = record(backend, i)
    assert (r.last_fired, r.last_run_id, r.definition, r.paused) == (newest, run_id(i, newest), b"def", False)
    samples.append(r)   # on memory the racers can all finish before the reader is scheduled once
    fired = [s.last_fired for s in samples]
    assert fired == sorted(fired), "last_fired went back"
    assert all(s.last_run_id == run_id(i, s.last_fired) for s in samples), "last_run_id left its last_fired"
