"""Values the library refuses at every entry point: non-finite durations and times, task
names no registry could hold (issue 18: NaN and 1e400 were accepted, 'bad name!' was
published and dead-lettered later)."""

from __future__ import annotations

import math

import pytest

from stem import Stem, TaskOptions, TaskRegistry
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.errors import InvalidTaskOptionsError

NON_FINITE = [math.nan, math.inf, -math.inf, float("1e400")]


@pytest.fixture
def stem():
    broker = InMemoryBroker()
    with Stem(broker, InMemoryResultBackend()) as producer:
        yield producer


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
@pytest.mark.parametrize("field", ["soft_time_limit", "hard_time_limit", "visibility_timeout", "expires"])
def test_task_option_durations_must_be_finite(field, value):
    with pytest.raises(InvalidTaskOptionsError, match="finite"):
        TaskOptions(**{field: value})


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_unique_for_must_be_finite(value):
    with pytest.raises(InvalidTaskOptionsError, match="finite"):
        TaskOptions(unique=True, unique_for=value)


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_countdown_and_eta_must_be_finite(stem, value):
    with pytest.raises(InvalidTaskOptionsError, match="countdown"):
        stem.enqueue("a.task", countdown=value)
    with pytest.raises(InvalidTaskOptionsError, match="eta"):
        stem.enqueue("a.task", eta=value)
    with pytest.raises(InvalidTaskOptionsError, match="countdown"):
        stem.enqueue_many([{"name": "a.task", "countdown": value}])
    with pytest.raises(InvalidTaskOptionsError, match="eta"):
        stem.enqueue_many([{"name": "a.task", "eta": value}])
    assert stem.broker.queues() == []


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_wait_for_task_timeout_must_be_finite(stem, value):
    with pytest.raises(InvalidTaskOptionsError, match="timeout"):
        stem.wait_for_task("some-id", timeout=value)


BAD_NAMES = ["bad name!", "1starts.with.digit", "trailing.newline\n", "x" * 201, "ümlaut", "a/b"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_producer_without_a_registry_refuses_names_no_registry_could_hold(stem, name):
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        stem.enqueue(name)
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        stem.enqueue_many([(name, {"i": i}) for i in range(3)])           # the one-name fast path
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        stem.enqueue_many([("good.name", {}), (name, {}), ("good.name", {})])   # the general path
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        stem.enqueue_many([{"name": name}])
    assert stem.broker.queues() == []


def test_every_name_a_registry_accepts_a_producer_accepts_too(stem):
    registry = TaskRegistry()
    for name in ("a", "_private", "email.send", "billing:charge-v2", "x" * 200):
        registry.task(name)(lambda ctx: None)
        stem.enqueue(name)
    assert stem.broker.stats("default").ready == 5
