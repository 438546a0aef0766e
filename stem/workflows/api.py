"""``Workflows``: declaring workflows and steps on a registry, starting runs, sending events.

``Workflows(registry)`` registers the internal task ``stem.wf.activate``
(``ActivationHandler``) in ``registry``: every worker running that registry runs
activations like any other task (in its children), and runs the sweeper
(``stem.workflows.sweeper``).  Producers call ``start`` and ``send``; the run's status is
then read as a task's, under its run id.
"""

from __future__ import annotations

import random
import uuid
import weakref
from typing import Any, Callable, Concatenate, Generic, ParamSpec, TypeVar, overload

from .. import _checks as checks
from ..errors import ConfigurationError, RunFinishedError, RunNotFoundError, UnknownWorkflowError
from ..task import TaskContext, TaskHandler, TaskOptions, TaskRegistry
from . import clock
from .codec import encode
from .context import Limits, WorkflowContext, check_size, check_topic, input_bytes, run_step
from .engine import activate, owner_id
from .mirror import mirror
from .store import PARKED, PENDING, WorkflowStore, check_run_id, open_store
from .wake import ACTIVATE, publish_wake

__all__ = ["Workflows", "StepRetry", "Step", "WorkflowDef", "ActivationHandler"]

P = ParamSpec("P")
R = TypeVar("R")

#: Defaults of the limits (README, "Workflows"): bytes of a recorded value, entries of a journal.
DEFAULT_MAX_OUTPUT_BYTES = 256 * 1024
DEFAULT_MAX_JOURNAL = 10_000


class StepRetry:
    """How a step is retried inside its activation: up to ``max_attempts`` attempts in all
    (finite), waiting ``backoff * 2**(n-1)`` seconds (at most ``max_backoff``, with jitter)
    before attempt n+1, for exceptions of the ``retry_on`` classes only (any other fails the
    step at once).  After the last attempt the failure is recorded and raised into the
    workflow as ``StepFailedError``."""

    __slots__ = ("max_attempts", "backoff", "max_backoff", "retry_on")

    def __init__(self, max_attempts: int = 3, *, backoff: float = 0.5, max_backoff: float = 30.0,
                 retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,)):
        self.max_attempts = checks.integer("max_attempts", max_attempts, minimum=1, error=ConfigurationError)
        self.backoff = checks.seconds("backoff", backoff, inclusive=True, error=ConfigurationError)
        self.max_backoff = checks.seconds("max_backoff", max_backoff, inclusive=True, error=ConfigurationError)
        if self.max_backoff < self.backoff:
            raise ConfigurationError(f"max_backoff ({max_backoff}) must be >= backoff ({backoff})")
        kinds = (retry_on,) if isinstance(retry_on, type) else retry_on
        if not isinstance(kinds, tuple) or not kinds or not all(
                isinstance(k, type) and issubclass(k, Exception) for k in kinds):
            raise ConfigurationError(f"retry_on must be an Exception subclass or a tuple of them, got {retry_on!r}")
        self.retry_on = kinds

    def retries(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 30))
        return cap * random.uniform(0.5, 1.0)

    def __repr__(self) -> str:
        return (f"StepRetry({self.max_attempts}, backoff={self.backoff}, max_backoff={self.max_backoff}, "
                f"retry_on={tuple(k.__name__ for k in self.retry_on)})")


DEFAULT_RETRY = StepRetry()


def _by_reference(obj: Any) -> str:
    """``__reduce__`` of a decorated function's wrapper: pickle finds it by module and
    qualified name (where the decorator left it), as a plain function would be."""
    name = getattr(obj, "__qualname__", None)
    if not name:
        import pickle
        raise pickle.PicklingError(f"{obj!r} wraps a callable without a __qualname__: it cannot be pickled")
    return name


class Step(Generic[P, R]):
    """A step (``@wf.step``): called from a workflow as the function (``charge(ctx, ...)``),
    it runs once per run and position and its result is recorded; replays return the
    recorded result (or raise its recorded failure) without running it.  Called with
    anything but a workflow's context (a unit test) it is the plain function."""

    def __init__(self, fn: Callable[Concatenate[Any, P], R], name: str, retry: StepRetry):
        self.fn = fn
        self.name = name
        self.retry = retry
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, ctx: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        if isinstance(ctx, WorkflowContext):
            return run_step(ctx, self, args, kwargs)
        return self.fn(ctx, *args, **kwargs)

    def __reduce__(self) -> str:
        return _by_reference(self)

    def __repr__(self) -> str:
        return f"<Step {self.name!r}>"


class WorkflowDef(Generic[P, R]):
    """A workflow (``@wf.workflow``): what ``start`` runs by name.  Callable as the function."""

    def __init__(self, fn: Callable[Concatenate[WorkflowContext, P], R], name: str, version: str):
        self.fn = fn
        self.workflow_name = name
        self.version = version
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    @property
    def name(self) -> str:
        return self.workflow_name

    def __call__(self, ctx: WorkflowContext, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(ctx, *args, **kwargs)

    def __reduce__(self) -> str:
        return _by_reference(self)

    def __repr__(self) -> str:
        return f"<Workflow {self.workflow_name!r} version {self.version!r}>"


class ActivationHandler(TaskHandler):
    """The internal task ``stem.wf.activate``: one activation of one run (``engine.activate``).
    Its own retries cover a store or broker outage (the activation hands its run back first:
    ``engine.HAND_BACK``); a run whose activation is lost for good is found again by the
    sweeper once its lease or due time passes."""

    name = ACTIVATE

    def __init__(self, workflows: "Workflows"):
        self.workflows = workflows
        self.options = TaskOptions(queue=workflows.queue, max_retries=3, retry_backoff=1.0, retry_backoff_max=30.0,
                                   ignore_result=True)

    def run(self, ctx: TaskContext, **args: Any) -> str:
        run_id = args.get("run_id")
        check_run_id(run_id)
        producer = ctx.producer()
        return activate(workflows=self.workflows, store=self.workflows.store_for(producer.backend),
                        producer=producer, run_id=run_id, owner=owner_id())


class Workflows:
    """The workflows and steps declared on one registry, and how runs are started.

    ``queue``: where activations are published (workers of the registry must consume it).
    ``lease``: seconds an activation holds a run without renewing (renewed every third of
    it; a stalled activation loses the run after it).  ``sweep_interval``: how often each
    worker's sweeper looks for runs that are due.  ``max_output_bytes``: the largest value
    recorded (a step's output, a result, an input, an event payload).  ``max_journal``:
    journal entries of one run before it fails (``ctx.continue_as_new`` starts afresh)."""

    def __init__(self, registry: TaskRegistry, *, queue: str = "default", lease: float = 30.0,
                 sweep_interval: float = 5.0, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 max_journal: int = DEFAULT_MAX_JOURNAL):
        if not isinstance(registry, TaskRegistry):
            raise ConfigurationError(f"Workflows needs a TaskRegistry, got {registry!r}")
        self.registry = registry
        self.queue = checks.queue_name(queue, error=ConfigurationError)
        self.lease = checks.seconds("lease", lease, minimum=0.1, error=ConfigurationError)
        self.sweep_interval = checks.seconds("sweep_interval", sweep_interval, minimum=0.01,
                                             error=ConfigurationError)
        self.limits = Limits(checks.integer("max_output_bytes", max_output_bytes, minimum=64, error=ConfigurationError),
                             checks.integer("max_journal", max_journal, minimum=2, error=ConfigurationError))
        self._versions: dict[str, dict[str, WorkflowDef[Any, Any]]] = {}
        self._latest: dict[str, WorkflowDef[Any, Any]] = {}
        self._steps: dict[str, Step[Any, Any]] = {}
        self._stores: "weakref.WeakKeyDictionary[Any, WorkflowStore]" = weakref.WeakKeyDictionary()
        registry.register(ActivationHandler(self))

    # -- declaring ---------------------------------------------------------------------------
    @overload
    def step(self, fn: Callable[Concatenate[Any, P], R], /) -> Step[P, R]: ...

    @overload
    def step(self, fn: None = None, /, *, name: str | None = None,
             retry: StepRetry | None = None) -> Callable[[Callable[Concatenate[Any, P], R]], Step[P, R]]: ...

    def step(self, fn: Any = None, /, *, name: str | None = None, retry: StepRetry | None = None) -> Any:
        """Decorator: ``@wf.step`` or ``@wf.step(retry=StepRetry(5), name="billing.charge")``.
        The name (default: module and qualified name) is what the journal matches: renaming
        a step under running runs makes them need attention."""
        if retry is not None and not isinstance(retry, StepRetry):
            raise ConfigurationError(f"retry must be a StepRetry, got {retry!r}")

        def decorate(f: Callable[..., Any]) -> Step[Any, Any]:
            if not callable(f):
                raise ConfigurationError(f"@wf.step decorates a function, got {f!r}")
            import inspect
            if inspect.iscoroutinefunction(f):
                raise ConfigurationError(f"step {f.__qualname__!r} is async: steps are plain functions")
            step_name = name if name is not None else f"{f.__module__}.{f.__qualname__.replace('<locals>.', '')}"
            if not isinstance(step_name, str) or not 0 < len(step_name) <= 200:
                raise ConfigurationError(f"a step name is a non-empty string of at most 200 chars, got {step_name!r}"
                                         + ("" if name is not None else ": give the step a name="))
            if step_name in self._steps:
                raise ConfigurationError(f"a step named {step_name!r} is already declared: give one a name=")
            step = Step(f, step_name, retry or DEFAULT_RETRY)
            self._steps[step_name] = step
            return step

        return decorate(fn) if fn is not None else decorate

    def workflow(self, name: str, *, version: str = "1") -> Callable[[Callable[Concatenate[WorkflowContext, P], R]],
                                                                     WorkflowDef[P, R]]:
        """Decorator: ``@wf.workflow("order.fulfil", version="1")``.  The function is called
        ``fn(ctx, **input)``.  Several versions of one name may be declared: a new run starts
        under the last declared; a run is replayed by the version it started under when this
        worker holds it, else by the last (``ctx.patched`` keeps both paths)."""
        checks.task_name(name, error=ConfigurationError)
        if not isinstance(version, str) or not 0 < len(version) <= 64:
            raise ConfigurationError(f"a workflow version is a non-empty string of at most 64 chars, got {version!r}")

        def decorate(fn: Callable[..., Any]) -> WorkflowDef[Any, Any]:
            if not callable(fn):
                raise ConfigurationError(f"@wf.workflow decorates a function, got {fn!r}")
            import inspect
            if inspect.iscoroutinefunction(fn):
                raise ConfigurationError(f"workflow {name!r} is async: workflows are plain functions")
            versions = self._versions.setdefault(name, {})
            if version in versions:
                raise ConfigurationError(f"workflow {name!r} version {version!r} is already declared")
            definition = WorkflowDef(fn, name, version)
            versions[version] = definition
            self._latest[name] = definition
            return definition

        return decorate

    def definition(self, name: str, version: str) -> WorkflowDef[Any, Any] | None:
        """What replays a run of ``name`` started under ``version``: that version, else the
        latest declared; None when the name is unknown here."""
        versions = self._versions.get(name)
        if not versions:
            return None
        return versions.get(version) or self._latest[name]

    def version_of(self, name: str) -> str:
        """The version a new run of ``name`` starts under."""
        return self._get(name).version

    def names(self) -> list[str]:
        return sorted(self._latest)

    def _get(self, workflow: Any) -> WorkflowDef[Any, Any]:
        name = workflow.workflow_name if isinstance(workflow, WorkflowDef) else workflow
        definition = self._latest.get(name) if isinstance(name, str) else None
        if definition is None:
            known = ", ".join(sorted(self._latest)) or "none"
            raise UnknownWorkflowError(f"unknown workflow {name!r}; declared: {known}")
        return definition

    def store_for(self, backend: Any) -> WorkflowStore:
        """The workflow store beside ``backend`` (opened once per backend)."""
        if backend is None:
            raise ConfigurationError("workflows need a result backend (their runs are stored beside its results)")
        store = self._stores.get(backend)
        if store is None:
            store = self._stores[backend] = open_store(backend)
        return store

    # -- producers --------------------------------------------------------------------------
    def start(self, stem: Any, workflow: Any, input: dict[str, Any] | None = None, *,
              run_id: str | None = None) -> str:
        """Start a run of ``workflow`` (a name or a ``@wf.workflow`` function) with ``input``
        (the function's keyword arguments) and return its run id.  Idempotent by ``run_id``:
        a second start with an existing id starts nothing and returns it (an id held by
        another workflow's run raises ``ConfigurationError``).  The run's status is then
        ``stem.get_status(run_id)``; ``stem.wait_for_task(run_id)`` waits for its end."""
        definition, run_id, data = self._start_args(workflow, input, run_id)
        return self._create(stem, _backend_of(stem), definition, run_id, data)

    async def astart(self, stem: Any, workflow: Any, input: dict[str, Any] | None = None, *,
                     run_id: str | None = None) -> str:
        """``start`` for an ``AsyncStem``, awaited: every check runs here, on the loop, with
        ``start``'s errors, before anything is stored; then the run is created, mirrored and
        woken by ``start``'s own code on the producer's executor (``AsyncStem.offload``):
        workflow stores have sync clients only, and the loop's default pool is never used."""
        definition, run_id, data = self._start_args(workflow, input, run_id)
        sync = _sync_of(stem)
        backend = _backend_of(sync)
        return await stem.offload(self._create, sync, backend, definition, run_id, data)

    def _start_args(self, workflow: Any, input: Any, run_id: Any) -> tuple["WorkflowDef[Any, Any]", str, bytes]:
        """``start``'s checks: the definition, the run id (a new one if None), the encoded input."""
        definition = self._get(workflow)
        run_id = uuid.uuid4().hex if run_id is None else check_run_id(run_id)
        data = input_bytes(input, f"the input of workflow {definition.workflow_name!r}")
        check_size(self.limits, f"the input of workflow {definition.workflow_name!r}", data)
        return definition, run_id, data

    def _create(self, stem: Any, backend: Any, definition: "WorkflowDef[Any, Any]", run_id: str, data: bytes) -> str:
        store = self.store_for(backend)
        created, run = store.create(run_id, definition.workflow_name, definition.version, data, now=clock.now())
        if not created and run.name != definition.workflow_name:
            raise ConfigurationError(f"run id {run_id!r} is taken by a run of workflow {run.name!r}")
        if run.status == PENDING:
            mirror(backend, run, self.queue)
            publish_wake(stem, run_id, run.epoch, "start", self.queue)
        return run_id

    def send(self, stem: Any, run_id: str, topic: str, payload: Any = None, *, event_id: str | None = None) -> bool:
        """Send an event to a run's inbox, for its ``ctx.wait(topic)``; returns once it is
        stored (True), or False when the run already had an event with ``event_id`` (a
        retried send: stored once).  Then the run is woken if it is parked.  Raises
        ``RunNotFoundError`` for an unknown run, ``RunFinishedError`` for one that ended."""
        return send_event(stem, self.store_for(_backend_of(stem)), run_id, topic, payload, event_id=event_id,
                          queue=self.queue, limits=self.limits)

    async def asend(self, stem: Any, run_id: str, topic: str, payload: Any = None, *,
                    event_id: str | None = None) -> bool:
        """``send`` for an ``AsyncStem``, awaited: the checks run here, on the loop, with
        ``send``'s errors; the store's send and the wake run on the producer's executor, as
        ``astart``'s do."""
        sync = _sync_of(stem)
        backend = _backend_of(sync)
        event_id, data = _event_args(run_id, topic, payload, event_id, self.limits)
        return await stem.offload(lambda: _stored_event(sync, self.store_for(backend), run_id, topic, event_id,
                                                        data, self.queue))

    def sweeper(self, producer: Any) -> Any:
        """The sweeper a worker of this registry runs (``stem.workflows.sweeper``)."""
        from .sweeper import Sweeper
        return Sweeper(store=self.store_for(producer.backend), producer=producer, queue=self.queue,
                       interval=self.sweep_interval)

    def __getstate__(self) -> dict[str, Any]:
        # a registry pickled for a spawned child or zygote carries this; its stores are the process's own
        return {k: v for k, v in self.__dict__.items() if k != "_stores"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stores=weakref.WeakKeyDictionary())

    def __repr__(self) -> str:
        return f"<Workflows queue={self.queue!r} workflows={self.names()}>"


def _backend_of(stem: Any) -> Any:
    backend = getattr(stem, "backend", None)
    if backend is None:
        raise ConfigurationError("workflows need a producer with a result backend (Stem(broker, backend, ...)): "
                                 "runs are stored beside it and their status is mirrored in it")
    return backend


def _sync_of(stem: Any) -> Any:
    """The sync producer of an ``AsyncStem`` (what ``astart`` and ``asend`` run ``start``'s and
    ``send``'s code with)."""
    from ..aio import AsyncStem
    if not isinstance(stem, AsyncStem):
        raise ConfigurationError(f"astart and asend take an AsyncStem (start and send take a Stem), got {stem!r}")
    return stem.sync


def send_event(stem: Any, store: WorkflowStore, run_id: str, topic: str, payload: Any = None, *,
               event_id: str | None = None, queue: str = "default",
               limits: Limits = Limits(DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_JOURNAL)) -> bool:
    """``Workflows.send`` for callers without the ``Workflows`` (the CLI): the same checks."""
    event_id, data = _event_args(run_id, topic, payload, event_id, limits)
    return _stored_event(stem, store, run_id, topic, event_id, data, queue)


def _event_args(run_id: Any, topic: Any, payload: Any, event_id: Any, limits: Limits) -> tuple[str, bytes]:
    """``send``'s checks: the event id (a new one if None) and the encoded payload."""
    check_run_id(run_id)
    check_topic(topic)
    if event_id is None:
        event_id = uuid.uuid4().hex
    elif not isinstance(event_id, str) or not 0 < len(event_id) <= 200:
        raise ConfigurationError(f"an event id is a non-empty string of at most 200 chars, got {event_id!r}")
    data = encode(payload, f"the payload of event {topic!r}")
    check_size(limits, f"the payload of event {topic!r}", data)
    return event_id, data


def _stored_event(stem: Any, store: WorkflowStore, run_id: str, topic: str, event_id: str, data: bytes,
                  queue: str) -> bool:
    stored, run = store.send(run_id, topic, event_id, data, now=clock.now())
    if run is None:
        raise RunNotFoundError(f"no workflow run {run_id!r}")
    if not stored and run.terminal:
        raise RunFinishedError(f"run {run_id} ended {run.status}: it takes no more events")
    if run.status == PARKED:
        publish_wake(stem, run_id, run.epoch, "inbox", queue)
    return stored
