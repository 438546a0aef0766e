"""What the workflow tests share: one app (registry, Workflows, memory broker and backend,
producer, store), an inline worker that is always stopped, activations driven by hand,
and the injectable clock."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from stem import Stem, TaskRegistry, Worker
from stem.backends import InMemoryResultBackend
from stem.brokers import InMemoryBroker
from stem.workflows import Workflows
from stem.workflows import clock
from stem.workflows.engine import activate

from .support import wait_for


class App:
    """A registry with workflows over one memory broker and backend (shared by every worker
    and producer of the test)."""

    def __init__(self, *, store: Any = None, **options: Any):
        """``store``: a ``tests.support.Store`` to run on (default: a memory broker and backend)."""
        options.setdefault("sweep_interval", 0.05)
        self.registry = TaskRegistry()
        self.wf = Workflows(self.registry, **options)
        self.broker = InMemoryBroker() if store is None else store.broker()
        self.backend = InMemoryResultBackend() if store is None else store.backend()
        self.stem = Stem(self.broker, self.backend, self.registry)
        self.store = self.wf.store_for(self.backend)

    @contextlib.contextmanager
    def worker(self, concurrency: int = 4, **options: Any) -> Iterator[Worker]:
        w = Worker(self.broker, self.backend, self.registry, isolation="inline", concurrency=concurrency,
                   heartbeat_interval=0.2, **options).run_in_background()
        try:
            yield w
        finally:
            w.shutdown(timeout=20)

    def activate(self, run_id: str, owner: str = "test") -> str:
        """One activation by hand (what a wake-up's task does), in this thread."""
        return activate(workflows=self.wf, store=self.store, producer=Stem(self.broker, self.backend, None),
                        run_id=run_id, owner=owner)

    def run(self, run_id: str):
        return self.store.get(run_id)

    def journal(self, run_id: str) -> list:
        return self.store.journal(run_id)

    def kinds(self, run_id: str) -> list[tuple[str, str]]:
        return [(e.kind, e.name) for e in self.store.journal(run_id)]

    def wait_status(self, run_id: str, status: str, timeout: float = 20.0) -> Any:
        wait_for(lambda: getattr(self.store.get(run_id), "status", None) == status, timeout,
                 f"run {run_id} to be {status} (is {getattr(self.store.get(run_id), 'status', None)})")
        return self.store.get(run_id)

    def queued(self, queue: str = "default") -> int:
        return self.broker.stats(queue).ready


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def wf_clock(tmp_path, monkeypatch):
    """The workflows' clock, movable (``clock.advance(seconds)``) in this process and in every
    process started with this environment."""
    monkeypatch.setenv(clock.ENV, str(tmp_path / "wf-clock"))
    clock.set_offset(0.0)
    return clock
