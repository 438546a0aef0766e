"""``Workflows.astart`` / ``asend`` with an ``AsyncStem`` on every adapter (memory, SQLite, Redis, Redis
behind Sentinel, Postgres): what they store, mirror and wake is what ``start`` / ``send`` do, and they refuse
what those refuse, with the same errors, before anything is stored."""

from __future__ import annotations

import asyncio

import pytest

from stem import AsyncStem, Stem, TaskRegistry, TaskState
from stem.envelope import decode_frame
from stem.errors import ConfigurationError, EncodeError, RunFinishedError, RunNotFoundError, UnknownWorkflowError
from stem.workflows import Workflows
from stem.workflows.admin import cancel
from stem.workflows.engine import activate
from stem.workflows.wake import ACTIVATE

from .test_aio import adapters, kind  # noqa: F401 - fixtures: (broker, backend) of each kind

PARKED = "PARKED"


def _app(broker, backend):
    registry = TaskRegistry()
    wf = Workflows(registry, max_output_bytes=1024)

    @wf.workflow("aio.order")
    def order(ctx, n):
        got = ctx.wait("paid", timeout=60)
        return n + got["cents"]

    return registry, wf


def _activations(broker) -> list[str]:
    return [decode_frame(d.frame).args["run_id"] for d in broker.consume(["default"], 50, 2.0)
            if decode_frame(d.frame).name == ACTIVATE]


def test_astart_creates_mirrors_and_wakes_a_run_once_and_asend_delivers_its_event(adapters):
    broker, backend = adapters
    registry, wf = _app(broker, backend)
    store = wf.store_for(backend)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            run_id = await wf.astart(s, "aio.order", {"n": 1}, run_id="o-1")
            again = await wf.astart(s, "aio.order", {"n": 1}, run_id="o-1")   # idempotent: nothing new
            queued = _activations(broker)
            mirrored = await s.get_status(run_id)
            await asyncio.to_thread(activate, workflows=wf, store=store, producer=Stem(broker, backend, None),
                                    run_id=run_id, owner="test")       # runs up to its wait: parked
            parked = store.get(run_id).status
            stored = await wf.asend(s, run_id, "paid", {"cents": 41}, event_id="pay-1")
            repeated = await wf.asend(s, run_id, "paid", {"cents": 41}, event_id="pay-1")
            woken = _activations(broker)
            await asyncio.to_thread(activate, workflows=wf, store=store, producer=Stem(broker, backend, None),
                                    run_id=run_id, owner="test")
            return run_id, again, queued, mirrored, parked, stored, repeated, woken, await s.wait_for_task(run_id, 10)

    run_id, again, queued, mirrored, parked, stored, repeated, woken, status = asyncio.run(main())
    assert run_id == again == "o-1"
    assert queued == ["o-1"]                     # one activation for two starts
    assert mirrored.state is TaskState.PENDING
    assert parked == PARKED
    assert (stored, repeated) == (True, False)   # a retried send is stored once
    assert woken == ["o-1"]
    assert status.state is TaskState.SUCCEEDED and status.result == 42


def _sync_error(call):
    try:
        call()
    except Exception as exc:   # noqa: BLE001 - compared with the async call's
        return exc
    raise AssertionError("the sync call did not fail")


@pytest.mark.parametrize("call, error", [
    (lambda wf, s: wf.start(s, "aio.nope"), UnknownWorkflowError),
    (lambda wf, s: wf.start(s, "aio.order", {"n": object()}), EncodeError),
    (lambda wf, s: wf.start(s, "aio.order", {"n": "x" * 4000}), EncodeError),
    (lambda wf, s: wf.start(s, "aio.order", {"n": 1}, run_id=""), ConfigurationError),
    (lambda wf, s: wf.send(s, "", "paid"), ConfigurationError),
    (lambda wf, s: wf.send(s, "o-1", "__call__"), ConfigurationError),
    (lambda wf, s: wf.send(s, "o-1", "paid", event_id=""), ConfigurationError),
    (lambda wf, s: wf.send(s, "o-1", "paid", {"x": "y" * 4000}), EncodeError),
    (lambda wf, s: wf.send(s, "ghost", "paid"), RunNotFoundError),
])
def test_async_start_and_send_refuse_what_the_sync_ones_refuse_with_the_same_error(adapters, call, error):
    broker, backend = adapters
    registry, wf = _app(broker, backend)
    sync = Stem(broker, backend, registry)
    expected = _sync_error(lambda: call(wf, sync))
    assert isinstance(expected, error)

    class Async:       # the same call, with the async twin of each method
        def start(self, s, *a, **kw):
            return wf.astart(s, *a, **kw)

        def send(self, s, *a, **kw):
            return wf.asend(s, *a, **kw)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            with pytest.raises(error) as got:
                await call(Async(), s)
            return got.value

    assert str(asyncio.run(main())) == str(expected)
    assert broker.stats("default").ready == 0            # nothing was woken


def test_asend_to_an_ended_run_raises_run_finished_error(adapters):
    broker, backend = adapters
    registry, wf = _app(broker, backend)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            run_id = await wf.astart(s, "aio.order", {"n": 1})
            await asyncio.to_thread(cancel, Stem(broker, backend, None), wf.store_for(backend), run_id)
            with pytest.raises(RunFinishedError, match="ended CANCELLED"):
                await wf.asend(s, run_id, "paid", {"cents": 1})

    asyncio.run(main())


def test_astart_and_asend_take_an_async_stem_with_a_backend(adapters):
    broker, backend = adapters
    registry, wf = _app(broker, backend)

    async def main():
        with pytest.raises(ConfigurationError, match="take an AsyncStem"):
            await wf.astart(Stem(broker, backend, registry), "aio.order", {"n": 1})
        async with AsyncStem(broker, None, registry) as s:
            with pytest.raises(ConfigurationError, match="result backend"):
                await wf.astart(s, "aio.order", {"n": 1})
            with pytest.raises(ConfigurationError, match="result backend"):
                await wf.asend(s, "o-1", "paid")

    asyncio.run(main())


def test_astart_and_asend_behind_sentinel(request):
    from .test_aio import _sentinel_pair
    broker, backend = _sentinel_pair(request)
    registry, wf = _app(broker, backend)

    async def main():
        async with AsyncStem(broker, backend, registry) as s:
            run_id = await wf.astart(s, "aio.order", {"n": 1})
            with pytest.raises(RunNotFoundError):
                await wf.asend(s, "ghost", "paid", {"cents": 1})
            stored = await wf.asend(s, run_id, "paid", {"cents": 1}, event_id="e-1")
            return run_id, stored, (await s.get_status(run_id)).state, _activations(broker)

    run_id, stored, state, queued = asyncio.run(main())
    assert stored is True and state is TaskState.PENDING and queued == [run_id]
