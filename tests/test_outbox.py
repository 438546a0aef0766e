"""The outbox between the engine and the settle thread: what it holds, when it hands on."""

from __future__ import annotations

import threading

from stem.worker.outbox import IDLE_WAIT, MAX_BATCH, Outbox

LINGER = 0.005


def fill(box: Outbox, n: int) -> None:
    for i in range(n):
        box.put(i)


def taken(box: Outbox) -> list[int]:
    sizes = []
    while True:
        batch = box.get(0.0)
        if not batch:
            return sizes
        sizes.append(len(batch))


def test_nothing_held_means_the_main_loop_may_sleep_the_idle_wait():
    box = Outbox(LINGER)
    assert box.flush(0.0, unsettled=10, refill_at=8) == IDLE_WAIT
    assert box.empty() and taken(box) == []


def test_a_small_batch_is_held_while_more_outcomes_are_coming_then_goes_after_the_linger():
    box = Outbox(LINGER)
    fill(box, 3)
    wait = box.flush(100.0, unsettled=16, refill_at=8)
    assert 0 < wait <= LINGER and taken(box) == [] and not box.empty()
    assert box.flush(100.0 + LINGER / 2, unsettled=16, refill_at=8) <= LINGER / 2 + 1e-9
    assert taken(box) == []
    box.flush(100.0 + LINGER, unsettled=16, refill_at=8)
    assert taken(box) == [3] and box.empty()


def test_half_the_prefetch_window_goes_at_once():
    box = Outbox(LINGER)
    fill(box, 8)
    box.flush(0.0, unsettled=16, refill_at=8)
    assert taken(box) == [8]


def test_every_unsettled_jobs_outcome_goes_at_once():
    box = Outbox(LINGER)
    fill(box, 1)
    box.flush(0.0, unsettled=1, refill_at=8)   # a lone task is never held back
    assert taken(box) == [1]


def test_a_waiting_fetcher_gets_its_slots_without_waiting_for_the_linger():
    box = Outbox(LINGER)
    fill(box, 3)
    box.flush(0.0, unsettled=16, refill_at=8, room=0)     # 0 free + 3 settled < 8: keep holding
    assert taken(box) == []
    box.flush(0.0, unsettled=16, refill_at=8, room=5)     # 5 free + 3 settled = 8: go
    assert taken(box) == [3]


def test_a_stopping_worker_flushes_everything():
    box = Outbox(LINGER)
    fill(box, 2)
    box.flush(0.0, unsettled=16, refill_at=8, force=True)
    assert taken(box) == [2]


def test_batches_queued_behind_each_other_are_taken_together_up_to_the_cap():
    box = Outbox(LINGER)
    for _ in range(3):
        fill(box, 8)
        box.flush(0.0, unsettled=16, refill_at=8)
    assert box.get(0.0) == [*range(8)] * 3
    fill(box, MAX_BATCH)
    box.flush(0.0, unsettled=MAX_BATCH, refill_at=8)
    fill(box, 8)
    box.flush(0.0, unsettled=16, refill_at=8)
    assert len(box.get(0.0)) == MAX_BATCH and len(box.get(0.0)) == 8


def test_the_settle_thread_blocks_until_a_batch_is_handed_on():
    box = Outbox(LINGER)
    got = []
    t = threading.Thread(target=lambda: got.append(box.get(10.0)))
    t.start()
    fill(box, 8)
    box.flush(0.0, unsettled=8, refill_at=8)
    t.join(10.0)
    assert got == [[*range(8)]]
