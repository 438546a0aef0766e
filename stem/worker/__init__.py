"""The worker: ``Worker`` (consume/settle loop) and its engines."""

from .autoscale import WorkerAutoscaleConfig
from .lifecycle import ShutdownMode, WorkerLifecycleConfig
from .worker import Worker

__all__ = ["Worker", "WorkerLifecycleConfig", "WorkerAutoscaleConfig", "ShutdownMode"]
