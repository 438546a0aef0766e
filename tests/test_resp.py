"""RESP packing (compiled and pure twins, hiredis as the oracle) and the lean pipeline."""

from __future__ import annotations

import importlib
import uuid

import hiredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from stem import _resp_py
from stem.brokers import _redis_pipe

TWINS = [pytest.param(_resp_py, id="py")]
try:
    TWINS.append(pytest.param(importlib.import_module("stem._speedups.resp"), id="c"))
except ImportError:  # the pure run (or a build without a compiler) has no compiled module
    pass

args = st.one_of(st.binary(max_size=300), st.text(max_size=100),
                 st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                 st.floats(allow_nan=False, allow_infinity=False))


@pytest.mark.parametrize("mod", TWINS)
@settings(max_examples=200, deadline=None)
@given(commands=st.lists(st.lists(args, min_size=1, max_size=8).map(tuple), min_size=1, max_size=10))
def test_packing_matches_hiredis(mod, commands):
    assert mod.pack_commands(commands) == b"".join(hiredis.pack_command(c) for c in commands)


@pytest.mark.parametrize("mod", TWINS)
def test_edges_and_buffers(mod):
    cmd = ("X", 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64, 1.5, "é", b"", "")
    assert mod.pack_command(*cmd) == hiredis.pack_command(cmd)
    assert mod.pack_command(bytearray(b"ab"), memoryview(b"cd")) == hiredis.pack_command((b"ab", b"cd"))
    big = b"x" * 100_000   # past the first buffer growth
    assert mod.pack_commands([("SET", "k", big)] * 3) == hiredis.pack_command(("SET", "k", big)) * 3


@pytest.mark.parametrize("mod", TWINS)
@pytest.mark.parametrize("bad", [None, True, object(), ["list"]])
def test_unsendable_arguments_are_type_errors(mod, bad):
    with pytest.raises(TypeError, match="cannot send"):
        mod.pack_command("SET", "k", bad)


@pytest.mark.parametrize("mod", TWINS)
def test_an_empty_command_is_refused(mod):
    with pytest.raises(ValueError):
        mod.pack_commands([()])


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


@pytest.mark.redis
def test_a_connection_lost_mid_pipeline_is_dropped_not_reused(client):
    [conn_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    # the server answers the KILL, then closes this very connection before the PING's reply
    with pytest.raises(redis.ConnectionError):
        _redis_pipe.execute(client, [("CLIENT", "KILL", "ID", conn_id, "SKIPME", "no"), ("PING",)])
    assert _redis_pipe.execute(client, [("PING",)]) == [b"PONG"]
    [new_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    assert new_id != conn_id


@pytest.mark.redis
@pytest.mark.parametrize("error, expected", [(ConnectionResetError(104, "Connection reset by peer"),
                                              redis.ConnectionError),
                                             (TimeoutError("timed out"), redis.TimeoutError)])
def test_socket_errors_while_reading_become_redis_errors(client, monkeypatch, error, expected):
    """An OSError from the socket (the server was killed) must surface as the redis error the
    retry logic handles, never escape raw (it once killed the worker's fetcher thread)."""
    from redis._parsers.hiredis import _HiredisParser
    [first_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])

    def broken(self, *a, **k):
        raise error

    monkeypatch.setattr(_HiredisParser, "read_from_socket", broken)
    with pytest.raises(expected):
        _redis_pipe.execute(client, [("PING",)])
    monkeypatch.undo()
    assert _redis_pipe.execute(client, [("PING",)]) == [b"PONG"]
    [new_id] = _redis_pipe.execute(client, [("CLIENT", "ID")])
    assert new_id != first_id, "the connection that failed mid-reply went back to the pool"
