"""RESP packing (both builds through the ``twin`` fixture, hiredis as the oracle) and the lean pipeline."""

from __future__ import annotations

import errno
import uuid
from types import SimpleNamespace

import hiredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from stem.stores import redis_pipe as _redis_pipe

args = st.one_of(st.binary(max_size=300), st.text(max_size=100),
                 st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                 st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=200, deadline=None)
@given(commands=st.lists(st.lists(args, min_size=1, max_size=8).map(tuple), min_size=1, max_size=10))
def test_packing_matches_hiredis(twin, commands):
    assert twin.resp.pack_commands(commands) == b"".join(hiredis.pack_command(c) for c in commands)


def test_edges_and_buffers(twin):
    cmd = ("X", 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64, 1.5, "é", b"", "")
    assert twin.resp.pack_command(*cmd) == hiredis.pack_command(cmd)
    assert twin.resp.pack_command(bytearray(b"ab"), memoryview(b"cd")) == hiredis.pack_command((b"ab", b"cd"))
    big = b"x" * 100_000   # past the first buffer growth
    assert twin.resp.pack_commands([("SET", "k", big)] * 3) == hiredis.pack_command(("SET", "k", big)) * 3


@pytest.mark.parametrize("bad", [None, True, object(), ["list"]])
def test_unsendable_arguments_are_type_errors(twin, bad):
    with pytest.raises(TypeError, match="cannot send"):
        twin.resp.pack_command("SET", "k", bad)


def test_an_empty_command_is_refused(twin):
    with pytest.raises(ValueError):
        twin.resp.pack_commands([()])


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.redis
def test_pipeline_returns_every_reply_in_order_with_errors_in_place(client):
    key = f"stem-test-resp:{uuid.uuid4().hex}"
    big = b"v" * 200_000   # a reply larger than one socket read
    replies = _redis_pipe.execute(client, [("SET", key, big, "PX", 10_000), ("GET", key), ("INCR", key),
                                           ("EVALSHA", "0" * 40, 0), ("DEL", key)])
    assert replies[:2] == [b"OK", big]
    assert isinstance(replies[2], redis.ResponseError)
    assert isinstance(replies[3], redis.exceptions.NoScriptError)
    assert replies[4] == 1
    with pytest.raises(redis.ResponseError):
        _redis_pipe.raise_first_error(replies)
    # the connection went back to the pool in a clean state: the next call reads its own replies
    assert _redis_pipe.execute(client, [("PING",), ("ECHO", "x")]) == [b"PONG", b"x"]


def _replies(client, commands):
    return _redis_pipe.execute(client, commands)


def _unread(client, commands):
    return _redis_pipe.execute_unread(client, _redis_pipe.pack_commands(commands), len(commands))


READERS = [pytest.param(_replies, id="replies"), pytest.param(_unread, id="unread")]
# where each way of reading replies gets its bytes, for the tests that break the socket under it
SOCKET_READ = {_replies: "redis._parsers.hiredis._HiredisParser.read_from_socket",
               _unread: "socket.socket.recv_into"}


@pytest.mark.redis
@pytest.mark.parametrize("read", READERS)
def test_a_connection_lost_mid_pipeline_is_dropped_not_reused(client, read):
    [conn_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    # the server answers the KILL, then closes this very connection before the PING's reply
    with pytest.raises(redis.ConnectionError):
        read(client, [("CLIENT", "KILL", "ID", conn_id, "SKIPME", "no"), ("PING",)])
    assert _redis_pipe.execute(client, [("PING",)]) == [b"PONG"]
    [new_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    assert new_id != conn_id


@pytest.mark.redis
@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("error, expected", [(ConnectionResetError(104, "Connection reset by peer"),
                                              redis.ConnectionError),
                                             (TimeoutError("timed out"), redis.TimeoutError)])
def test_socket_errors_while_reading_become_redis_errors(client, monkeypatch, read, error, expected):
    """An OSError from the socket (the server was killed) must surface as the redis error the
    retry logic handles, never escape raw (it once killed the worker's fetcher thread)."""
    [first_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])

    def broken(self, *a, **k):
        raise error

    monkeypatch.setattr(SOCKET_READ[read], broken, raising=False)
    with pytest.raises(expected):
        read(client, [("PING",)])
    monkeypatch.undo()
    assert _redis_pipe.execute(client, [("PING",)]) == [b"PONG"]
    [new_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    assert new_id != first_id, "the connection that failed mid-reply went back to the pool"


# ---- XADD batches and stepping over replies -----------------------------------------------

@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=300)), max_size=20),
       key=st.text(min_size=1, max_size=30), priority=st.integers(-2 ** 63, 2 ** 63 - 1),
       vt_ms=st.integers(0, 2 ** 40))
def test_pack_xadds_matches_pack_commands(twin, pairs, key, priority, vt_ms):
    ids, frames = [p[0] for p in pairs], [p[1] for p in pairs]
    expected = b"".join(hiredis.pack_command(("XADD", key, "*", "t", i, "f", f, "p", priority, "v", vt_ms))
                        for i, f in pairs)
    assert twin.resp.pack_xadds(key, ids, frames, priority, vt_ms) == expected


def test_pack_xadds_refuses_mismatched_lists_and_bad_arguments(twin):
    with pytest.raises(ValueError, match="2 task ids for 1 frames"):
        twin.resp.pack_xadds("k", ["a", "b"], [b"f"], 0, 0)
    with pytest.raises(TypeError, match="cannot send"):
        twin.resp.pack_xadds("k", [None], [b"f"], 0, 0)


def _resp(value) -> bytes:
    """RESP2 of a reply value: int, bytes, None (null bulk), list, ("+", str) or ("-", str)."""
    if isinstance(value, tuple):
        return f"{value[0]}{value[1]}\r\n".encode()
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if value is None:
        return b"$-1\r\n"
    return b"*%d\r\n" % len(value) + b"".join(_resp(v) for v in value)


def _first_error(value) -> bytes | None:
    """The message of the first error reply in ``value``, depth first, as the stream holds them."""
    if isinstance(value, tuple):
        return value[1].encode() if value[0] == "-" else None
    if isinstance(value, list):
        return next((e for e in map(_first_error, value) if e is not None), None)
    return None


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ERR-", max_size=20).map(str.strip).filter(bool)
replies = st.recursive(st.integers(-2 ** 63, 2 ** 63 - 1) | st.binary(max_size=40) | st.none()
                       | st.tuples(st.just("+"), words) | st.tuples(st.just("-"), words),
                       lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(replies, min_size=1, max_size=8), data=st.data())
def test_scan_replies_counts_what_hiredis_reads_at_any_cut(twin, values, data):
    """hiredis is the oracle: at any cut of the stream, the replies it can read are the ones
    scan_replies steps over; the first error reply (nested ones too) is the one reported, with
    the index of the top-level reply that holds it."""
    buf = b"".join(_resp(v) for v in values)
    cut = data.draw(st.integers(0, len(buf)))
    reader = hiredis.Reader()
    reader.feed(buf[:cut])
    complete = []
    while (r := reader.gets()) is not False:
        complete.append(r)
    pos, count, error = twin.resp.scan_replies(buf, 0, cut, 100)
    assert count == len(complete)
    assert pos == len(b"".join(_resp(v) for v in values[:count]))
    errors = [(i, e) for i, e in enumerate(map(_first_error, values[:count])) if e is not None]
    assert error == (errors[0] if errors else None)
    assert twin.resp.scan_replies(buf, 0, len(buf), 100)[:2] == (len(buf), len(values))
    # stepping over a prefix, then the rest, counts every reply once
    first = twin.resp.scan_replies(buf, 0, len(buf), 1)
    rest = twin.resp.scan_replies(buf, first[0], len(buf), 100)
    assert first[1] + rest[1] == len(values) and rest[0] == len(buf)


@pytest.mark.parametrize("bad", [b"?what\r\n", b"+no crlf\n", b"$x\r\n", b"*-\r\n", b":1\r\n$3\r\nab"])
def test_scan_replies_rejects_a_stream_that_is_not_resp(twin, bad):
    if bad.endswith(b"ab"):   # merely cut short: not an error, the reply waits for more bytes
        assert twin.resp.scan_replies(bad, 0, len(bad), 5) == (4, 1, None)
        return
    with pytest.raises(ValueError, match="bad RESP reply"):
        twin.resp.scan_replies(bad, 0, len(bad), 5)


def test_scan_replies_checks_its_bounds_and_reads_buffers(twin):
    with pytest.raises(ValueError, match="bad bounds"):
        twin.resp.scan_replies(b":1\r\n", 0, 9, 1)
    assert twin.resp.scan_replies(bytearray(b"+OK\r\n-ERR x\r\n"), 0, 13, 5) == (13, 2, (1, b"ERR x"))
    assert twin.resp.scan_replies(b"+OK\r\n-ERR x\r\n", 0, 12, 5) == (5, 1, None)
    assert twin.resp.scan_replies(b"+OK\r\n", 0, 5, 0) == (0, 0, None)


@pytest.fixture(params=[True, False], ids=["hiredis", "resp2-parser"])
def piped(request, redis_url, monkeypatch):
    """A client with the hiredis parser or redis-py's own, a fresh key, a value larger than
    the read buffer, and the list of ``scan_replies`` calls (the raw socket path is the one
    taken with hiredis).  Every key under the fresh one is deleted afterwards."""
    from redis._parsers import _RESP2Parser
    hiredis_parser = request.param
    kwargs = {} if hiredis_parser else {"parser_class": _RESP2Parser}
    scans = []
    real_scan = _redis_pipe._scan_replies
    monkeypatch.setattr(_redis_pipe, "_scan_replies", lambda *a: (scans.append(a[3]), real_scan(*a))[1])
    client = redis.Redis.from_url(redis_url, socket_timeout=10, **kwargs)   # a lost reply fails, never hangs
    key = f"stem-test-resp:{uuid.uuid4().hex}"
    yield SimpleNamespace(client=client, key=key, big=b"v" * 200_000, scans=scans, hiredis=hiredis_parser)
    client.delete(*client.scan_iter(match=key + "*"))
    client.close()


@pytest.mark.redis
def test_execute_unread_reads_every_reply_and_raises_the_first_error(piped):
    """Replies are stepped over, not built; an error among them is raised typed once all are
    read, and the connection is left clean.  Without the hiredis parser (or while it holds
    bytes) the replies are read the usual way, with the same outcome."""
    client, key = piped.client, piped.key
    packed = _redis_pipe.pack_commands([("SET", key, piped.big, "PX", 10_000), ("GET", key)] * 3)
    assert _redis_pipe.execute_unread(client, packed, 6) is None
    packed = _redis_pipe.pack_commands([("GET", key), ("INCR", key), ("EVALSHA", "0" * 40, 0), ("PING",)])
    with pytest.raises(redis.ResponseError) as info:
        _redis_pipe.execute_unread(client, packed, 4)
    assert not isinstance(info.value, redis.exceptions.NoScriptError)   # the first error, not the last
    with pytest.raises(redis.exceptions.NoScriptError):
        _redis_pipe.execute_unread(client, _redis_pipe.pack_commands([("EVALSHA", "0" * 40, 0)]), 1)
    assert _redis_pipe.execute(client, [("PING",), ("ECHO", "x")]) == [b"PONG", b"x"]
    assert bool(piped.scans) == piped.hiredis


@pytest.mark.redis
def test_execute_last_builds_only_the_last_reply_and_returns_the_first_error(piped):
    """The replies before the last are stepped over (an error among them comes back typed,
    not raised); the last one is built, also when its bytes arrived with the ones stepped
    over, and the connection is left clean."""
    client, key = piped.client, piped.key
    packed = _redis_pipe.pack_commands([("SET", key, piped.big, "PX", 10_000), ("GET", key),
                                        ("LRANGE", key + ":l", 0, -1), ("RPUSH", key + ":l", "a", "b"),
                                        ("LRANGE", key + ":l", 0, -1)])
    assert _redis_pipe.execute_last(client, packed, 5) == (None, [b"a", b"b"])
    packed = _redis_pipe.pack_commands([("PING",), ("INCR", key), ("EVALSHA", "0" * 40, 0), ("ECHO", "last")])
    error, last = _redis_pipe.execute_last(client, packed, 4)
    assert isinstance(error, redis.ResponseError) and "not an integer" in str(error)   # the first one
    assert last == b"last"
    error, last = _redis_pipe.execute_last(client, _redis_pipe.pack_commands([("EVALSHA", "0" * 40, 0)]), 1)
    assert error is None and isinstance(last, redis.exceptions.NoScriptError)   # the last is returned as is
    assert _redis_pipe.execute(client, [("PING",), ("ECHO", "x")]) == [b"PONG", b"x"]
    assert bool(piped.scans) == piped.hiredis


def test_command_keys_names_each_packed_command_and_the_key_that_routes_it(twin):
    commands = [("EVALSHA", "f" * 40, 2, "k1", "k2", "a"), ("evalsha", "f", 0, "x"), ("PING",),
                ("SET", "a", b"\r\n$9\r\n"), ("STEM.BARRIER",), ("fcall_ro", "fn", 1, "kk"), ("EVAL", "s", 1),
                ("XADD", b"{q:x}:lane:0", "*", "t", "id", "f", b"\x00" * 70000)]
    packed = hiredis_pack(commands)
    got = twin.resp.command_keys(packed)
    assert [(name, key) for _, name, key in got] == [
        (b"EVALSHA", b"k1"), (b"evalsha", None), (b"PING", None), (b"SET", b"a"), (b"STEM.BARRIER", None),
        (b"fcall_ro", b"kk"), (b"EVAL", None), (b"XADD", b"{q:x}:lane:0")]
    ends = [0] + [end for end, _, _ in got]
    assert [packed[a:b] for a, b in zip(ends, ends[1:])] == [hiredis.pack_command(c) for c in commands]
    assert twin.resp.command_keys(memoryview(packed)) == got
    assert twin.resp.command_keys(b"") == []


@pytest.mark.parametrize("bad", [b"+OK\r\n", b"*2\r\n$3\r\nSET\r\n", b"*1\r\n$9\r\nSET\r\n", b"*1\r\n:3\r\n",
                                 b"*0\r\n", b"*x\r\n"])
def test_command_keys_refuses_what_is_not_a_whole_packed_pipeline(twin, bad):
    with pytest.raises(ValueError):
        twin.resp.command_keys(bad)


def hiredis_pack(commands) -> bytes:
    return b"".join(hiredis.pack_command(c) for c in commands)


# ---- exchange: one command's round trip in one call -----------------------------------

class _Peer:
    """The far end of a socket pair: answers each whole command it reads with ``replies``
    (bytes each, written in the given pieces)."""

    def __init__(self, replies):
        import socket
        import threading
        self.ours, self.theirs = socket.socketpair()
        self.got: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, args=(list(replies),), daemon=True)
        self.thread.start()

    def _serve(self, replies):
        import time
        buf = b""
        while replies:
            chunk = self.theirs.recv(65536)
            if not chunk:
                return
            buf += chunk
            if not buf.endswith(b"\r\n"):
                continue
            self.got.append(buf)
            buf = b""
            reply = replies.pop(0)
            if reply is None:                    # hang up
                self.theirs.close()
                return
            for piece in (reply if isinstance(reply, list) else [reply]):
                self.theirs.sendall(piece)
                time.sleep(0.01)                 # the pieces arrive apart

    def close(self):
        self.ours.close()
        self.thread.join(5)
        self.theirs.close()


@pytest.mark.parametrize("reply, returned, fed", [
    (b"$19\r\n1700000000000-0\r\n\r\n\r\n", b"1700000000000-0\r\n\r\n", b""),
    ([b"$5\r\nhe", b"llo\r\n"], b"hello", b""),                          # cut in two reads
    ([b"$", b"0\r\n\r\n"], b"", b""),
    (b"-ERR wrong type\r\n", None, b"-ERR wrong type\r\n"),              # an error reply: to the reader
    (b"$-1\r\n", None, b"$-1\r\n"),                                      # null: to the reader
    (b":12\r\n", None, b":12\r\n"),
    (b"$2\r\nab\r\n+OK\r\n", None, b"$2\r\nab\r\n+OK\r\n"),             # more than one reply
    (b"?what\r\n", None, b"?what\r\n"),                                 # not RESP: the reader says so
    (b"$600\r\n" + b"x" * 600 + b"\r\n", None, None),                    # past the read buffer
])
def test_exchange_returns_a_lone_bulk_reply_and_feeds_anything_else(twin, reply, returned, fed):
    peer = _Peer([reply])
    feeds: list[bytes] = []
    try:
        assert twin.resp.exchange(peer.ours, b"*1\r\n$4\r\nPING\r\n", feeds.append) == returned
        assert peer.got == [b"*1\r\n$4\r\nPING\r\n"]
        if fed is None:   # the first buffer's worth; the reader reads the rest from the socket
            assert len(feeds) == 1 and 0 < len(feeds[0]) <= 600 and reply.startswith(feeds[0])
        else:
            assert b"".join(feeds) == fed and len(feeds) == (1 if fed else 0)
    finally:
        peer.close()


def test_exchange_sends_a_command_larger_than_a_socket_buffer(twin):
    big = twin.resp.pack_command("SET", "k", b"v" * 3_000_000)
    peer = _Peer([b"$2\r\nok\r\n"])
    try:
        assert twin.resp.exchange(peer.ours, big, None) == b"ok"
        assert peer.got == [big]
    finally:
        peer.close()


def test_exchange_raises_os_errors_a_closed_peer_and_a_kernel_timeout(twin):
    import socket
    import struct
    peer = _Peer([None])
    try:
        with pytest.raises(ConnectionError, match="closed by server"):
            twin.resp.exchange(peer.ours, b"*1\r\n$4\r\nPING\r\n", None)
    finally:
        peer.close()
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 100_000))
        with pytest.raises(BlockingIOError):           # nobody answers within SO_RCVTIMEO
            twin.resp.exchange(a, b"*1\r\n$4\r\nPING\r\n", None)
    finally:
        a.close()
        b.close()
    for gone in (a, None):                             # a closed socket, or none: EBADF
        with pytest.raises(OSError) as info:
            twin.resp.exchange(gone, b"*1\r\n$4\r\nPING\r\n", None)
        assert info.value.errno == errno.EBADF
    with pytest.raises(TypeError):
        twin.resp.exchange(a, "not bytes", None)
