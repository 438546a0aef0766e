"""``Stem``: the producer side — validate, encode, sign, publish; read results."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, ParamSpec, Sequence, TypeVar

from . import _checks as checks
from .backends import ResultBackend
from .backends.waiting import check_wait
from .backends import from_url as backend_from_url
from .brokers import Broker, Message
from .brokers.base import Keyed
from .brokers import from_url as broker_from_url
from .envelope import Envelope, encode_frame, encode_frames, frame_encoder, xadd_template
from ._checks import DEFAULT_RESULT_EXPIRES
from .errors import (ConfigurationError, DuplicateTaskError, EncodeError, InvalidTaskOptionsError,
                     TaskTimeoutError)
from .handles import TaskHandle, TaskRef
from .ids import new_task_id, new_task_ids
from .keys import id_key, id_ttl, unique_key, unique_ttl
from .limits import LIMIT_FIELDS, has_global_limit, limit_resolver
from .results import TaskState, TaskStatus
from .revocation import store_revocations
from .signals import signals
from .task import DEFAULT_OPTIONS, HANDLER_FILLED, TaskOptions, TaskRegistry

__all__ = ["Stem", "BatchIds", "WaitResult", "ON_DUPLICATE"]

if TYPE_CHECKING:
    from .canvas import CanvasHandle
    from .purging import PurgeReport

EnqueueItem = tuple  # (name, args) | (name, args, options)
P = ParamSpec("P")
R = TypeVar("R")

#: What ``enqueue(on_duplicate=...)`` takes: return the holder's id, or raise DuplicateTaskError.
ON_DUPLICATE = ("return", "raise")


class _Plan(NamedTuple):
    """A checked, framed ``enqueue_many`` batch, not yet published (``Stem._plan_many``)."""
    ids: "BatchIds"                      # in item order; duplicates are filled in by _finish_many
    envs: list[Envelope]                 # [] for a uniform batch (no Envelope per task)
    messages: list[Message]              # publish_many
    keyed: list[Keyed]                   # publish_keyed, one per distinct key
    sent: list[tuple[int, bool]]         # each keyed item's (index, explicit id)
    repeats: list[tuple[int, int]]       # (index, index of the item holding the same key)
    frames: tuple | None                 # publish_frames(*frames): a uniform batch


class BatchIds(list):
    """``enqueue_many``'s ids, in the order of the items.  ``duplicates`` holds the indexes
    of the items that published nothing: their id is that of the task holding their
    unique key (or their explicit id)."""

    duplicates: list[int]

    def __init__(self, ids: Iterable[str] = (), duplicates: Iterable[int] = ()):
        super().__init__(ids)
        self.duplicates = list(duplicates)


class _Unique(NamedTuple):
    key: Any                 # TaskOptions.unique_key
    unique_for: float | None
    until_started: bool


class _Single(NamedTuple):
    """A task name's one-call ``enqueue`` (``Stem._make_single``): valid while the handler,
    the signer and the broker are these."""
    handler: Any
    signer: Any
    broker: Any
    build: Any                 # XaddTemplate.build: (args, now) -> (task_id, command) | None; None: no such path
    send: Any                  # the broker's send(command) -> bool (Broker.single_publisher)


class _Template(NamedTuple):
    """What (name, options) decide of an Envelope, resolved once; unpacked by position."""
    queue: str
    priority: int
    max_retries: int
    expires_at: float | None
    visibility_timeout: float | None
    soft_time_limit: float | None
    hard_time_limit: float | None
    unset: list[str]                 # Envelope.unset_options: [] when the producer knows the handler
    unique: _Unique | None
    result_ttl: float | None         # None: not set (the worker takes its handler's)
    failure_ttl: float | None
    ignore_result: bool | None
    limit: Any = None                # (args, headers) -> Limit (stem.limits), or None: not limited


_ITEM_KEYS = frozenset({"args", "options", "meta", "headers", "countdown", "eta", "task_id"})
_is_str = str.__instancecheck__       # all(map(_is_str, keys)): the str-key check without a Python frame per key
# Message((...)) through tuple.__new__: a NamedTuple's own __new__ is a Python function (~0.2 us a call)
_new_tuple = tuple.__new__


_NONE_UNSET: list[str] = []
_NO_HEADERS: dict[str, str] = {}
_ALL_UNSET = list(HANDLER_FILLED)


@functools.lru_cache(maxsize=256)
def _unset_options(options: TaskOptions) -> list[str]:
    return [f for f in HANDLER_FILLED if getattr(options, f) is None]


def _unset_fields(options: TaskOptions | None) -> list[str]:
    """The handler-filled fields ``options`` leaves unset (shared lists: never mutated)."""
    return _ALL_UNSET if options is None else _unset_options(options)


def _checked_args(name: str, args: Any) -> dict[str, Any]:
    """``args``, or ``{}`` for None; EncodeError unless a dict with str keys."""
    if args is None:
        return {}
    if not isinstance(args, dict) or not all(map(_is_str, args)):
        raise EncodeError(f"args of {name!r} must be a dict with str keys (handlers are called "
                          f"fn(ctx, **args)), got {type(args).__name__}")
    return args


class Stem:
    """The producer.  ``broker`` and ``backend`` take adapters or URLs.

    ``backend=None`` makes a fire-and-forget producer (``get_status`` and
    ``wait_for_task`` then raise ``ConfigurationError``).  With a ``registry``
    every name is checked before anything is published; without one, any
    well-formed name is accepted (producers that do not import the handlers).
    """

    def __init__(self, broker: Broker | str, backend: ResultBackend | str | None = None,
                 registry: TaskRegistry | None = None, signer: Any = None, *,
                 default_queue: str = "default"):
        self.broker = broker_from_url(broker) if isinstance(broker, str) else broker
        if not isinstance(self.broker, Broker):
            raise ConfigurationError(f"broker must be a Broker or a URL, got {broker!r}")
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        if self.backend is not None and not isinstance(self.backend, ResultBackend):
            raise ConfigurationError(f"backend must be a ResultBackend, a URL or None, got {backend!r}")
        if registry is not None and not isinstance(registry, TaskRegistry):
            raise ConfigurationError(f"registry must be a TaskRegistry, got {registry!r}")
        self.registry = registry
        self.signer = signer
        self.defaults = TaskOptions(queue=default_queue).merged(DEFAULT_OPTIONS)
        self._resolved: dict[tuple, TaskOptions] = {}
        #: name -> (its handler or None, its _Template without options, its expires): ``_template``
        self._named: dict[str, tuple[Any, _Template, float | None]] = {}
        #: name -> _Single (``enqueue``'s one-call path for it, or the note that there is none)
        self._singles: dict[str, _Single] = {}

    @classmethod
    def from_config(cls, config, registry: TaskRegistry | None = None) -> "Stem":
        from .signing import PayloadSigner
        backend = config.backend() if (config.result_backend_url or config.broker_url) else None
        return cls(config.broker(), backend, registry, PayloadSigner.maybe(config),
                   default_queue=config.default_queue)

    # -- building -----------------------------------------------------------------
    def _resolve(self, name: str, options: TaskOptions | None) -> tuple[TaskOptions, Any]:
        """enqueue options > handler options > defaults, merged once per (name, options):
        each merge builds (and validates) a new TaskOptions, which is most of a producer's
        per-task cost when done for every task of a batch.  With the handler (or None)."""
        handler = self.registry.get(name) if self.registry is not None else None
        key = (name, options, None if handler is None else id(handler))
        opts = self._resolved.get(key)
        if opts is None:
            # checked here, once per (name, options) this producer meets: a name a worker's
            # registry could never hold would only be dead-lettered later
            checks.task_name(name, error=InvalidTaskOptionsError)
            opts = (options or TaskOptions()).merged(None if handler is None else handler.options)
            opts = opts.merged(self.defaults)
            if len(self._resolved) >= 1024:
                self._resolved.clear()
            self._resolved[key] = opts
        return opts, handler

    def _template(self, name: str, options: TaskOptions | None, now: float) -> _Template:
        """Check ``name`` and ``options`` and resolve them into the Envelope fields they
        decide at ``now``.  ``enqueue_many`` keeps one per (name, options) for the batch,
        so the checks, the registry lookup and the merge run once per distinct pair, not
        once per task; a name enqueued without options keeps its template in this producer
        for the single ``enqueue`` (while its handler is the same)."""
        if options is None:
            hit = self._named.get(name) if type(name) is str else None
            if hit is not None and (self.registry is None or self.registry.get(name) is hit[0]):
                template, expires = hit[1], hit[2]
                return template if expires is None else template._replace(expires_at=now + expires)
        if not isinstance(name, str) or not name:
            raise InvalidTaskOptionsError(f"task name must be a non-empty string, got {name!r}")
        if options is not None and not isinstance(options, TaskOptions):
            raise InvalidTaskOptionsError(f"options must be a TaskOptions, got {options!r}")
        if options is not None and (options.autoretry_for is not None or options.retry_backoff is not None
                                    or options.redact is not None):
            raise InvalidTaskOptionsError(
                f"task {name!r}: autoretry_for, retry_backoff and redact are options of the handler "
                "(@registry.task(..., options=TaskOptions(...))), not of one enqueue")
        if options is not None and options.rate_scope == "worker":
            # a per-worker bucket is read from the worker's handler: one message cannot carry it
            raise InvalidTaskOptionsError(
                f"task {name!r}: rate_scope='worker' is an option of the handler "
                "(@registry.task(..., options=TaskOptions(rate_limit=..., rate_scope='worker'))); "
                "an enqueue's rate_limit is global (it travels with the message)")
        opts, handler = self._resolve(name, options)
        if options is not None and options.rate_limit is not None and opts.rate_scope == "worker":
            raise InvalidTaskOptionsError(
                f"task {name!r}: its handler's rate limit is per worker (rate_scope='worker'), which the "
                "worker reads from the handler; an enqueue's rate_limit would be ignored")
        unique = (_Unique(opts.unique_key, opts.unique_for, opts.unique_until == "started")
                  if opts.unique else None)
        # Without the registry the handler's options are unknown here: what the caller did not
        # set travels as unset, and the worker that runs the handler fills it in.
        unset = _NONE_UNSET if self.registry is not None else _unset_fields(options)
        template = _Template(opts.queue, opts.priority, opts.max_retries,
                             None if opts.expires is None else now + opts.expires,
                             opts.visibility_timeout, opts.soft_time_limit, opts.hard_time_limit, unset, unique,
                             opts.result_ttl, opts.failure_ttl, opts.ignore_result,
                             limit_resolver(name, opts) if has_global_limit(opts) else None)
        if options is None:
            if len(self._named) >= 1024:
                self._named.clear()
            self._named[name] = (handler, template, opts.expires)
        return template

    def _build(self, name: str, args: dict[str, Any] | None, options: TaskOptions | None,
               meta: dict[str, Any] | None, headers: dict[str, str] | None, countdown: float | None,
               eta: float | None, task_id: str | None, parent: Any, now: float,
               template: _Template | None = None, explicit_id: bool | None = None,
               idempotent_for: float | None = None, canvas: dict | None = None) -> tuple[Envelope, Message, Keyed | None]:
        """Validate one task (everything ``enqueue`` accepts) and frame it, with the key to
        publish it under (a unique task, an explicit id) or None.  ``template``, when
        given, is ``_template(name, options, now)`` already made by the caller; ``explicit_id``
        says whether ``task_id`` is the caller's (an idempotency key) or made for the batch
        (default: whether ``task_id`` was given)."""
        (queue, priority, max_retries, expires_at, visibility_timeout, soft, hard, unset, unique,
         result_ttl, failure_ttl, ignore_result, limit_of) = (self._template(name, options, now) if template is None
                                                              else template)
        args = _checked_args(name, args)
        if meta is not None and not isinstance(meta, dict):
            raise EncodeError(f"meta must be a dict, got {type(meta).__name__}")
        if headers is not None and (not isinstance(headers, dict) or
                                    not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise EncodeError("headers must be a dict of str to str")
        not_before = None
        if countdown is not None and eta is not None:
            raise InvalidTaskOptionsError("give countdown or eta, not both")
        if countdown is not None:
            not_before = now + checks.seconds("countdown", countdown, inclusive=True, error=InvalidTaskOptionsError)
        elif eta is not None:
            if not checks.is_number(eta):
                raise InvalidTaskOptionsError(f"eta must be finite epoch seconds (float), got {eta!r}")
            not_before = float(eta)
        if explicit_id is None:
            explicit_id = task_id is not None
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not 0 < len(task_id) <= 200:
            raise InvalidTaskOptionsError(f"task_id must be a non-empty string of at most 200 chars, got {task_id!r}")
        delay = 0.0 if not_before is None else not_before - now
        if unique is not None:
            key: str | None = unique_key(name, queue, args, unique.key)
            ttl, linger = unique_ttl(unique.unique_for, delay), 0.0
        elif explicit_id:
            key, ttl = id_key(task_id), id_ttl(delay)
            # the id stays refused as long as its result lives
            linger = (idempotent_for if idempotent_for is not None else result_ttl if result_ttl is not None else
                      DEFAULT_RESULT_EXPIRES if self.backend is None else self.backend.result_expires)
        else:
            key = None
        # positional: Envelope's field order is its wire format and never changes
        env = Envelope(task_id, name, args, headers or {}, meta or {}, queue, priority, 0, max_retries, now,
                       not_before, expires_at, visibility_timeout, soft, hard,
                       None if parent is None else parent.id, None if parent is None else parent.root_id, unset,
                       "started" if unique is not None and unique.until_started else None,
                       result_ttl, failure_ttl, ignore_result, canvas)
        if signals.before_task_publish.receivers:
            signals.before_task_publish.send(self, envelope=env)
        limit = None if limit_of is None else limit_of(args, env.headers)
        frame = encode_frame(env, self.signer)
        message = _new_tuple(Message, (task_id, queue, frame, priority, not_before, visibility_timeout, limit))
        return env, message, None if key is None else Keyed(message, key, ttl, linger)

    # -- publishing ---------------------------------------------------------------
    def enqueue(self, name: str, args: dict[str, Any] | None = None, *, options: TaskOptions | None = None,
                meta: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                countdown: float | None = None, eta: float | None = None, task_id: str | None = None,
                parent: Any = None, on_duplicate: str = "return", idempotent_for: float | None = None) -> str:
        """Publish one task and return its id.  Everything is validated first:
        a bad name, bad args or bad options raise before anything is published.

        A unique task (``TaskOptions(unique=True)``) or one with an explicit ``task_id`` is
        published only if its key is free; a duplicate publishes nothing and returns the id
        of the task that holds the key, or raises ``DuplicateTaskError`` (carrying that id)
        with ``on_duplicate="raise"``.  An explicit id stays refused ``idempotent_for`` seconds
        after its task ends (default: as long as its result lives: the task's ``result_ttl``
        when this producer knows it, from ``options`` or the registry's handler, else the
        backend's ``result_expires``)."""
        plain = (type(name) is str and options is None and meta is None and headers is None and countdown is None
                 and eta is None and task_id is None and parent is None and idempotent_for is None)
        if plain:
            single = self._singles.get(name)
            if single is not None:
                handler, signer, broker, build, send = single
                if (build is not None and signer is self.signer and broker is self.broker
                        and (self.registry is None or self.registry.get(name) is handler)
                        and not (signals.before_task_publish.receivers or signals.after_task_publish.receivers)
                        and (on_duplicate == "return" or on_duplicate == "raise")):
                    built = build(args, time.time())
                    if built is not None:
                        if send(built[1]):
                            return built[0]
                        self._singles.pop(name, None)   # stale (a deleted queue): made anew below
        env, message, keyed = self._prepare_one(name, args, options, meta, headers, countdown, eta, task_id,
                                                parent, on_duplicate, idempotent_for)
        task = self._publish_one(env, message, keyed, task_id is not None, on_duplicate == "raise")
        if plain and keyed is None and message.limit is None:
            self._make_single(name, env)
        return task

    def _make_single(self, name: str, env: Envelope) -> None:
        """After ``env`` (a task ``name`` published by ``enqueue`` without options or extras)
        went through the general path: give ``name`` the one-call path (``_Single``) when
        the broker offers one (``Broker.single_publisher``), so the next such ``enqueue``
        builds its whole command in one compiled call and sends it at once.  That path is
        exactly this one's cached case: the name's template (``_template``), no keyword
        but ``on_duplicate``, no publish signal receivers, the same signer, broker and
        handler (checked on every call)."""
        hit = self._named.get(name)
        if hit is None:
            return
        handler, template, expires = hit
        single = self._singles.get(name)
        if single is not None and single.handler is handler and single.signer is self.signer and \
                single.broker is self.broker:
            return
        (queue, priority, max_retries, _, visibility_timeout, soft, hard, unset, unique, result_ttl, failure_ttl,
         ignore_result, limit_of) = template
        # without one (another broker, a priority out of range...): a _Single without build,
        # so the next calls do not ask again while the handler, signer and broker are these
        made = _Single(handler, self.signer, self.broker, None, None)
        sender = (self.broker.single_publisher(queue, priority, visibility_timeout)
                  if unique is None and limit_of is None and env.queue == queue else None)
        if sender is not None:
            head, tail, send = sender
            shared = Envelope("", name, {}, {}, {}, queue, priority, 0, max_retries, 0.0, None, None,
                              visibility_timeout, soft, hard, None, None, unset, None, result_ttl, failure_ttl,
                              ignore_result)
            made = made._replace(build=xadd_template(shared, self.signer, head, tail, expires).build, send=send)
        if len(self._singles) >= 1024:
            self._singles.clear()
        self._singles[name] = made

    def _prepare_one(self, name: str, args: Any, options: Any, meta: Any, headers: Any, countdown: Any, eta: Any,
                     task_id: Any, parent: Any, on_duplicate: Any,
                     idempotent_for: Any) -> tuple[Envelope, Message, Keyed | None]:
        """Everything ``enqueue`` does before the broker: its checks and ``_build`` (the
        envelope, its signed frame, its key).  ``AsyncStem`` calls it too, so both producers
        accept and refuse the same calls with the same errors."""
        if on_duplicate not in ON_DUPLICATE:
            raise InvalidTaskOptionsError(f"on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
        if idempotent_for is not None:
            checks.seconds("idempotent_for", idempotent_for, inclusive=True, error=InvalidTaskOptionsError)
            if task_id is None:
                raise InvalidTaskOptionsError("idempotent_for needs an explicit task_id")
        return self._build(name, args, options, meta, headers, countdown, eta, task_id, parent,
                           time.time(), idempotent_for=idempotent_for)

    def call(self, handle: TaskHandle[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskRef[R]:
        """Publish a call of a typed handle (what ``@registry.task`` returns) and return its
        ``TaskRef``: ``stem.call(send, "a@b", subject="hi")``.  Positional arguments go
        under the function's parameter names; a name or a count the function could not
        take raises ``InvalidTaskOptionsError`` before anything is published.  Enqueue
        options come from the handle (``send.with_options(countdown=5)``), never from
        keywords here, which all belong to the task."""
        args_dict = handle_arguments(handle, args, kwargs)
        enqueue_options = handle.enqueue_options
        if self.registry is None or handle.name not in self.registry:
            enqueue_options = with_handler_limits(handle, enqueue_options)
        return TaskRef(self, self.enqueue(handle.name, args_dict, **enqueue_options), handle.name)

    def enqueue_child(self, name: str, args: dict[str, Any] | None, *, options: TaskOptions | None,
                      task_id: str, parent: Any) -> str:
        """Publish what a running task enqueued (``ctx.enqueue`` in a worker's child).  The
        child made ``task_id`` itself, to answer the task at once, so it is not an
        idempotency key the way a caller's ``task_id`` is.  A unique task still goes under
        its unique key; if that is held, nothing is published and the holder's id is
        returned (the id the child answered never runs)."""
        env, message, keyed = self._build(name, args, options, None, None, None, None, task_id, parent,
                                          time.time(), explicit_id=False)
        return self._publish_one(env, message, keyed, False, False)

    def _publish_one(self, env: Envelope, message: Message, keyed: Keyed | None, explicit_id: bool,
                     raise_duplicate: bool) -> str:
        """Publish one built task (under its key, if it has one); its id, or the holder's."""
        if keyed is None:
            self.broker.publish(message)
            holder = None
        else:
            holder = self.broker.publish_keyed((keyed,))[0]
        return self._published_one(env, keyed, holder, explicit_id, raise_duplicate)

    def _published_one(self, env: Envelope, keyed: Keyed | None, holder: str | None, explicit_id: bool,
                       raise_duplicate: bool) -> str:
        """What ``enqueue`` answers once the broker answered ``holder`` (``publish_keyed``'s
        reply; None for a plain publish): the id, the holder's, or ``DuplicateTaskError``."""
        if keyed is not None and _is_duplicate(holder, env.id, explicit_id):
            if raise_duplicate:
                raise DuplicateTaskError(f"task {env.name!r} was not published: task {holder} holds its "
                                         f"{'id' if keyed.key.startswith('id:') else 'unique key'}", holder)
            return holder  # type: ignore[return-value]
        if signals.after_task_publish.receivers:
            signals.after_task_publish.send(self, envelope=env)
        return env.id

    def enqueue_many(self, items: Iterable[EnqueueItem | dict[str, Any]]) -> BatchIds:
        """Publish a batch in one broker round trip.  Items are ``(name, args)``,
        ``(name, args, options)`` or dicts of ``enqueue`` keyword arguments.
        All items are validated before any is published.

        Unique items and items with an explicit ``task_id`` are published under their keys,
        in one more round trip per queue, duplicates inside the batch included: the ids
        come back in order, a duplicate's being its holder's, and ``.duplicates`` lists the
        indexes of the items that published nothing.

        This is the producer's hot loop (its per-task CPU bounds a producer's
        rate), so tuple items take an inlined copy of ``_build`` that skips what
        a tuple cannot carry (meta, headers, countdown, eta, task_id): one
        ``_template`` per distinct (name, options) in the batch, ids from one
        ``new_task_ids`` call, the Envelope built by position.  It checks the
        same things in the same order and raises the same errors as ``_build``."""
        plan = self._plan_many(items)
        if plan.frames is not None:
            queue, ids, frames, priority, vt = plan.frames
            self.broker.publish_frames(queue, ids, frames, priority=priority, visibility_timeout=vt)
        if plan.messages:
            self.broker.publish_many(plan.messages)
        return self._finish_many(plan, self.broker.publish_keyed(plan.keyed) if plan.keyed else [])

    def _plan_many(self, items: Iterable[EnqueueItem | dict[str, Any]]) -> "_Plan":
        """Everything ``enqueue_many`` does before the broker: every item checked and framed,
        nothing published.  ``AsyncStem`` publishes the same plan."""
        if not isinstance(items, (list, tuple)):
            items = list(items)
        now = time.time()
        if items and not (signals.before_task_publish.receivers or signals.after_task_publish.receivers):
            uniform = self._uniform_frames(items, now)
            if uniform is not None:
                return _Plan(BatchIds(uniform[1]), [], [], [], [], [], uniform)
        ids = new_task_ids(len(items))
        templates: dict[Any, _Template] = {}   # name, or (name, options), -> _Template
        encode = frame_encoder(self.signer)
        before = signals.before_task_publish
        envs: list[Envelope] = []
        messages: list[Message] = []
        add_env, add_message = envs.append, messages.append
        keyed: list[tuple[int, Keyed, bool]] = []     # (index, item, explicit id)
        for item, task_id in zip(items, ids):
            if type(item) is tuple and (len(item) == 2 or len(item) == 3):
                if len(item) == 2:
                    name, args = item
                    options = None
                else:
                    name, args, options = item
                template = self._batch_template(templates, name, options, now)
                (queue, priority, max_retries, expires_at, visibility_timeout, soft, hard, unset, unique,
                 result_ttl, failure_ttl, ignore_result, limit_of) = template
                if unique is not None:
                    env, m, k = self._build(name, args, options, None, None, None, None, task_id, None, now,
                                            template, explicit_id=False)
                    keyed.append((len(envs), k, False))
                    add_env(env)
                    continue
                if args is None:
                    args = {}
                elif type(args) is not dict or (args and not all(map(_is_str, args))):
                    args = _checked_args(name, args)
                env = Envelope(task_id, name, args, {}, {}, queue, priority, 0, max_retries, now, None,
                               expires_at, visibility_timeout, soft, hard, None, None, unset, None,
                               result_ttl, failure_ttl, ignore_result)
                if before.receivers:
                    before.send(self, envelope=env)
                add_env(env)
                add_message(_new_tuple(Message, (task_id, queue, encode(env), priority, None, visibility_timeout,
                                                 None if limit_of is None else limit_of(args, _NO_HEADERS))))
                continue
            if isinstance(item, dict):
                kw = dict(item)
                try:
                    name = kw.pop("name")
                except KeyError:
                    raise InvalidTaskOptionsError(f"enqueue_many item {item!r} has no 'name'") from None
                unknown = set(kw) - _ITEM_KEYS
                if unknown:
                    raise InvalidTaskOptionsError(f"enqueue_many item has unknown keys {sorted(unknown)}")
                options, given_id = kw.get("options"), kw.get("task_id")
                env, m, k = self._build(name, kw.get("args"), options, kw.get("meta"), kw.get("headers"),
                                        kw.get("countdown"), kw.get("eta"),
                                        task_id if given_id is None else given_id,
                                        None, now, self._batch_template(templates, name, options, now),
                                        explicit_id=given_id is not None)
                explicit = given_id is not None
            elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
                options = item[2] if len(item) == 3 else None
                env, m, k = self._build(item[0], item[1], options, None, None, None, None, task_id, None, now,
                                        self._batch_template(templates, item[0], options, now), explicit_id=False)
                explicit = False
            else:
                raise InvalidTaskOptionsError(
                    f"enqueue_many items are (name, args), (name, args, options) or dicts; got {item!r}")
            if k is not None:
                keyed.append((len(envs), k, explicit))
            else:
                add_message(m)
            add_env(env)
        # A key twice in the batch: only its first item goes to the broker (which would
        # answer the others with the first's id anyway); no frame is sent for nothing.
        first: dict[tuple[str, str], int] = {}
        sent: list[tuple[int, Keyed, bool]] = []
        repeats: list[tuple[int, int]] = []            # (index, index of the key's first item)
        for entry in keyed:
            index, k, _ = entry
            seen = first.setdefault((k.message.queue, k.key), index)
            if seen == index:
                sent.append(entry)
            else:
                repeats.append((index, seen))
        return _Plan(BatchIds(e.id for e in envs), envs, messages, [k for _, k, _ in sent],
                     [(index, explicit) for index, _, explicit in sent], repeats, None)

    def _finish_many(self, plan: "_Plan", holders: Sequence[str | None]) -> BatchIds:
        """``enqueue_many``'s answer once the broker stored ``plan`` and answered its keyed
        items with ``holders`` (``publish_keyed``'s reply)."""
        ids = plan.ids
        for (index, explicit), holder in zip(plan.sent, holders):
            if _is_duplicate(holder, ids[index], explicit):
                ids[index] = holder  # type: ignore[assignment]
                ids.duplicates.append(index)
        for index, seen in plan.repeats:
            ids[index] = ids[seen]
            ids.duplicates.append(index)
        if plan.repeats:
            ids.duplicates.sort()
        if signals.after_task_publish.receivers:
            skip = set(ids.duplicates)
            for i, env in enumerate(plan.envs):
                if i not in skip:
                    signals.after_task_publish.send(self, envelope=env)
        return ids

    def _uniform_frames(self, items: list | tuple, now: float) -> tuple | None:
        """The batch as the arguments of one ``publish_frames`` call (queue, ids, frames,
        priority, visibility timeout) when every item is a tuple of the same
        shape, task name and options (the common batch: one task over many args), or
        None to take the general path.  No Envelope or Message per task: the frames are
        spliced by ``encode_frames``.  Whatever the general path would reject (args not a
        dict with str keys, values msgpack cannot carry) makes this return None before
        anything is published, and the general path raises its usual error."""
        first = items[0]
        if type(first) is not tuple or not 2 <= len(first) <= 3:
            return None
        shape, name = len(first), first[0]
        options = first[2] if shape == 3 else None
        args_list = []
        add = args_list.append
        for item in items:
            if type(item) is not tuple or len(item) != shape:
                return None
            n = item[0]
            if (n is not name and (type(n) is not str or n != name)) or (shape == 3 and item[2] is not options):
                return None
            args = item[1]
            if type(args) is not dict:
                if args is not None:
                    return None
                args = {}
            add(args)
        return self._named_frames(name, options, args_list, now)

    def _named_frames(self, name: str, options: TaskOptions | None, args_list: list[dict[str, Any]],
                      now: float) -> tuple | None:
        """Tasks of one ``name`` and ``options``, one per dict of ``args_list``, framed in one
        ``encode_frames`` call: (queue, ids, frames, priority, visibility timeout), or None
        when they need the general path (a unique key, a limit, an args dict that cannot be
        encoded: ``_build`` then raises its usual error for it).  Raises what ``_template``
        raises for the name and options.  ``enqueue_many``'s uniform batches and
        ``AsyncStem``'s coalesced single enqueues both take it.  The caller checks that no
        publish signal has receivers (nothing here builds an ``Envelope`` per task)."""
        (queue, priority, max_retries, expires_at, visibility_timeout, soft, hard, unset, unique,
         result_ttl, failure_ttl, ignore_result, limit_of) = self._template(name, options, now)
        if unique is not None or limit_of is not None:
            return None                       # keyed or limited: the general path publishes it
        env = Envelope("", name, {}, {}, {}, queue, priority, 0, max_retries, now, None, expires_at,
                       visibility_timeout, soft, hard, None, None, unset, None, result_ttl, failure_ttl, ignore_result)
        ids = new_task_ids(len(args_list))
        try:
            frames = encode_frames(env, ids, args_list, self.signer)
        except EncodeError:
            return None
        return queue, ids, frames, priority, visibility_timeout

    def _batch_template(self, templates: dict[Any, _Template], name: Any, options: Any, now: float) -> _Template:
        """``_template`` through the batch's cache.  Only a str name with None or a
        TaskOptions makes a key; anything else goes straight to ``_template``, which
        raises the error it always raised (and nothing unhashable reaches the dict)."""
        if options is None:
            key: Any = name
        elif isinstance(name, str) and isinstance(options, TaskOptions):
            key = (name, options)
        else:
            return self._template(name, options, now)
        try:
            return templates[key]
        except (KeyError, TypeError):
            template = self._template(name, options, now)
        templates[key] = template
        return template

    # -- canvases (stem.canvas) ----------------------------------------------------------
    def apply(self, canvas: Any, *, creation_timeout: float = 600.0, canvas_id: str | None = None) -> "CanvasHandle":
        """Start a canvas (a ``Signature``, ``chain``, ``group``, ``chord`` or ``chunks`` of
        ``stem.canvas``) and return its handle: ``.id`` (usable from any process through
        ``canvas_handle``), ``.wait(timeout)``, ``.results()``, ``.progress()``.  A group left
        unsealed ``creation_timeout`` seconds (this producer died while publishing its
        members) ends FAILED ``creation-interrupted``.  ``canvas_id`` (default: a new one)
        makes the call idempotent: applying the same id again starts nothing twice."""
        from .canvas import apply
        return apply(self, canvas, creation_timeout=creation_timeout, canvas_id=canvas_id)

    def canvas_handle(self, canvas_id: str) -> "CanvasHandle":
        """The handle of a canvas started anywhere, by its id."""
        from .canvas import CanvasHandle
        return CanvasHandle.from_id(self, canvas_id)

    def _publish_node(self, name: str, args: dict[str, Any] | None, options: TaskOptions | None, task_id: str,
                      canvas: dict | None, keyed: bool, line: Any = None) -> None:
        """One task of a canvas under ``task_id``; ``keyed``: under its id key, so publishing
        it again (a redelivered chain step, a second last member) publishes nothing.
        ``line``: its parent and root (``stem.canvas.Lineage``)."""
        env, message, key = self._build(name, args, options, None, None, None, None, task_id, line, time.time(),
                                        explicit_id=keyed, canvas=canvas)
        if keyed and key is not None:
            self.broker.publish_keyed([key])
        else:
            self.broker.publish(message)
        if signals.after_task_publish.receivers:
            signals.after_task_publish.send(self, envelope=env)

    def _publish_messages(self, name: str, options: TaskOptions | None, ids: list[str], args_list: list[dict],
                          canvas: dict, line: Any = None) -> None:
        """A group's members of one task name and options that ``_member_frames`` does not
        batch: each its own ``Message`` (its key, its limit from its args), one publish;
        ``line``: their parent and root (``stem.canvas.Lineage``)."""
        now = time.time()
        messages = [self._build(name, a, options, None, None, None, None, i, line, now, explicit_id=False,
                                canvas=canvas)[1] for i, a in zip(ids, args_list)]
        self.broker.publish_many(messages)

    def _member_frames(self, name: str, options: TaskOptions | None, ids: list[str], args_list: list[dict],
                       canvas: dict, line: Any = None) -> tuple[str, list[bytes], int, float | None] | None:
        """A group's members of one task name and options on ``enqueue_many``'s fast path: the
        envelope (canvas place included: members differ only in id and args) is encoded once
        and the frames are spliced; (queue, frames, priority, visibility timeout).  None when
        each member needs its own ``Message`` (publish signals, a unique key, a limit from
        its args)."""
        now = time.time()
        (queue, priority, max_retries, expires_at, visibility_timeout, soft, hard, unset, unique,
         result_ttl, failure_ttl, ignore_result, limit) = self._template(name, options, now)
        if (signals.before_task_publish.receivers or signals.after_task_publish.receivers or unique is not None
                or limit is not None):
            return None
        env = Envelope("", name, {}, {}, {}, queue, priority, 0, max_retries, now, None, expires_at,
                       visibility_timeout, soft, hard, None if line is None else line.id,
                       None if line is None else line.root_id, unset, None, result_ttl, failure_ttl, ignore_result,
                       canvas)
        for a in args_list:
            _checked_args(name, a)
        return queue, encode_frames(env, ids, args_list, self.signer), priority, visibility_timeout

    # -- results ------------------------------------------------------------------
    def _require_backend(self) -> ResultBackend:
        if self.backend is None:
            raise ConfigurationError("this Stem has no result backend (backend=None is fire-and-forget)")
        return self.backend

    def get_status(self, task_id: str) -> TaskStatus:
        """The latest status; PENDING when the backend knows nothing (yet) about the id."""
        status = self._require_backend().get(task_id)
        return status if status is not None else TaskStatus(id=task_id, state=TaskState.PENDING)

    def wait_for_task(self, task_id: str, timeout: float = 30.0) -> TaskStatus:
        """Block until the task is SUCCEEDED, FAILED, REVOKED or DEAD and return its
        status; raise ``TaskTimeoutError`` after ``timeout`` seconds.  Works from any
        process that can reach the backend."""
        timeout = checks.seconds("timeout", timeout, inclusive=True, error=InvalidTaskOptionsError)
        status = self._require_backend().wait(task_id, timeout)
        if status is None or not status.is_terminal:
            state = "unknown" if status is None else status.state.value
            raise TaskTimeoutError(f"task {task_id} did not finish within {timeout}s (state: {state})")
        return status

    def wait_many(self, task_ids: Iterable[str], timeout: float = 30.0, return_when: str = "ALL") -> WaitResult:
        """Wait on many tasks at once: until every one is terminal (``"ALL"``), one is
        (``"FIRST_COMPLETED"``), one FAILED, DEAD or REVOKED (``"FIRST_EXCEPTION"``; or all are
        terminal), or ``timeout`` seconds pass.  Returns ``WaitResult(done, pending)``: the
        terminal statuses found by id, and the other ids in input order; never raises on the
        timeout.  Any number of waits share the backend's connections (one pub/sub listener
        on Redis, one LISTEN on Postgres).  Bad arguments raise ``InvalidTaskOptionsError``."""
        ids, timeout, return_when = check_wait(task_ids, timeout, return_when, error=InvalidTaskOptionsError)
        done = self._require_backend().wait_many(ids, timeout, return_when)
        return WaitResult(done, [i for i in ids if i not in done])

    def as_completed(self, task_ids: Iterable[str], timeout: float = 30.0) -> Iterator[TaskStatus]:
        """Yield each task's terminal status as it finishes (those already finished first),
        each id once; raise ``TaskTimeoutError`` naming the ids still pending when ``timeout``
        seconds (from this call) pass first.  Arguments are checked here, not at the first
        ``next``."""
        ids, timeout, _ = check_wait(task_ids, timeout, error=InvalidTaskOptionsError)
        return _as_completed(self._require_backend().watch(ids, timeout), ids, timeout)

    def revoke(self, task_ids: str | Sequence[str], expires: float | None = None) -> None:
        """Persistently mark tasks as revoked: a worker skips them (now or when it starts later).
        With a signer, each revocation carries a signed proof (``stem.revocation``), without
        which workers that verify ignore it; a verify-only signer cannot revoke."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        store_revocations(self._require_backend(), ids, expires, self.signer)

    def purge(self, queue: str, *, batch: int = 1000) -> "PurgeReport":
        """Delete every waiting (ready, delayed, throttled) task of ``queue`` and end each
        REVOKED, reason ``purged``: waiters wake, groups and chords count them
        (``stem.purging``).  Needs the result backend; running tasks are not touched.
        Safe to run again after a crash: it finishes what an interrupted purge held."""
        from .purging import purge_queue
        return purge_queue(self, queue, batch=batch)

    def close(self) -> None:
        self.broker.close()
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> "Stem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def handle_arguments(handle: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(handle, TaskHandle):
        raise InvalidTaskOptionsError(
            f"call() takes a task handle (what @registry.task returns), got {handle!r}; "
            "a task known by name is published with enqueue(name, args)")
    return handle.arguments(args, kwargs)


def with_handler_limits(handle: Any, enqueue_options: Any) -> Any:
    """A typed handle knows its handler's options even when the producer's registry does not:
    its limits travel with the call (the rest stays the worker's to fill)."""
    limits = _limit_options(handle.handler.options)
    if limits is None:
        return enqueue_options
    given = enqueue_options.get("options")
    return {**enqueue_options, "options": limits if given is None else given.merged(limits)}


@functools.lru_cache(maxsize=256)
def _limit_options(options: TaskOptions) -> TaskOptions | None:
    """The limit fields of a handler's ``options`` alone, or None when it has no global limit."""
    if not has_global_limit(options):
        return None
    fields = LIMIT_FIELDS if options.rate_scope != "worker" else ("concurrency_limit", "concurrency_key")
    return TaskOptions(**{f: getattr(options, f) for f in fields if getattr(options, f) is not None})


def _is_duplicate(holder: str | None, own_id: str, explicit_id: bool) -> bool:
    """Whether ``publish_keyed``'s answer means "not published".  Its own id answers a
    publish whose key it already held: a generated id is never reused, so that is a retry
    of this very publish (published once); an explicit id holding its own key is a task
    enqueued earlier under that id, and this enqueue is its duplicate."""
    return holder is not None and (holder != own_id or explicit_id)


class WaitResult(NamedTuple):
    """What ``Stem.wait_many`` returns."""

    #: The terminal statuses found, by task id (in the order they were found).
    done: dict[str, TaskStatus]
    #: The ids without a terminal status when the wait ended, in input order.
    pending: list[str]


def _as_completed(statuses: Iterator[TaskStatus], ids: list[str], timeout: float) -> Iterator[TaskStatus]:
    pending = dict.fromkeys(ids)
    for status in statuses:
        pending.pop(status.id, None)
        yield status
    if pending:
        raise as_completed_timeout(pending, ids, timeout)


def as_completed_timeout(pending: dict[str, Any], ids: list[str], timeout: float) -> TaskTimeoutError:
    """``as_completed``'s error (sync and async) naming the ids still ``pending``."""
    shown = list(pending)[:10]
    more = f" and {len(pending) - len(shown)} more" if len(pending) > len(shown) else ""
    return TaskTimeoutError(f"{len(pending)} of {len(ids)} tasks did not finish within {timeout}s: "
                            f"{', '.join(shown)}{more}", pending=list(pending))
