"""Producer build cost: ``Stem.enqueue_many`` of 500 signed tasks, broker I/O excluded.

    .venv/bin/python -m pytest benchmarks/test_producer.py -p no:cacheprovider \
        --benchmark-only --benchmark-group-by=group --benchmark-timer=time.process_time -q

The broker stores nothing, so a round measures only what the producer does
per task.  A batch of one task name (the first three groups) takes the
uniform path: check each item, make the ids, splice and HMAC-sign each frame
(``encode_frames``), one ``publish_frames`` call.  ``mixed items`` holds two
item shapes, so it takes the general path: per item validate, resolve
options, build the Envelope, encode and sign the frame, build the Message.  Use the
process-CPU timer (``--benchmark-timer=time.process_time``) on a shared
machine: wall time there measures the neighbours too.  One round is one
``enqueue_many`` call; ``extra_info["us_per_task_{min,median,mean}"]`` are
the round times divided by the batch size.  The ``c`` and ``py`` rows run the same producer over the
compiled and the pure frame codec and signer, in one group.
"""

from __future__ import annotations

from typing import Sequence

import pytest

from benchmarks._twins import codec_builds

from stem import PayloadSigner, Stem, TaskOptions, TaskRegistry
from stem import envelope
from stem.brokers import InMemoryBroker, Message
from stem.envelope import Envelope, FrameHeader

BATCH = 500
SECRET = b"benchmark-signing-key-32-bytes!!"


class NullBroker(InMemoryBroker):
    """Accepts every batch and keeps nothing: the producer's cost alone."""

    def publish_many(self, messages: Sequence[Message]) -> None:
        pass

    def publish_frames(self, queue, task_ids, frames, *, priority=0, visibility_timeout=None) -> None:
        pass


BUILDS = codec_builds()


@pytest.fixture(params=["c", "py"])
def impl(request, monkeypatch):
    """Route the producer's frame encoding through one build; the signer module to sign with."""
    if request.param not in BUILDS:
        pytest.skip("stem._speedups is not built (make build)")
    codec_mod, signer_mod = BUILDS[request.param]
    codec = codec_mod.FrameCodec(Envelope, FrameHeader)
    monkeypatch.setattr(envelope, "_encode_frame", codec.encode_frame)
    monkeypatch.setattr(envelope, "_codec", codec)
    return signer_mod


def producer(signer_mod, registry: bool = True) -> Stem:
    reg = None
    if registry:
        reg = TaskRegistry()
        reg.task("bench.incr", options=TaskOptions(max_retries=2))(lambda ctx, n=1: n)
    signer = PayloadSigner({"bench": SECRET})
    # the signer's compiled/pure backend, so the whole frame path is one build
    signer._backend = signer_mod.HmacSigner({b"bench": SECRET}, b"bench")
    return Stem(NullBroker(), None, reg, signer)


def _run(benchmark, stem: Stem, items: list) -> None:
    ids = benchmark(stem.enqueue_many, items)
    assert len(ids) == len(items) == BATCH
    if benchmark.stats is None:   # --benchmark-disable: ran once, nothing measured
        return
    stats = benchmark.stats.stats
    for stat in ("min", "median", "mean"):
        benchmark.extra_info[f"us_per_task_{stat}"] = round(getattr(stats, stat) / BATCH * 1e6, 3)


def test_enqueue_many_no_args(benchmark, impl):
    benchmark.group = f"enqueue_many {BATCH} signed, no args"
    _run(benchmark, producer(impl), [("bench.incr", {})] * BATCH)


def test_enqueue_many_small_args(benchmark, impl):
    benchmark.group = f"enqueue_many {BATCH} signed, small args"
    items = [("bench.incr", {"n": i, "user": f"user-{i}@example.com"}) for i in range(BATCH)]
    _run(benchmark, producer(impl), items)


def test_enqueue_many_without_registry(benchmark, impl):
    benchmark.group = f"enqueue_many {BATCH} signed, no registry"
    _run(benchmark, producer(impl, registry=False), [("bench.incr", {})] * BATCH)


def test_enqueue_many_mixed_items(benchmark, impl):
    benchmark.group = f"enqueue_many {BATCH} signed, mixed items (general path)"
    items = [("bench.incr", {"n": i}) if i % 2 else ("bench.incr", {"n": i}, None) for i in range(BATCH)]
    _run(benchmark, producer(impl), items)
