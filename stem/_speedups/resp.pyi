"""RESP request packing and reply stepping in C (``_speedups/resp.pyx``); the same API as the
pure twin ``stem._resp_py``.  ``tests/test_build.py`` checks these names against the twin's."""

from collections.abc import Iterable, Sequence

__all__ = ["pack_command", "pack_commands", "pack_xadds", "scan_replies"]

# bool and None are refused (TypeError), as redis-py refuses them
_Arg = bytes | str | int | float | bytearray | memoryview
_Buffer = bytes | bytearray | memoryview

def pack_command(*args: _Arg) -> bytes: ...
def pack_commands(commands: Iterable[Sequence[_Arg]]) -> bytes: ...
def pack_xadds(key: _Arg, task_ids: list[_Arg], frames: list[_Arg], priority: _Arg, vt_ms: _Arg) -> bytes: ...
def scan_replies(buf: _Buffer, pos: int, end: int, want: int) -> tuple[int, int, tuple[int, bytes] | None]: ...
