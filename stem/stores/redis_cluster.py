"""Redis Cluster: ``redis+cluster://`` URLs, and stem's raw pipelines routed by hash slot.

A Cluster URL names one or more nodes to learn the cluster from (any node will
do; the others are found with ``CLUSTER SLOTS``)::

    redis+cluster://[[user]:password@]host:port[,host:port...]/[0]
    rediss+cluster://...      (TLS to every node)

A cluster has one database: a path other than ``/`` or ``/0`` is refused.

The client is redis-py's ``RedisCluster`` (its slot map, MOVED handling and
per-node pools serve stem's ordinary commands), made as ``StemCluster``, which
adds what ``stem.stores.redis_pipe`` needs: ``stem_execute`` runs a packed
pipeline (the broker's XADD batches, the settle pipeline, ``RedisStore.run``)
by slot.  Each command goes to the primary that owns the slot of its key (its
first key for EVALSHA); the commands of one node keep their order and go in
one write, every node's at once, and the replies are put back in the
pipeline's order.  Replies that redirect are followed: MOVED updates the slot
map (``nodes_manager.move_slot``) and the command is sent again to the new
owner, ASK sends it once to the named node behind ``ASKING``, TRYAGAIN (a slot
half moved) sends it again after a short wait.  Only the redirected commands
are sent again, never the whole pipeline.

Phases.  Within one node, Redis runs a connection's commands in order; across
nodes nothing orders them.  A pipeline whose order matters across slots (the
settle path: the results, then the acks) puts ``BARRIER`` between the parts:
the commands after it are sent only once every command before it has
answered, and not at all when one of those answered an error (they answer
``STEMSKIPPED`` then).  ``BARRIER`` is for cluster pipelines only
(``RedisStore.cluster``): a single Redis would refuse it as an unknown command.

A connection error or timeout on a node asks for a fresh slot map, which the
next call (``RedisStore.call`` retries it with backoff) loads first.

Blocking reads cannot span slots either: ``stem_block_any`` sends one blocking
command per slot at once, each on a connection of its own, and returns on the
first answer (the broker's wait for new entries on several queues).
"""

from __future__ import annotations

import random
import select
import time
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import redis
import redis.exceptions
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from .. import _native
from ..errors import ConfigurationError
from ..redact import mask_url
from .redis_pipe import pack_commands, read_replies
from .redis_urls import AddressError, parse_addresses, split_authority

__all__ = ["BARRIER", "CLUSTER_SCHEMES", "ClusterURL", "StemCluster", "cluster_client", "is_cluster_url",
           "is_cluster_transient", "parse_cluster_url", "split_packed"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_DEFAULT_PORT = 6379
#: The pipeline entry that orders what comes after it behind what came before (module docstring).
BARRIER: tuple = ("STEM.BARRIER",)
_BARRIER_NAME = BARRIER[0].encode()
_command_keys = _native.load("resp").command_keys
_ASKING = pack_commands([("ASKING",)])
_MAX_REDIRECTS = 5
_TRYAGAIN_WAIT_S = 0.05


class ClusterURL(NamedTuple):
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    ssl: bool


def is_cluster_url(url: str) -> bool:
    return isinstance(url, str) and url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _bad(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"bad Redis Cluster URL {mask_url(url)!r}: {why} "
                              "(expected redis+cluster://host:port[,host:port...]/)")


def parse_cluster_url(url: str) -> ClusterURL:
    """The parts of a Cluster URL, checked: at least one node, db 0 only, no options."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis Cluster URL is a string, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:                  # an unbalanced IPv6 bracket
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        raise ConfigurationError(f"not a Redis Cluster URL: {mask_url(url)!r}")
    username, password, hosts = split_authority(parts.netloc)
    try:
        nodes = parse_addresses(hosts, _DEFAULT_PORT)
    except AddressError as exc:
        raise _bad(url, str(exc)) from None
    if not nodes:
        raise _bad(url, "no node address")
    path = [p for p in parts.path.split("/") if p]
    if len(path) > 1 or (path and path[0] != "0"):
        raise _bad(url, f"a cluster has only db 0, got path {parts.path!r}")
    if parts.query:
        raise _bad(url, f"unknown options {parts.query!r} (a Cluster URL takes none)")
    return ClusterURL(nodes, username, password, scheme == "rediss+cluster")


def cluster_client(url: str, *, socket_timeout: float, socket_connect_timeout: float) -> "StemCluster":
    """A ``StemCluster`` for ``url``; it reads the slot map from the first node that answers.
    Its own retries are off (one attempt): ``RedisStore.call`` retries, with backoff."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    parsed = parse_cluster_url(url)
    kwargs: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout,
                              "socket_keepalive": True}
    if parsed.password is not None:
        kwargs["password"] = parsed.password
    if parsed.username is not None:
        kwargs["username"] = parsed.username
    if parsed.ssl:
        kwargs["ssl"] = True
    try:
        return StemCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
                           retry=Retry(NoBackoff(), 0), **kwargs)
    except (redis.exceptions.RedisClusterException, *_UNREACHABLE) as exc:
        # the store turns it into the user's connection error
        raise redis.ConnectionError(f"no node of the cluster answered: {exc}") from exc


def is_cluster_transient(exc: BaseException) -> bool:
    """An error a cluster gives while its slots change hands (a failover, a resharding): the
    call is retried after a fresh slot map."""
    return isinstance(exc, (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                            redis.exceptions.AskError, redis.exceptions.ClusterError,
                            redis.exceptions.SlotNotCoveredError, redis.exceptions.RedisClusterUnreachableError,
                            redis.exceptions.ReadOnlyError))


# -- splitting a packed pipeline ------------------------------------------------------------
def split_packed(buf: bytes) -> list[tuple[int, int, Any]]:
    """(start, end, key) of each command of a packed pipeline (``pack_commands``): the key
    that routes it (the first key of a script call, else the first argument; None for a
    one-word command) or ``BARRIER``.  The scan is ``command_keys`` of ``stem._speedups.resp``
    (or its pure twin)."""
    out: list[tuple[int, int, Any]] = []
    start = 0
    for end, name, key in _command_keys(buf):
        if key is None and name == _BARRIER_NAME:
            key = BARRIER
        out.append((start, end, key))
        start = end
    return out


class StemCluster(RedisCluster):
    """redis-py's cluster client with stem's raw pipelines routed by slot (module docstring)."""

    _stem_stale = False

    def stem_refresh_later(self) -> None:
        """A node failed: load the slot map again before the next raw pipeline."""
        self._stem_stale = True

    def stem_refresh(self) -> None:
        self._stem_stale = False
        try:
            self.nodes_manager.initialize()
        except (redis.exceptions.RedisClusterException, *_UNREACHABLE) as exc:
            self._stem_stale = True
            raise redis.ConnectionError(f"could not load the cluster's slot map: {exc}") from exc

    def stem_execute(self, packed: bytes, n: int) -> list:
        """The ``n`` replies of the packed pipeline ``packed``, in its order (error replies in
        place), its commands sent to their slots' primaries phase by phase."""
        if self._stem_stale:
            self.stem_refresh()
        spans = split_packed(packed)
        if len(spans) != n:
            raise ValueError(f"a packed pipeline of {len(spans)} commands, said to hold {n}")
        replies: list[Any] = [None] * n
        phase: list[int] = []
        failed = False
        for i, (_, _, key) in enumerate(spans):
            if key is not BARRIER:
                phase.append(i)
                continue
            failed = failed or self._run_phase(packed, spans, phase, replies)
            phase = []
            replies[i] = b"OK"
            if failed:
                break
        if failed:
            for i in range(n):
                if replies[i] is None:
                    replies[i] = redis.ResponseError("STEMSKIPPED an earlier command of the pipeline failed")
            return replies
        self._run_phase(packed, spans, phase, replies)
        return replies

    def _primary_for(self, key: Any) -> ClusterNode:
        if key is None:
            return self.get_default_node() or random.choice(self.get_primaries())
        return self.nodes_manager.get_node_from_slot(key_slot(key.encode() if type(key) is str else key))

    def _run_phase(self, packed: bytes, spans: list, indices: list[int], replies: list) -> bool:
        """Send ``indices`` (each node's commands in one write, every node at once), follow
        redirections, store the replies; True when one of them is an error."""
        asks: dict[int, tuple[str, int]] = {}
        pending = indices
        failed = redirected = False
        for _ in range(_MAX_REDIRECTS):
            if not pending:
                break
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            route: dict[Any, ClusterNode] = {}   # key -> its primary, for this round
            for i in pending:
                addr = asks.get(i)
                if addr:
                    node = self.nodes_manager.get_node(*addr)
                    if node is None:
                        node = ClusterNode(*addr)
                        self.nodes_manager.nodes_cache[node.name] = node
                else:
                    key = spans[i][2]
                    node = route.get(key)
                    if node is None:
                        node = route[key] = self._primary_for(key)
                entry = groups.get(node.name)
                if entry is None:
                    entry = groups[node.name] = (node, [])
                entry[1].append(i)
            got = self._send_groups(packed, spans, groups, asks)
            redo: list[int] = []
            wait = False
            asks = {}
            for i, r in got:
                replies[i] = r
                if not isinstance(r, redis.ResponseError):
                    continue
                failed = True
                if isinstance(r, redis.exceptions.MovedError):
                    self._fill_host(r, i, groups)
                    self.nodes_manager.move_slot(r)
                    redo.append(i)
                elif isinstance(r, redis.exceptions.AskError):
                    self._fill_host(r, i, groups)
                    asks[i] = (r.host, r.port)
                    redo.append(i)
                elif isinstance(r, redis.exceptions.TryAgainError):
                    wait = True
                    redo.append(i)
            if not redo:
                break
            redirected = True   # the redirected ones are sent again: their last replies count
            pending = sorted(redo)
            if wait:
                time.sleep(_TRYAGAIN_WAIT_S)
        if not redirected:
            return failed
        return any(isinstance(replies[i], redis.ResponseError) for i in indices)

    @staticmethod
    def _fill_host(e: Any, i: int, groups: dict) -> None:
        """A redirection without a host (``MOVED 3999 :6381``) means the host it was sent to."""
        if not e.host:
            for node, members in groups.values():
                if i in members:
                    e.host = node.host
                    e.node_addr = (e.host, e.port)

    def _send_groups(self, packed: bytes, spans: list, groups: dict, asks: dict) -> list[tuple[int, Any]]:
        """Write each node's commands, then read each node's replies: (index, reply) pairs."""
        sent: list[tuple[Any, Any, list[int], int]] = []
        out: list[tuple[int, Any]] = []
        node = None
        try:
            for node, members in groups.values():
                pool = self.get_redis_connection(node).connection_pool
                conn = pool.get_connection()
                first, last = members[0], members[-1]
                if not asks and last - first + 1 == len(members):   # a run of the pipeline: one slice
                    n = len(members)
                    buf = packed if n == len(spans) else packed[spans[first][0]:spans[last][1]]
                else:
                    parts = []
                    n = 0
                    for i in members:
                        if i in asks:
                            parts.append(_ASKING)
                            n += 1
                        start, end, _ = spans[i]
                        parts.append(packed[start:end])
                        n += 1
                    buf = b"".join(parts)
                sent.append((pool, conn, members, n))
                conn.send_packed_command([buf], check_health=False)
            while sent:
                pool, conn, members, n = sent[0]
                node = None
                got = read_replies(conn, n)
                sent.pop(0)
                pool.release(conn)
                if n != len(members):   # drop the ASKING replies
                    it = iter(got)
                    got = [(next(it), next(it))[1] if i in asks else next(it) for i in members]
                out.extend(zip(members, got))
        except BaseException as exc:
            for pool, conn, _, _ in sent:   # never hand back a connection with replies in flight
                conn.disconnect()
                pool.release(conn)
            if isinstance(exc, _UNREACHABLE):
                self.stem_refresh_later()
            raise
        return out

    def stem_block_any(self, commands: list[tuple[Any, tuple]], wait_s: float) -> bool:
        """Wait on several blocking commands of different slots at once (a blocking consume
        over queues in several slots: one ``XREAD BLOCK`` per queue).  ``commands`` are
        (routing key, command) pairs; each is sent on a connection of its own to its slot's
        primary, all at once, and this returns as soon as one answers with something (True)
        or once all answered nil (False; or ``wait_s`` passed).  The connections still
        blocked then are dropped, which ends their wait on the server: they are never
        handed back with a reply in flight."""
        if self._stem_stale:
            self.stem_refresh()
        opened: list[tuple[Any, Any]] = []
        try:
            for key, command in commands:
                pool = self.get_redis_connection(self._primary_for(key)).connection_pool
                conn = pool.get_connection()
                opened.append((pool, conn))
                conn.send_packed_command([pack_commands([command])], check_health=False)
            waiting = {conn._sock: (pool, conn) for pool, conn in opened}   # as redis_pipe reads it
            deadline = time.monotonic() + wait_s
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                readable, _, _ = select.select(list(waiting), [], [], left)
                for sock in readable:
                    pool, conn = waiting.pop(sock)
                    reply = read_replies(conn, 1)[0]
                    opened.remove((pool, conn))
                    pool.release(conn)
                    if isinstance(reply, redis.ResponseError):
                        raise reply
                    if reply:
                        return True
            return False
        except _UNREACHABLE:
            self.stem_refresh_later()
            raise
        finally:
            for pool, conn in opened:
                conn.disconnect()
                pool.release(conn)

    def close(self) -> None:
        try:
            super().close()
        except AttributeError:   # pragma: no cover - a client whose __init__ failed
            pass


_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
