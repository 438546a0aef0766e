"""Typed task handles in an importable module: pickled by reference, loaded by ``module:attribute``."""

from __future__ import annotations

import asyncio

from stem import TaskContext, TaskOptions, TaskRegistry

registry = TaskRegistry()


@registry.task("typed.add")
def add(ctx: TaskContext, a: int, b: int = 10) -> int:
    """Add two numbers."""
    return a + b


@registry.task("typed.greet")
def greet(ctx: TaskContext, name: str, *, loud: bool = False) -> str:
    return f"HELLO {name.upper()}" if loud else f"hello {name}"


@registry.task("typed.double")
async def double(ctx: TaskContext, n: int) -> int:
    await asyncio.sleep(0)
    return 2 * n


@registry.task("typed.fail", options=TaskOptions(max_retries=0))
def fail(ctx: TaskContext, why: str) -> None:
    raise RuntimeError(why)


@registry.task("typed.clash")
def clash(ctx: TaskContext, countdown: int, options: str, handle: str = "") -> list:
    """Its parameters have the names of enqueue's keyword arguments: they stay the task's."""
    return [countdown, options, handle]


@registry.task("typed.anything")
def anything(ctx: TaskContext, first: int, **rest: int) -> dict:
    return {"first": first, **rest}


@registry.task
def undecorated_name(ctx: TaskContext) -> str:
    return ctx.name
