"""Durable workflows: multi-step functions whose progress survives crashes (README, "Workflows").

    from stem.workflows import Workflows, StepRetry
    wf = Workflows(registry)

The modules: ``api`` (``Workflows``, ``StepRetry``: declaring, starting, sending),
``context`` (``WorkflowContext``: the durable calls), ``engine`` (one activation),
``wake`` (wake-ups and their ids), ``mirror`` (a run's status in the result backend),
``sweeper``, ``admin`` (what operators do: list, show, cancel, reset, retry), ``clock``
(the injectable clock, a test facility), ``codec``, and the store contract (``store``)
with its adapters.  Names import lazily: a worker that only settles a called task
loads ``wake`` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Workflows", "StepRetry", "WorkflowContext", "ChildRun", "Step", "WorkflowDef", "open_store"]

_WHERE = {"Workflows": "api", "StepRetry": "api", "Step": "api", "WorkflowDef": "api",
          "WorkflowContext": "context", "ChildRun": "context", "open_store": "store"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'stem.workflows' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stem.workflows.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
