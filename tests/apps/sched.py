"""A registry with 1-second schedules, for scheduler processes (``stem beat``) in fault tests."""

from stem import TaskRegistry
from stem.schedules import Schedule, every

QUEUE = "sched-chaos"

registry = TaskRegistry()


@registry.task("chaos.tick")
def tick(ctx, **kw):
    return None


# catch_up="all": a run missed while every scheduler was down or paused is fired late, never lost
registry.schedule(Schedule("chaos-a", task="chaos.tick", spec=every(1), queue=QUEUE, catch_up="all"))
registry.schedule(Schedule("chaos-b", task="chaos.tick", spec=every(1, anchor=0.5), queue=QUEUE, catch_up="all",
                           args={"b": True}))
