"""Calls the type checker must accept, with the types it must infer (assert_type)."""

from typing import assert_type

from stem import AsyncStem, Stem, TaskContext, TaskOptions, TaskStatus
from stem.handles import AsyncTaskHandle, AsyncTaskRef, SyncTaskHandle, TaskHandle, TaskRef

from tasks import add, fetch, greet


def sync_calls(stem: Stem, ctx: TaskContext) -> None:
    by_position: SyncTaskHandle[[int, int], int] = add
    any_handle: TaskHandle[[str], bytes] = fetch
    async_handle: AsyncTaskHandle[[str], bytes] = fetch
    ref = stem.call(add, 1, y=2)
    assert_type(ref, TaskRef[int])
    assert_type(ref.id, str)
    assert_type(ref.status(), TaskStatus)
    assert_type(ref.result(timeout=5), int)
    assert_type(stem.call(add, x=1).result(), int)
    assert_type(stem.call(greet, "ada", loud=True).result(), str)
    assert_type(stem.call(fetch, "https://example.org").result(), bytes)
    assert_type(stem.call(add.with_options(TaskOptions(queue="slow"), countdown=5), 1), TaskRef[int])
    # the handle is still the function
    assert_type(add(ctx, 1, 2), int)
    assert_type(greet(ctx, "ada"), str)
    assert_type(stem.enqueue("typing.add", {"x": 1}), str)     # the string-name API stays


async def async_calls(astem: AsyncStem, ctx: TaskContext) -> None:
    assert_type(await fetch(ctx, "u"), bytes)              # an async task's handle is awaited as the function
    ref = await astem.call(add, 1, 2)
    assert_type(ref, AsyncTaskRef[int])
    assert_type(await ref.result(1.0), int)
    assert_type(await ref.status(), TaskStatus)
    assert_type(await (await astem.call(fetch, url="u")).result(), bytes)
