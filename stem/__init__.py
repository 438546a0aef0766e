"""stem: a fast, trustworthy task queue.

Producers enqueue named tasks (``Stem``), workers run them (``Worker``),
results land in a result backend.  See README.md and DESIGN.md.
"""

from . import _native
from .config import StemConfig
from .errors import StemError
from .handles import AsyncTaskRef, TaskHandle, TaskRef
from .aio import AsyncStem
from .producer import Stem
from .results import TaskResult, TaskState, TaskStatus
from .retry import ExponentialJitterRetryStrategy, RetryStrategy
from .signals import StemSignals, signals
from .signing import PayloadSigner
from .task import FunctionTaskHandler, TaskContext, TaskHandler, TaskOptions, TaskRegistry
from .worker import ShutdownMode, Worker, WorkerLifecycleConfig

__version__ = "0.1.0"

#: "cython" when every hot-path module runs compiled, "python" otherwise; ``stem._native``
#: decides and reports per module too.
IMPLEMENTATION = _native.implementation()

__all__ = [
    "Stem", "AsyncStem", "Worker", "TaskRegistry", "TaskOptions", "TaskContext", "TaskHandler",
    "FunctionTaskHandler", "TaskHandle", "TaskRef", "AsyncTaskRef", "TaskState", "TaskStatus", "TaskResult", "StemConfig", "PayloadSigner",
    "RetryStrategy", "ExponentialJitterRetryStrategy", "WorkerLifecycleConfig", "ShutdownMode",
    "signals", "StemSignals", "StemError", "IMPLEMENTATION", "__version__",
]
