"""Periodic tasks: two schedulers (as on two hosts) fire each run once, and a 02:30 job
runs once on the night the clocks spring forward.

    python examples/schedules.py

In production run ``stem beat -A myapp.tasks:registry`` (as many as you like) or
``stem worker --beat``; here two Schedulers walk a fake clock over two days so the
example finishes at once.
"""

from datetime import datetime
from zoneinfo import ZoneInfo

from stem import Stem, TaskRegistry, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.scheduler import Scheduler
from stem.schedules import Schedule, cron, every

BERLIN = ZoneInfo("Europe/Berlin")
registry = TaskRegistry()
ran = []


@registry.task("report.build")
def build(ctx, kind):
    ran.append((ctx.meta["schedule"], ctx.meta["fire_time"]))


@registry.task("feed.poll")
def poll(ctx):
    ran.append((ctx.meta["schedule"], ctx.meta["fire_time"]))


registry.schedule(Schedule("nightly-report", task="report.build", args={"kind": "daily"},
                           spec=cron("30 2 * * *", tz="Europe/Berlin"), catch_up="latest"))
registry.schedule(Schedule("poll", task="feed.poll", spec=every(600)))

broker, backend = InMemoryBroker(), InMemoryResultBackend()
stem = Stem(broker, backend, registry)
a, b = Scheduler(stem, tick=60), Scheduler(stem, tick=60)   # both take the registry's schedules

start = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN).timestamp()   # noon before spring-forward
for minute in range(2 * 24 * 60):
    now = start + 60 * minute
    for scheduler in (a, b) if minute // 10 % 2 else (b, a):   # whichever passes first publishes
        scheduler.run_once(now)
print(f"published {a.counters['fired'] + b.counters['fired']} runs "
      f"(scheduler a: {a.counters['fired']}, b: {b.counters['fired']}), each once")

worker = Worker(broker, backend, registry, isolation="inline", concurrency=2)
worker.start(burst=True)
print(worker.stats()["succeeded"], "runs succeeded")
for schedule_id, fire_time in sorted(ran):
    if schedule_id == "nightly-report":
        print("nightly-report ran for", datetime.fromtimestamp(fire_time, BERLIN).isoformat())
print(sum(1 for s, _ in ran if s == "poll"), "polls, one every 10 minutes")
