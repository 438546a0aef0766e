"""RESP packing and the lean pipeline: compiled (``c``) vs pure twin (``py``), and redis-py.

    .venv/bin/python -m pytest benchmarks/test_resp.py -p no:cacheprovider \
        --benchmark-only --benchmark-group-by=group -q

``pack settle batch``: what the worker writes to settle 32 tasks (a SET with
PX and a PUBLISH per task, then the ack script) packed into one buffer by
``stem._speedups.resp`` / ``stem._resp_py``, next to redis-py's own packer
(``hiredis.pack_command`` per command, joined).  ``pack xadd batch``: 500
XADDs of 200-byte frames (a producer's ``enqueue_many`` of mixed items);
``pack_xadds``: the same 500 XADDs from the lists a uniform ``enqueue_many``
has (key, ids, frames), next to ``pack_commands`` of the command tuples
(building the tuples included).  ``500 XADD replies``: stepping over them
with ``scan_replies`` vs building each with hiredis's ``Reader.gets`` (what
a pipeline read costs without the socket).  ``pipeline 64
SETs``: the round trip against the local Redis through
``stem.stores.redis_pipe.execute`` vs a redis-py ``Pipeline`` (wall time,
server included; skipped when no Redis answers).  ``settle pipeline``: 64
replies only checked for errors and the last one built, by ``execute_last``
(stepped over in C) vs ``execute`` (each built by hiredis), round trip.
``command_keys``: what a Redis Cluster pipeline costs before it is routed
(``stem.stores.redis_cluster``): the packed settle batch and the xadd batch
split into (end, name, routing key) per command, compiled vs pure twin;
``extra_info["us_per_command_median"]``, and the c/py ratio of the medians
printed at the end of the module's run.
"""

from __future__ import annotations

import os
import uuid

import hiredis
import pytest
import redis

from benchmarks._twins import builds
from stem import _resp_py
from stem.stores.redis_cluster import BARRIER

TWINS = {build: resp for build, (resp,) in builds("resp").items()}

SETTLE = ([("SET", f"stem:{{t:{uuid.uuid4().hex}}}:status", b"s" * 160, "PX", 86_400_000) for _ in range(32)]
          + [("PUBLISH", f"stem:{{t:{uuid.uuid4().hex}}}:done", b"s" * 160) for _ in range(32)]
          + [("EVALSHA", "a" * 40, 13, *[f"stem:{{q:bench}}:k{i}" for i in range(13)], "ack",
              *[x for i in range(32) for x in (0, f"1764355200000-{i}")])])
XADD = [("XADD", "stem:{q:bench}:lane:0", "*", "t", uuid.uuid4().hex, "f", b"f" * 200, "p", 0, "v", 0)
        for _ in range(500)]


def _hiredis(commands):
    return b"".join(hiredis.pack_command(tuple(c)) for c in commands)


@pytest.mark.parametrize("impl", [*TWINS, "redis-py"])
@pytest.mark.parametrize("name, commands", [("settle batch", SETTLE), ("xadd batch", XADD)])
def test_pack(benchmark, impl, name, commands):
    benchmark.group = f"pack {name} ({len(commands)} commands)"
    pack = _hiredis if impl == "redis-py" else TWINS[impl].pack_commands
    out = benchmark(pack, commands)
    assert out == _hiredis(commands)
    benchmark.extra_info["us_per_command_median"] = benchmark.stats.stats.median * 1e6 / len(commands)


@pytest.fixture(scope="module")
def client():
    c = redis.Redis.from_url(os.environ.get("STEM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        c.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis for the pipeline bench: {exc}")
    yield c
    c.close()


@pytest.mark.parametrize("impl", ["lean", "redis-py"])
def test_pipeline_64_sets(benchmark, client, impl):
    from stem.stores.redis_pipe import execute
    benchmark.group = "pipeline 64 SETs (round trip, server included)"
    keys = [f"stem-bench-resp:{i}" for i in range(64)]
    commands = [("SET", k, b"v" * 160, "PX", 60_000) for k in keys]

    def redis_py():
        pipe = client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c)
        return pipe.execute()

    run = (lambda: execute(client, commands)) if impl == "lean" else redis_py
    replies = benchmark(run)
    assert replies == [True] * 64 if impl == "redis-py" else replies == [b"OK"] * 64
    client.delete(*keys)


@pytest.mark.parametrize("impl", ["execute_last", "execute"])
def test_settle_pipeline_replies(benchmark, client, impl):
    """A settle round trip's replies: 32 SETs and 32 PUBLISHes stepped over in C before the
    last reply (``execute_last``, what ``run_and_consume`` sends) vs every reply built and
    checked (``execute``, what it sent before)."""
    from stem.stores.redis_pipe import execute_last, execute_packed, raise_first_error
    benchmark.group = "settle pipeline: 64 replies to check, the last one built (round trip)"
    keys = [f"stem-bench-resp:{i}" for i in range(32)]
    commands = ([("SET", k, b"v" * 160, "PX", 60_000) for k in keys] + [("PUBLISH", k, b"v" * 160) for k in keys]
                + [("ECHO", "last")])
    packed = TWINS.get("c", _resp_py).pack_commands(commands)

    def built():
        *settled, last = execute_packed(client, packed, len(commands))
        raise_first_error(settled)
        return None, last

    run = (lambda: execute_last(client, packed, len(commands))) if impl == "execute_last" else built
    assert benchmark(run) == (None, b"last")
    client.delete(*keys)


XADD_IDS = [c[4] for c in XADD]
XADD_FRAMES = [c[6] for c in XADD]


@pytest.mark.parametrize("impl", [*TWINS, "pack_commands"])
def test_pack_xadds(benchmark, impl):
    benchmark.group = "pack_xadds (500 XADD from key, ids, frames)"
    key = XADD[0][1]
    if impl == "pack_commands":
        pack = TWINS.get("c", _resp_py).pack_commands

        def run():
            return pack([("XADD", key, "*", "t", i, "f", f, "p", 0, "v", 0) for i, f in zip(XADD_IDS, XADD_FRAMES)])
    else:
        def run():
            return TWINS[impl].pack_xadds(key, XADD_IDS, XADD_FRAMES, 0, 0)
    assert benchmark(run) == _hiredis(XADD)


REPLIES = b"".join(b"$15\r\n1764355200000-%d\r\n" % (i % 10) for i in range(500))


@pytest.mark.parametrize("impl", [*TWINS, "hiredis gets"])
def test_step_over_replies(benchmark, impl):
    benchmark.group = "500 XADD replies (no socket)"
    if impl == "hiredis gets":
        def run():
            reader = hiredis.Reader()
            reader.feed(REPLIES)
            n = 0
            while reader.gets() is not False:
                n += 1
            return n
        assert benchmark(run) == 500
    else:
        scan = TWINS[impl].scan_replies
        assert benchmark(scan, REPLIES, 0, len(REPLIES), 500) == (len(REPLIES), 500, None)


_KEYS_MEDIANS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def keys_ratio(request):
    """Prints each batch's ``command_keys`` c/py ratio from this run's medians."""
    yield _KEYS_MEDIANS
    lines = [f"command_keys {name}: c {_KEYS_MEDIANS[(name, 'c')]:.3f} us/command, "
             f"py {_KEYS_MEDIANS[(name, 'py')]:.3f} us/command, "
             f"py/c {_KEYS_MEDIANS[(name, 'py')] / _KEYS_MEDIANS[(name, 'c')]:.1f}x"
             for name in dict.fromkeys(n for n, _ in _KEYS_MEDIANS) if (name, "c") in _KEYS_MEDIANS
             and (name, "py") in _KEYS_MEDIANS]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if lines:
        with capture.global_and_fixture_disabled():     # shown without -s, as capsys.disabled() does
            print("\n" + "\n".join(lines))


@pytest.mark.parametrize("impl", [*TWINS])
@pytest.mark.parametrize("name, commands", [("settle batch", SETTLE[:64] + [BARRIER] + SETTLE[64:]),
                                            ("xadd batch", XADD)])
def test_command_keys(benchmark, keys_ratio, impl, name, commands):
    benchmark.group = f"command_keys: split a packed {name} by routing key ({len(commands)} commands)"
    packed = TWINS.get("c", _resp_py).pack_commands(commands)
    split = benchmark(TWINS[impl].command_keys, packed)
    assert [key for _, _, key in split] == [
        None if c is BARRIER else (c[3] if c[0] == "EVALSHA" else c[1]).encode() for c in commands]
    assert split[-1][0] == len(packed)
    per_command = benchmark.stats.stats.median * 1e6 / len(commands)
    benchmark.extra_info["us_per_command_median"] = per_command
    keys_ratio[(name, impl)] = per_command
