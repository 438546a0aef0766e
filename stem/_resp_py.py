"""RESP request packing, pure Python: the twin of ``stem._speedups.resp``.

Redis reads commands as RESP arrays of bulk strings.  The hot paths (a batch
of XADDs, the SET + PUBLISH of every result with its ack script) build one
buffer for a whole batch here and send it in one write, instead of going
through redis-py's per-command pipeline machinery, which costs more than the
command itself does on the server.

Arguments are ``bytes``, ``str`` (UTF-8), ``int`` or ``float`` (``repr``,
as redis-py writes them), ``bytearray`` or ``memoryview``; anything else
(``bool`` and ``None`` included) raises ``TypeError``, as redis-py does.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["command_keys", "exchange", "pack_command", "pack_commands", "pack_xadds", "scan_replies"]


def _arg(a: Any) -> bytes:
    t = type(a)
    if t is bytes:
        return a
    if t is str:
        return a.encode()
    if t is int:
        return b"%d" % a
    if t is float:
        return repr(a).encode()
    if t is bytearray or t is memoryview:
        return bytes(a)
    raise TypeError(f"cannot send a {t.__name__} to Redis (bytes, str, int or float)")


def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes:
    """One buffer holding every command of ``commands``, in order."""
    out: list[bytes] = []
    for cmd in commands:
        if not cmd:
            raise ValueError("an empty Redis command")
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            b = _arg(a)
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
    return b"".join(out)


def pack_command(*args: Any) -> bytes:
    return pack_commands((args,))


def pack_xadds(key: Any, task_ids: list, frames: list, priority: Any, vt_ms: Any) -> bytes:
    """``XADD key * t <id> f <frame> p <priority> v <vt_ms>`` for each (id, frame) pair."""
    if len(frames) != len(task_ids):
        raise ValueError(f"{len(task_ids)} task ids for {len(frames)} frames")
    return pack_commands(("XADD", key, "*", "t", task_id, "f", frame, "p", priority, "v", vt_ms)
                         for task_id, frame in zip(task_ids, frames))


def _line(buf: Any, pos: int, end: int) -> int:
    """Index of the CR ending the line that starts at pos, or -1 when it is not all there."""
    nl = buf.find(b"\n", pos, end)
    if nl == -1:
        return -1
    if nl == pos or buf[nl - 1] != 13:
        raise ValueError("bad RESP reply: a line not ended by CRLF")
    return nl - 1


def _length(buf: Any, start: int, stop: int) -> int:
    text = bytes(buf[start:stop])
    digits = text[1:] if text[:1] == b"-" else text
    if not digits:
        raise ValueError("bad RESP reply: a length without digits")
    if not digits.isdigit():
        raise ValueError("bad RESP reply: a length with a non-digit")
    return int(text)


def _skip(buf: Any, pos: int, end: int, err: list) -> int:
    """The index just past the reply at pos, or -1 when it is not all in buf[pos:end];
    an error reply's message bounds go into err (when it is empty)."""
    if pos >= end:
        return -1
    kind = buf[pos:pos + 1]
    cr = _line(buf, pos + 1, end)
    if cr == -1:
        return -1
    stop = cr + 2
    if kind in (b"+", b":", b"_", b",", b"#", b"("):
        return stop
    if kind == b"-":
        err.append((pos + 1, cr))
        return stop
    if kind in (b"$", b"=", b"!"):
        n = _length(buf, pos + 1, cr)
        if n < 0:
            return stop
        if end - stop < n + 2:
            return -1
        if kind == b"!":
            err.append((stop, stop + n))
        return stop + n + 2
    if kind in (b"*", b"~", b">", b"%"):
        n = _length(buf, pos + 1, cr) * (2 if kind == b"%" else 1)
        for _ in range(max(n, 0)):
            stop = _skip(buf, stop, end, err)
            if stop == -1:
                return -1
        return stop
    raise ValueError(f"bad RESP reply: unknown type byte {kind[0]!r}")


def scan_replies(buf: Any, pos: int, end: int, want: int) -> tuple[int, int, Any]:
    """Step over up to ``want`` complete replies in ``buf[pos:end]`` without building them;
    ``(pos, count, error)`` as the compiled twin returns."""
    if not 0 <= pos <= end <= len(buf):
        raise ValueError(f"bad bounds {pos}:{end} for a buffer of {len(buf)} bytes")
    count, error = 0, None
    while count < want:
        err: list = []
        nxt = _skip(buf, pos, end, err)
        if nxt == -1:
            break
        if err and error is None:
            start, stop = err[0]
            error = (count, bytes(buf[start:stop]))
        pos = nxt
        count += 1
    return pos, count, error


_SCRIPT_CALLS = (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO")


def command_keys(buf: Any) -> list[tuple[int, bytes, Any]]:
    """``(end, name, key)`` for each command of a packed pipeline, as the compiled twin
    returns: the index just past it, its name as sent, and the key that routes it on a
    Redis Cluster (the first key of a script call, else the first argument; or None)."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    out: list[tuple[int, bytes, Any]] = []
    find = buf.find
    pos, end = 0, len(buf)
    while pos < end:
        if buf[pos] != 42:   # '*'
            raise ValueError(f"not a packed Redis command at byte {pos}")
        nl = find(b"\r\n", pos)
        if nl < 0:
            raise ValueError("a packed Redis command cut short")
        argc = int(buf[pos + 1:nl])   # int() refuses what is not a number (ValueError)
        if argc < 1:
            raise ValueError("an empty packed Redis command")
        p = nl + 2
        head: list[bytes] = []
        for i in range(argc):
            if p >= end or buf[p] != 36:   # '$'
                raise ValueError(f"not a bulk string argument at byte {p}")
            nl = find(b"\r\n", p)
            if nl < 0:
                raise ValueError("a packed Redis command cut short")
            n = int(buf[p + 1:nl])
            s = nl + 2
            if n < 0 or s + n + 2 > end:
                raise ValueError("a packed Redis command cut short")
            if i < 4:
                head.append(buf[s:s + n])
            p = s + n + 2
        if head[0].upper() in _SCRIPT_CALLS:
            key = head[3] if argc > 3 and head[2] != b"0" else None
        else:
            key = head[1] if argc > 1 else None
        out.append((p, head[0], key))
        pos = p
    return out


_EXCHANGE_READ = 512


def exchange(sock: Any, packed: bytes, feed: Any) -> bytes | None:
    """One round trip on a blocking socket whose timeouts the kernel keeps: write ``packed``,
    read until its one reply is whole; the payload of a lone bulk-string reply, else what
    was read goes to ``feed`` and None is returned (the compiled twin's docstring has the
    rules).  ``os.write``/``os.read`` on the descriptor, as the compiled twin's
    ``write``/``read`` (EINTR retried by Python, PEP 475)."""
    import errno
    import os
    if type(packed) is not bytes:
        raise TypeError(f"packed must be bytes, got {type(packed).__name__}")
    fd = -1 if sock is None else sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:   # a socket closed (or dropped: None) under its connection
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    view = memoryview(packed)
    while view:
        view = view[os.write(fd, view):]
    buf = b""
    while True:
        chunk = os.read(fd, _EXCHANGE_READ - len(buf))
        if not chunk:
            raise ConnectionError("Connection closed by server.")
        buf += chunk
        try:
            end = _skip(buf, 0, len(buf), [])
        except ValueError:
            end = -2
        if end == -1 and len(buf) < _EXCHANGE_READ:
            continue
        if end == len(buf) and buf[:1] == b"$":
            cr = _line(buf, 1, len(buf))
            length = _length(buf, 1, cr)
            if length >= 0:
                return buf[cr + 2:cr + 2 + length]
        feed(buf)
        return None
