"""TaskOptions validation, the registry, retry strategies, signals, config."""

from __future__ import annotations

import logging
import random

import pytest

from stem import (ExponentialJitterRetryStrategy, StemConfig, TaskContext, TaskHandler, TaskOptions, TaskRegistry,
                  signals)
from stem.errors import (ConfigurationError, DuplicateHandlerError, InvalidTaskOptionsError, Retry, StemError,
                         UnknownTaskError)
from stem.signals import Signal


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_retries": -1}, "max_retries"),
    ({"max_retries": 1.5}, "max_retries"),
    ({"max_retries": True}, "max_retries"),
    ({"rate_limit": "fast"}, "rate_limit"),
    ({"rate_limit": "0/s"}, "rate_limit"),
    ({"rate_limit": "10/d"}, "rate_limit"),
    ({"queue": "has space"}, "queue"),
    ({"queue": ""}, "queue"),
    ({"queue": "q/1"}, "queue"),
    ({"priority": 10}, "priority"),
    ({"priority": -1}, "priority"),
    ({"soft_time_limit": 0}, "soft_time_limit"),
    ({"hard_time_limit": -3}, "hard_time_limit"),
    ({"soft_time_limit": 5, "hard_time_limit": 5}, "soft_time_limit"),
    ({"visibility_timeout": "30"}, "visibility_timeout"),
    ({"isolation": "thread"}, "isolation"),
    ({"expires": 0}, "expires"),
    ({"unique_for": 10}, "unique"),
    ({"acks_late": "yes"}, "acks_late"),
])
def test_bad_task_options_raise_a_clear_error(kwargs, fragment):
    with pytest.raises(InvalidTaskOptionsError, match=fragment) as info:
        TaskOptions(**kwargs)
    assert isinstance(info.value, StemError)


def test_good_task_options_are_accepted_and_merge_field_by_field():
    handler = TaskOptions(queue="reports", max_retries=3, rate_limit="100/m")
    call = TaskOptions(max_retries=1)
    merged = call.merged(handler)
    assert (merged.queue, merged.max_retries, merged.rate_limit) == ("reports", 1, "100/m")
    assert merged.rate_per_second == pytest.approx(100 / 60)
    assert TaskOptions(rate_limit="10/s").rate_per_second == 10


def test_registry_registers_functions_and_classes():
    registry = TaskRegistry()

    @registry.task("email.send", options=TaskOptions(max_retries=2))
    def send(ctx, to):
        return to

    class Report(TaskHandler):
        name = "report.generate"
        options = TaskOptions(queue="reports")

        def run(self, ctx, report_id):
            return report_id

    registry.register(Report())
    assert registry.names() == ["email.send", "report.generate"]
    assert registry.get("email.send").options.max_retries == 2
    assert send(None, to="x") == "x"  # the decorated function stays callable
    assert registry.get("report.generate").run(None, report_id=7) == 7


def test_duplicate_task_names_are_an_error():
    registry = TaskRegistry()
    registry.task("a")(lambda ctx: None)
    with pytest.raises(DuplicateHandlerError, match="'a' is already registered"):
        registry.task("a")(lambda ctx: None)


def test_unknown_task_error_suggests_the_closest_name():
    registry = TaskRegistry()
    registry.task("email.send")(lambda ctx: None)
    with pytest.raises(UnknownTaskError, match="did you mean 'email.send'"):
        registry.get("emial.send")


def test_registering_a_class_instead_of_an_instance_says_how_to_fix_it():
    class H(TaskHandler):
        name = "h"

    with pytest.raises(InvalidTaskOptionsError, match=r"register\(H\(\)\)"):
        TaskRegistry().register(H)


def test_bad_task_name_is_rejected():
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        TaskRegistry().task("has space")(lambda ctx: None)


def test_context_retry_raises_a_base_exception_carrying_the_countdown():
    ctx = TaskContext("id", "n")
    with pytest.raises(Retry) as info:
        ctx.retry(countdown=3)
    assert info.value.countdown == 3
    assert not isinstance(info.value, Exception)


def test_context_progress_rejects_fractions_outside_0_1():
    with pytest.raises(InvalidTaskOptionsError):
        TaskContext("id", "n").progress(1.5)


def test_exponential_jitter_stays_within_three_quarters_and_the_full_delay():
    s = ExponentialJitterRetryStrategy(base=0.2, max=1.0, rng=random.Random(1))
    for attempt, full in [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.0), (10, 1.0), (1000, 1.0)]:
        for _ in range(50):
            d = s.next_delay(attempt)
            assert 0.75 * full - 1e-9 <= d <= full + 1e-9


def test_retry_strategy_rejects_negative_and_inverted_bounds():
    with pytest.raises(ConfigurationError):
        ExponentialJitterRetryStrategy(base=-1, max=1)
    with pytest.raises(ConfigurationError):
        ExponentialJitterRetryStrategy(base=2, max=1)


def test_a_raising_signal_receiver_is_logged_and_others_still_run(caplog):
    sig = Signal("test_sig")
    seen = []

    @sig.connect
    def broken(sender, **kw):
        raise RuntimeError("receiver bug")

    sig.connect(lambda sender, **kw: seen.append(kw))
    with caplog.at_level(logging.ERROR, logger="stem.signals"):
        sig.send(None, x=1)
    assert seen == [{"x": 1}]
    assert "receiver bug" in caplog.text
    assert sig.disconnect(broken)
    assert not sig.disconnect(broken)


def test_signal_receivers_are_strong_references():
    sig = Signal("strong")
    seen = []

    def make():
        def local(sender, **kw):
            seen.append(1)
        return local

    sig.connect(make())
    import gc
    gc.collect()
    sig.send(None)
    assert seen == [1]


def test_the_catalog_has_every_documented_signal():
    names = {s.name for s in signals}
    assert {"before_task_publish", "after_task_publish", "worker_init", "worker_ready", "worker_stopping",
            "worker_shutdown", "worker_heartbeat", "worker_child_init", "worker_child_shutdown", "task_received",
            "task_prerun", "task_postrun", "task_retry", "task_succeeded", "task_failed", "task_revoked",
            "control_command_received", "control_command_completed"} <= names
    with pytest.raises(ConfigurationError):
        signals.get("no_such_signal")


def test_config_reads_stem_variables():
    import base64
    key = base64.b64encode(b"k" * 32).decode()
    cfg = StemConfig.from_environment({
        "STEM_BROKER_URL": "redis://localhost:6379/1", "STEM_RESULT_BACKEND_URL": "memory://",
        "STEM_DEFAULT_QUEUE": "jobs", "STEM_PREFETCH_MULTIPLIER": "4", "STEM_WORKER_QUEUES": "a, b",
        "STEM_WORKER_CONCURRENCY": "3", "STEM_SIGNING_KEYS": f"k1:{key},k2:{key}",
        "STEM_SIGNING_ACTIVE_KEY": "k2"})
    assert cfg.broker_url == "redis://localhost:6379/1"
    assert cfg.default_queue == "jobs" and cfg.worker_queues == ["a", "b"]
    assert cfg.prefetch_multiplier == 4 and cfg.worker_concurrency == 3
    assert cfg.signing_keys == {"k1": b"k" * 32, "k2": b"k" * 32} and cfg.signing_active_key == "k2"


@pytest.mark.parametrize("env, fragment", [
    ({"STEM_PREFETCH_MULTIPLIER": "two"}, "STEM_PREFETCH_MULTIPLIER"),
    ({"STEM_WORKER_CONCURRENCY": "0"}, "STEM_WORKER_CONCURRENCY"),
    ({"STEM_WORKER_QUEUES": "good,bad queue"}, "bad queue"),
    ({"STEM_SIGNING_ALGORITHM": "rot13"}, "rot13"),
    ({"STEM_SIGNING_KEYS": "nocolon"}, "STEM_SIGNING_KEYS|nocolon|id:base64"),
])
def test_bad_config_values_raise_configuration_error(env, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        StemConfig.from_environment(env)


def test_config_without_broker_url_says_what_to_set():
    with pytest.raises(ConfigurationError, match="STEM_BROKER_URL"):
        StemConfig.from_environment({}).broker()


def test_broker_and_backend_urls_pick_their_adapter():
    from stem.backends import InMemoryResultBackend
    from stem.backends import from_url as backend_url
    from stem.brokers import InMemoryBroker, from_url
    assert isinstance(from_url("memory://"), InMemoryBroker)
    assert from_url("memory://x") is from_url("memory://x")
    assert isinstance(backend_url("memory://"), InMemoryResultBackend)
    for bad in ("nope", "ftp://host", ""):
        with pytest.raises(ConfigurationError):
            from_url(bad)
        with pytest.raises(ConfigurationError):
            backend_url(bad)
