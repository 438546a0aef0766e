"""The worker: ``Worker`` (consume/settle loop) and its engines."""

from .lifecycle import ShutdownMode, WorkerLifecycleConfig
from .worker import Worker

__all__ = ["Worker", "WorkerLifecycleConfig", "ShutdownMode"]
