"""stem.schedules: fire times (every, cron across both DST transitions, at), ``due`` under each
catch-up policy with a fake clock, jitter, run ids, stored definitions and every validation error.
(The scheduler that publishes the runs: tests/test_scheduler.py.)"""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import msgspec
import pytest

from stem import TaskOptions
from stem.errors import InvalidTaskOptionsError, StemError
from stem.schedules import (CATCH_UP, MAX_REPORTED_MISFIRES, OVERLAP, AtSpec, CronSpec, EverySpec, Schedule,
                            Spec, at, cron, every)

BERLIN = ZoneInfo("Europe/Berlin")
B = 1_800_000_000.0          # a multiple of 60 and of 3600: every(60)'s grid runs through it


def utc(*fields) -> float:
    return datetime(*fields, tzinfo=timezone.utc).timestamp()


def local(*fields, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=BERLIN, fold=fold).timestamp()


def berlin_day(day: tuple[int, int, int]) -> tuple[float, float]:
    """The instants where a local day in Berlin starts and ends (23 or 25 hours apart on DST days)."""
    start = datetime(*day, tzinfo=BERLIN)
    return start.timestamp(), datetime.combine(start.date() + timedelta(days=1), start.timetz()).timestamp()


def walk(schedule: Schedule, start: float, end: float, step: float, grace: float,
         last_fired: float | None = None) -> list[float]:
    """A scheduler's loop on a fake clock: due() at each tick; the newest run fired or skipped is
    remembered (a skipped misfire is settled too, or every pass would skip it again)."""
    fired: list[float] = []
    now = start
    while now <= end:
        runs, skipped = schedule.due(last_fired, now, grace)
        fired += runs
        if runs or skipped:
            last_fired = max(runs + skipped)
        now += step
    return fired


# -- every ------------------------------------------------------------------------------------------

def test_every_fires_on_the_grid_from_the_epoch_so_every_scheduler_agrees():
    spec = every(60)
    assert spec.next_after(B) == B + 60
    assert spec.next_after(B - 0.001) == B
    assert spec.next_after(B + 59.999) == B + 60
    assert list(spec.fire_times(B, B + 180)) == [B + 60, B + 120, B + 180]
    assert list(spec.fire_times(B + 1, B + 59)) == []
    assert spec.period == 60.0


def test_every_never_drifts_a_millionth_run_is_exact_to_the_millisecond():
    spec = every(1.5, anchor=0.25)
    k = 1_000_000
    t = spec.next_after(0.25 + (k - 1) * 1.5)
    assert round(t * 1000) == 250 + k * 1500
    # walking run after run lands on the same grid (no "last run + interval" accumulation)
    t = 0.25
    for _ in range(10_000):
        t = spec.next_after(t)
    assert round(t * 1000) == 250 + 10_000 * 1500


def test_every_anchor_is_the_first_run_and_takes_a_datetime_or_iso_string():
    anchor = datetime(2026, 5, 1, 9, 0, tzinfo=BERLIN)
    spec = every(3600, anchor=anchor)
    assert spec == every(3600, anchor="2026-05-01T09:00:00+02:00") == every(3600, anchor=anchor.timestamp())
    assert spec.next_after(0) == anchor.timestamp()
    assert spec.next_after(anchor.timestamp() - 3600 * 5) == anchor.timestamp()
    assert spec.next_after(anchor.timestamp()) == anchor.timestamp() + 3600


# -- cron and daylight saving time ------------------------------------------------------------------

def test_a_2_30_job_runs_once_at_the_jump_on_spring_forward_day():
    spec = cron("30 2 * * *", tz="Europe/Berlin")
    runs = list(spec.fire_times(*berlin_day((2026, 3, 29))))
    assert runs == [local(2026, 3, 29, 3, 0)] == [utc(2026, 3, 29, 1, 0)]
    # the days around it keep their 02:30
    assert list(spec.fire_times(*berlin_day((2026, 3, 28)))) == [local(2026, 3, 28, 2, 30)]
    assert list(spec.fire_times(*berlin_day((2026, 3, 30)))) == [local(2026, 3, 30, 2, 30)]


def test_a_2_30_job_runs_once_on_fall_back_day_at_the_first_0230():
    spec = cron("30 2 * * *", tz="Europe/Berlin")
    runs = list(spec.fire_times(*berlin_day((2026, 10, 25))))
    assert runs == [local(2026, 10, 25, 2, 30, fold=0)] == [utc(2026, 10, 25, 0, 30)]


def test_an_hourly_job_follows_elapsed_time_23_runs_in_spring_25_in_autumn():
    spec = cron("0 * * * *", tz="Europe/Berlin")
    spring = list(spec.fire_times(*berlin_day((2026, 3, 29))))
    autumn = list(spec.fire_times(*berlin_day((2026, 10, 25))))
    assert len(spring) == 23 and len(autumn) == 25
    assert all(b - a == 3600 for runs in (spring, autumn) for a, b in zip(runs, runs[1:]))
    assert local(2026, 3, 29, 3, 0) - local(2026, 3, 29, 1, 0) == 3600   # 02:00 does not exist
    assert {local(2026, 10, 25, 2, 0, fold=0), local(2026, 10, 25, 2, 0, fold=1)} <= set(autumn)


def test_two_fixed_times_in_one_gap_run_once_at_the_jump():
    spec = cron("0,30 2 * * *", tz="Europe/Berlin")
    assert list(spec.fire_times(*berlin_day((2026, 3, 29)))) == [local(2026, 3, 29, 3, 0)]
    assert list(spec.fire_times(*berlin_day((2026, 10, 25)))) == [local(2026, 10, 25, 2, 0),
                                                                   local(2026, 10, 25, 2, 30)]


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 * * * *", "0,30 2 * * *", "*/20 1-3 * * *", "15 3 * * *"])
@pytest.mark.parametrize("day", [(2026, 3, 29), (2026, 10, 25)])
def test_cron_next_after_is_the_same_whatever_instant_a_scheduler_asks_from(expr, day):
    """Starting inside the repeated hour (where wall-clock time goes back) or anywhere else,
    next_after gives the next instant of one fixed set: never an earlier run, never one twice."""
    spec = cron(expr, tz="Europe/Berlin")
    start, end = berlin_day(day)
    canonical = list(spec.fire_times(start - 86400, end + 86400))
    assert canonical == sorted(set(canonical))
    t = start - 3600
    while t < end:
        assert spec.next_after(t) == min(c for c in canonical if c > t), datetime.fromtimestamp(t, BERLIN)
        t += 300 if int(t) % 900 else 299.5     # on minutes, and between seconds
    assert list(spec.fire_times(start, end)) == [c for c in canonical if start < c <= end]


@pytest.mark.parametrize("day", [(2026, 3, 29), (2026, 10, 25)])
@pytest.mark.parametrize("tick", [1.0, 60.0, 7.0])
def test_a_fake_clock_walked_across_dst_fires_the_2_30_job_once(day, tick):
    schedule = Schedule("nightly", "report.build", cron("30 2 * * *", tz="Europe/Berlin"))
    start, end = berlin_day(day)
    # 00:00-02:00 UTC, the clock ticking at ``tick``: the jump at 01:00 UTC both days, the whole
    # repeated hour in October, and the run (01:00 UTC in March, 00:30 UTC in October)
    fired = walk(schedule, utc(*day, 0, 0), utc(*day, 2, 0), tick, grace=2 * tick)
    assert fired == list(schedule.spec.fire_times(start, end))
    assert len(fired) == 1


@pytest.mark.parametrize("day, runs", [((2026, 3, 29), 23), ((2026, 10, 25), 25)])
def test_a_fake_clock_walked_across_dst_fires_each_hourly_run_once(day, runs):
    schedule = Schedule("hourly", "feed.poll", cron("0 * * * *", tz="Europe/Berlin"))
    start, end = berlin_day(day)
    fired = walk(schedule, start - 1, end - 1, 30.0, grace=60.0)
    assert len(fired) == runs == len(set(fired))
    assert fired == list(schedule.spec.fire_times(start - 1, end - 1))


def test_cron_aliases_whitespace_and_period():
    assert list(cron("@daily").fire_times(B - 1, B + 86400)) == list(cron("0 0 * * *").fire_times(B - 1, B + 86400))
    assert cron("  0   *  * * * ") == cron("0 * * * *")
    assert hash(cron("0 * * * *", "UTC")) == hash(cron("0 * * * *"))
    assert cron("0 * * * *").period == 3600
    assert cron("30 2 * * *", tz="Europe/Berlin").period == 86400
    assert cron("0 9 * * 1-5").period == 3 * 86400      # the longest gap: a weekend
    assert cron("0 0 29 2 *").next_after(utc(2026, 1, 1)) == utc(2028, 2, 29)


def test_cron_with_no_future_run_says_none():
    spec = cron("0 0 29 2 *")
    assert spec.next_after(253_402_000_000) is None   # past the last 29 February before year 10000
    assert list(spec.fire_times(253_402_000_000, 253_402_300_000)) == []


# -- at ---------------------------------------------------------------------------------------------

def test_at_fires_once_and_takes_epoch_datetime_or_iso_string():
    when = datetime(2026, 7, 1, 12, 0, tzinfo=BERLIN)
    spec = at(when)
    assert spec == at(when.timestamp()) == at("2026-07-01T10:00:00Z") == at("2026-07-01T12:00:00+02:00")
    assert spec.next_after(when.timestamp() - 0.001) == when.timestamp()
    assert spec.next_after(when.timestamp()) is None
    assert list(spec.fire_times(0, 2e9)) == [when.timestamp()]
    assert spec.period == 0.0
    schedule = Schedule("once", "x.run", spec)
    t = when.timestamp()
    assert schedule.due(None, t + 1, 2) == ([t], [])
    assert schedule.due(t, t + 3600, 2) == ([], [])
    assert schedule.due(t - 86400, t + 3600, 2) == ([t], [])      # a misfire: "latest" runs it late


# -- due: a 10-minute outage under each policy ------------------------------------------------------

OUTAGE = [
    # catch_up, max_catch_up, now,        fired,                                  skipped
    # back exactly on a fire time: B+600 is on time
    ("none",   100, B + 600,   [600],                                   range(60, 600, 60)),
    ("latest", 100, B + 600,   [600],                                   range(60, 600, 60)),
    ("all",    100, B + 600,   range(60, 601, 60),                      []),
    ("all",    3,   B + 600,   [420, 480, 540, 600],                    range(60, 400, 60)),
    # back within grace of B+600: still on time
    ("none",   100, B + 601.5, [600],                                   range(60, 600, 60)),
    ("latest", 100, B + 601.5, [600],                                   range(60, 600, 60)),
    # back between fire times: everything is a misfire
    ("none",   100, B + 630,   [],                                      range(60, 601, 60)),
    ("latest", 100, B + 630,   [600],                                   range(60, 600, 60)),
    ("all",    100, B + 630,   range(60, 601, 60),                      []),
    ("all",    3,   B + 630,   [480, 540, 600],                         range(60, 460, 60)),
    ("all",    1,   B + 630,   [600],                                   range(60, 600, 60)),
]


@pytest.mark.parametrize("catch_up, max_catch_up, now, fired, skipped", OUTAGE)
def test_a_10_minute_outage_under_each_catch_up_policy(catch_up, max_catch_up, now, fired, skipped):
    schedule = Schedule("poll", "feed.poll", every(60), catch_up=catch_up, max_catch_up=max_catch_up)
    assert schedule.due(B, now, 2.0) == ([B + s for s in fired], [B + s for s in skipped])


@pytest.mark.parametrize("catch_up, first_pass", [
    ("none", []), ("latest", [600]), ("all", range(60, 601, 60))])
def test_a_fake_clock_through_an_outage_fires_the_expected_runs_then_runs_on_time(catch_up, first_pass):
    schedule = Schedule("poll", "feed.poll", every(60), catch_up=catch_up)
    before = walk(schedule, B - 300, B, 1.0, 2.0, last_fired=B - 360)
    assert before == [B - 300 + 60 * i for i in range(6)]
    # every scheduler down from B+1 to B+630; then the first pass, and on time again
    after = walk(schedule, B + 630, B + 900, 1.0, 2.0, last_fired=before[-1])
    assert after == [B + s for s in first_pass] + [B + 660, B + 720, B + 780, B + 840, B + 900]


def test_a_cron_outage_fires_the_newest_misfire_under_latest():
    schedule = Schedule("q", "x.run", cron("*/5 * * * *"), catch_up="latest")
    assert schedule.due(B, B + 600 + 30, 2.0) == ([B + 600], [B + 300])


NEVER_FIRED = [
    # now,       grace, fired
    (B + 600,    2.0,   [600]),
    (B + 601.5,  2.0,   [600]),
    (B + 602,    2.0,   []),            # (now - grace, now]: exactly grace late is not a first run
    (B + 630,    2.0,   []),            # nothing was missed: the schedule never ran before
    (B + 630,    60.0,  [600]),
]


@pytest.mark.parametrize("catch_up", CATCH_UP)
@pytest.mark.parametrize("now, grace, fired", NEVER_FIRED)
def test_a_schedule_that_never_fired_runs_only_what_is_due_now(catch_up, now, grace, fired):
    schedule = Schedule("poll", "feed.poll", every(60), catch_up=catch_up)
    assert schedule.due(None, now, grace) == ([B + s for s in fired], [])


@pytest.mark.parametrize("catch_up", CATCH_UP)
def test_a_last_fired_in_the_future_fires_nothing_until_now_passes_it(catch_up):
    schedule = Schedule("poll", "feed.poll", every(60), catch_up=catch_up)
    last = B + 900                               # written by a scheduler whose clock ran ahead
    assert schedule.due(last, B + 600, 2.0) == ([], [])
    assert schedule.due(last, B + 900, 2.0) == ([], [])
    assert schedule.due(last, B + 959, 2.0) == ([], [])
    assert schedule.due(last, B + 960, 2.0) == ([B + 960], [])


BOUNDS = [
    # start_at,  end_at,    catch_up, last_fired, now,      fired,                 skipped
    (B + 300,    None,      "all",    B,          B + 600,  range(300, 601, 60),   []),
    (B + 301,    None,      "all",    B,          B + 600,  range(360, 601, 60),   []),
    (B + 300,    None,      "none",   B,          B + 600,  [600],                 range(300, 600, 60)),
    (None,       B + 300,   "all",    B,          B + 600,  range(60, 301, 60),    []),
    (None,       B + 300,   "none",   B,          B + 600,  [],                    range(60, 301, 60)),
    (None,       B + 300,   "latest", B,          B + 600,  [300],                 range(60, 300, 60)),
    (None,       B + 300,   "all",    B + 300,    B + 900,  [],                    []),
    (B + 900,    None,      "all",    B,          B + 600,  [],                    []),
    (B + 900,    None,      "all",    None,       B + 900,  [900],                 []),
    (B + 120,    B + 240,   "all",    B,          B + 600,  [120, 180, 240],       []),
    (B + 120,    B + 240,   "none",   None,       B + 180,  [180],                 []),
]


@pytest.mark.parametrize("start_at, end_at, catch_up, last_fired, now, fired, skipped", BOUNDS)
def test_start_at_and_end_at_are_inclusive_bounds(start_at, end_at, catch_up, last_fired, now, fired, skipped):
    schedule = Schedule("poll", "feed.poll", every(60), start_at=start_at, end_at=end_at, catch_up=catch_up)
    assert schedule.due(last_fired, now, 2.0) == ([B + s for s in fired], [B + s for s in skipped])


def test_start_and_end_take_datetimes_and_bound_fire_times():
    schedule = Schedule("poll", "feed.poll", every(60), start_at=datetime.fromtimestamp(B, timezone.utc),
                        end_at=datetime.fromtimestamp(B + 180, BERLIN))
    assert (schedule.start_at, schedule.end_at) == (B, B + 180)
    assert list(schedule.fire_times(0, B + 600)) == [B, B + 60, B + 120, B + 180]


def test_a_long_outage_reports_only_the_newest_misfires():
    schedule = Schedule("tick", "x.run", every(1), catch_up="none")
    fired, skipped = schedule.due(B, B + 20_000, 2.0)
    assert fired == [B + 19_998, B + 19_999, B + 20_000]
    assert len(skipped) == MAX_REPORTED_MISFIRES and skipped[-1] == B + 19_997
    assert skipped == [B + 19_997 - MAX_REPORTED_MISFIRES + 1 + i for i in range(MAX_REPORTED_MISFIRES)]
    # the same through cron's walk (no arithmetic short cut): 12,000 one-minute runs missed
    schedule = Schedule("tick", "x.run", cron("* * * * *"), catch_up="all", max_catch_up=5)
    fired, skipped = schedule.due(B, B + 12_000 * 60 + 30, 2.0)
    assert fired == [B + 60 * k for k in range(11_996, 12_001)]
    assert len(skipped) == MAX_REPORTED_MISFIRES and skipped[-1] == B + 60 * 11_995


# -- run ids and jitter -----------------------------------------------------------------------------

def test_run_id_is_the_schedule_id_and_the_fire_time_in_milliseconds():
    schedule = Schedule("nightly-report", "report.build", every(60))
    assert schedule.run_id(B) == "sched:nightly-report:1800000000000"
    assert schedule.run_id(B + 1e-7) == schedule.run_id(B) == schedule.run_id(int(B))
    assert schedule.run_id(0.1 + 0.2) == "sched:nightly-report:300"


def test_jitter_is_deterministic_within_bounds_and_spread():
    schedule = Schedule("poll", "feed.poll", every(60), jitter=30)
    offsets = [schedule.jitter_for(B + 60 * k) for k in range(200)]
    assert offsets == [Schedule("poll", "other.task", every(60), jitter=30).jitter_for(B + 60 * k)
                       for k in range(200)]
    assert all(0 <= o < 30 and round(o * 1000) == o * 1000 for o in offsets)
    assert len(set(offsets)) > 150 and min(offsets) < 5 and max(offsets) > 25
    assert offsets != [Schedule("poll2", "feed.poll", every(60), jitter=30).jitter_for(B + 60 * k)
                       for k in range(200)]
    assert Schedule("poll", "feed.poll", every(60)).jitter_for(B) == 0.0


def test_jitter_is_the_same_in_another_process():
    code = ("from stem.schedules import Schedule, every; "
            f"print(repr(Schedule('poll', 'feed.poll', every(60), jitter=30).jitter_for({B})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True).stdout
    assert float(out) == Schedule("poll", "feed.poll", every(60), jitter=30).jitter_for(B)


# -- the schedule object ----------------------------------------------------------------------------

def test_args_are_copied_and_queue_folds_into_the_task_options():
    args = {"account": 1, "days": [1, 2]}
    schedule = Schedule("poll", "feed.poll", every(60), args=args, queue="reports",
                        options=TaskOptions(priority=5))
    args["days"].append(3)
    assert schedule.args == {"account": 1, "days": [1, 2]}
    assert schedule.task_options == TaskOptions(priority=5, queue="reports")
    assert Schedule("p", "t", every(60), queue="q").task_options == TaskOptions(queue="q")
    assert Schedule("p", "t", every(60)).task_options is None
    same = Schedule("poll", "feed.poll", every(60), args={"account": 1, "days": [1, 2]}, queue="reports",
                    options=TaskOptions(priority=5))
    assert same == schedule and hash(same) == hash(schedule)


def test_specs_are_immutable_and_hashable():
    spec = every(60)
    with pytest.raises(AttributeError):
        spec.seconds = 5                                                   # type: ignore[misc]
    assert len({every(60), every(60.0), every(60, anchor=0), cron("0 * * * *"), at(B), at(B)}) == 3
    assert every(60) != every(60, anchor=1) and cron("0 * * * *") != cron("0 * * * *", "Europe/Berlin")


# -- stored definitions -----------------------------------------------------------------------------

SPECS = [every(60), every(1.5, anchor=B + 0.25), cron("30 2 * * *", tz="Europe/Berlin"), cron("@hourly"), at(B)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_every_spec_kind_round_trips_through_a_dict_and_msgpack(spec):
    d = spec.to_dict()
    assert d["kind"] in ("every", "cron", "at")
    again = Spec.from_dict(msgspec.msgpack.decode(msgspec.msgpack.encode(d)))
    assert again == spec and type(again) is type(spec)
    assert list(again.fire_times(B, B + 86400 * 3)) == list(spec.fire_times(B, B + 86400 * 3))


def test_a_full_schedule_round_trips_through_a_dict_and_msgpack():
    schedule = Schedule(
        "nightly-report", "report.build", cron("30 2 * * *", tz="Europe/Berlin"),
        args={"day": "yesterday", "accounts": [1, 2], "opts": {"pdf": True}, "blob": b"\x00\x01"},
        queue="reports",
        options=TaskOptions(priority=7, max_retries=3, expires=600, soft_time_limit=30, hard_time_limit=60,
                            visibility_timeout=120, acks_late=False),
        jitter=12.5, start_at=B, end_at=B + 86400 * 365, catch_up="all", max_catch_up=7, overlap="queue_one")
    stored = msgspec.msgpack.encode(schedule.to_dict())
    again = Schedule.from_dict(msgspec.msgpack.decode(stored))
    assert again == schedule
    assert again.options == schedule.options and again.spec == schedule.spec
    for minimal in (Schedule("p", "t", every(60)), Schedule("o", "t", at(B), options=TaskOptions())):
        assert Schedule.from_dict(msgspec.msgpack.decode(msgspec.msgpack.encode(minimal.to_dict()))) == minimal


@pytest.mark.parametrize("options", [TaskOptions(autoretry_for=(ConnectionError,)), TaskOptions(rate_limit="1/s", rate_scope="worker"),
                                     TaskOptions(retry_backoff=1.0)])
def test_options_of_the_handler_are_refused_as_enqueue_refuses_them(options):
    with pytest.raises(InvalidTaskOptionsError, match="options of the handler"):
        Schedule("p", "t", every(60), options=options)


BAD_DEFINITIONS = [
    ("not a dict", "fields"),
    ({**Schedule("p", "t", every(60)).to_dict(), "priority": 3}, "priority"),
    ({k: v for k, v in Schedule("p", "t", every(60)).to_dict().items() if k != "overlap"}, "overlap"),
    ({**Schedule("p", "t", every(60)).to_dict(), "spec": {"kind": "weekly"}}, "weekly"),
    ({**Schedule("p", "t", every(60)).to_dict(), "spec": {"kind": ["every"]}}, "kind"),
    ({**Schedule("p", "t", every(60)).to_dict(), "spec": {"kind": "every", "seconds": 60}}, "anchor"),
    ({**Schedule("p", "t", every(60)).to_dict(), "spec": {"kind": "at", "when": 1, "x": 2}}, "'x'"),
    ({**Schedule("p", "t", every(60)).to_dict(), "spec": {"kind": "cron", "expr": "61 * * * *", "tz": "UTC"}},
     "61"),
    ({**Schedule("p", "t", every(60)).to_dict(), "options": {"colour": "red"}}, "colour"),
    ({**Schedule("p", "t", every(60)).to_dict(), "options": [1]}, r"\[1\]"),
    ({**Schedule("p", "t", every(60)).to_dict(), "options": {"priority": 99}}, "99"),
    ({**Schedule("p", "t", every(60)).to_dict(), "catch_up": "some"}, "some"),
]


@pytest.mark.parametrize("d, match", BAD_DEFINITIONS)
def test_a_bad_stored_definition_is_refused(d, match):
    with pytest.raises(InvalidTaskOptionsError, match=match):
        Schedule.from_dict(d)


# -- validation -------------------------------------------------------------------------------------

def _schedule(**kw):
    return Schedule(**{"id": "poll", "task": "feed.poll", "spec": every(60), **kw})


class _Opaque:
    pass


BAD = [
    ("id empty", lambda: _schedule(id=""), "''"),
    ("id space", lambda: _schedule(id="my job"), "'my job'"),
    ("id long", lambda: _schedule(id="x" * 129), "xxxx"),
    ("id not str", lambda: _schedule(id=5), "5"),
    ("task name", lambda: _schedule(task="1bad name"), "1bad name"),
    ("spec", lambda: _schedule(spec="*/5 * * * *"), r"\*/5"),
    ("every < 1", lambda: every(0.5), "0.5"),
    ("every 0", lambda: every(0), "0"),
    ("every nan", lambda: every(math.nan), "nan"),
    ("every bool", lambda: every(True), "True"),
    ("every sub-ms", lambda: every(1.0001), "1.0001"),
    ("anchor naive", lambda: every(60, anchor=datetime(2026, 1, 1)), "2026-01-01T00:00:00"),
    ("anchor str", lambda: every(60, anchor="soon"), "soon"),
    ("cron fields", lambda: cron("* * * *"), r"'\* \* \* \*'"),
    ("cron six fields", lambda: cron("0 0 * * * *"), r"'0 0 \* \* \* \*'"),
    ("cron minute", lambda: cron("61 * * * *"), "61"),
    ("cron word", lambda: cron("@fortnightly"), "@fortnightly"),
    ("cron no day", lambda: cron("0 0 31 2 *"), "31 2"),
    ("cron not str", lambda: cron(5), "5"),
    ("tz unknown", lambda: cron("0 * * * *", tz="Mars/Olympus"), "Mars/Olympus"),
    ("tz path", lambda: cron("0 * * * *", tz="../etc/passwd"), "passwd"),
    ("tz empty", lambda: cron("0 * * * *", tz=""), "''"),
    ("at naive", lambda: at(datetime(2026, 7, 1, 12)), "2026-07-01T12:00:00"),
    ("at naive str", lambda: at("2026-07-01T12:00:00"), "2026-07-01T12:00:00"),
    ("at bad str", lambda: at("tomorrow"), "tomorrow"),
    ("at inf", lambda: at(math.inf), "inf"),
    ("at year 10000", lambda: at(1e12), "1000000000000"),
    ("at None", lambda: at(None), "None"),
    ("jitter < 0", lambda: _schedule(jitter=-1), "-1"),
    ("jitter str", lambda: _schedule(jitter="5s"), "5s"),
    ("start naive", lambda: _schedule(start_at=datetime(2026, 1, 1)), "2026-01-01"),
    ("end <= start", lambda: _schedule(start_at=B, end_at=B), "1800000000"),
    ("end < start", lambda: _schedule(start_at=B, end_at=B - 60), "1799999940"),
    ("catch_up", lambda: _schedule(catch_up="everything"), "everything"),
    ("overlap", lambda: _schedule(overlap="replace"), "replace"),
    ("max_catch_up 0", lambda: _schedule(max_catch_up=0), "0"),
    ("max_catch_up float", lambda: _schedule(max_catch_up=2.5), "2.5"),
    ("unique", lambda: _schedule(options=TaskOptions(unique=True)), "unique=True"),
    ("options type", lambda: _schedule(options={"priority": 1}), "priority"),
    ("queue", lambda: _schedule(queue="no spaces"), "no spaces"),
    ("queue disagrees", lambda: _schedule(queue="a", options=TaskOptions(queue="b")), "'b'"),
    ("args list", lambda: _schedule(args=[1, 2]), r"\[1, 2\]"),
    ("args int key", lambda: _schedule(args={1: "x"}), "1: 'x'"),
    ("args object", lambda: _schedule(args={"x": _Opaque()}), "poll"),
    ("args huge int", lambda: _schedule(args={"x": 2 ** 70}), "poll"),
    ("grace 0", lambda: _schedule().due(None, B, 0), "grace"),
    ("now", lambda: _schedule().due(None, "now", 2), "now"),
    ("last_fired", lambda: _schedule().due("yesterday", B, 2), "yesterday"),
]


@pytest.mark.parametrize("make, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_every_bad_input_raises_invalid_task_options_naming_the_value(make, match):
    with pytest.raises(InvalidTaskOptionsError, match=match) as info:
        make()
    assert isinstance(info.value, StemError)


def test_direct_construction_validates_too_and_the_kinds_are_the_documented_ones():
    with pytest.raises(InvalidTaskOptionsError):
        EverySpec(0)
    with pytest.raises(InvalidTaskOptionsError):
        CronSpec("nope")
    with pytest.raises(InvalidTaskOptionsError):
        AtSpec("nope")
    assert CATCH_UP == ("none", "latest", "all") and OVERLAP == ("allow", "skip", "queue_one")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_bad_bounds_raise_when_fire_times_is_called_not_when_it_is_iterated(spec):
    with pytest.raises(InvalidTaskOptionsError, match="until"):
        spec.fire_times(B, math.inf)
    with pytest.raises(InvalidTaskOptionsError, match="after"):
        spec.fire_times("then", B)
    with pytest.raises(InvalidTaskOptionsError, match="'t'|^t "):
        spec.next_after(None)
