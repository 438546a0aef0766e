"""Tasks the type-checked files below call (read by mypy only, never imported by pytest)."""

from stem import TaskContext, TaskOptions, TaskRegistry

registry = TaskRegistry()


@registry.task("typing.add")
def add(ctx: TaskContext, x: int, y: int = 0) -> int:
    return x + y


@registry.task
def greet(ctx: TaskContext, name: str, *, loud: bool = False) -> str:
    return name.upper() if loud else name


@registry.task("typing.fetch", options=TaskOptions(max_retries=2))
async def fetch(ctx: TaskContext, url: str) -> bytes:
    return url.encode()
