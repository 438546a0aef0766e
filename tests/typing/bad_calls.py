"""Calls the type checker must reject: each line marked ``# E: <code>`` must get that error."""

from stem import AsyncStem, Stem, TaskContext

from tasks import add, fetch, greet


def wrong(stem: Stem, ctx: TaskContext) -> None:
    stem.call(add, "1")                 # E: arg-type
    stem.call(add, 1, z=2)              # E: call-arg
    stem.call(add)                      # E: call-arg
    stem.call(add, 1, 2, 3)             # E: call-arg
    stem.call(greet, 1)                 # E: arg-type
    stem.call(greet, "ada", True)       # E: call-arg
    stem.call(fetch, url=b"u")          # E: arg-type
    stem.call("typing.add", 1)          # E: arg-type
    stem.call(add.with_options(countdown="5"), 1)  # E: arg-type
    add(ctx, "x")                       # E: arg-type
    add(1)                              # E: arg-type
    x: str = stem.call(add, 1).result()  # E: assignment
    y: int = stem.call(fetch, "u").result()  # E: assignment


async def wrong_async(astem: AsyncStem) -> None:
    await astem.call(add, y=2)          # E: call-arg
    s: str = await (await astem.call(add, 1)).result()  # E: assignment
