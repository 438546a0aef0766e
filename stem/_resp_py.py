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

__all__ = ["pack_command", "pack_commands"]


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
