"""What the engine writes into the store's byte fields: msgpack, as tasks' args and results.

Inputs, step outputs, event payloads and the engine's own records (a sleep's
deadline, a call's task id) are msgpack; a failure is a small map (type, message,
traceback).  A value is always handed to the workflow as it comes back from its
bytes, on the first run as on every replay (a tuple becomes a list both times), so
the code sees the same value whichever run it is in.
"""

from __future__ import annotations

import traceback as _tb
from typing import Any

import msgspec

from ..errors import EncodeError

__all__ = ["encode", "decode", "roundtrip", "encode_error", "decode_error", "error_of", "TRACEBACK_LIMIT"]

#: Characters of a traceback kept in the journal and in the run's error.
TRACEBACK_LIMIT = 8000

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def encode(value: Any, what: str = "a value") -> bytes:
    try:
        return _encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise EncodeError(f"{what} cannot be encoded as msgpack ({type(value).__name__}): {exc}") from None


def decode(data: bytes | None) -> Any:
    return None if data is None else _decode(data)


def roundtrip(value: Any, what: str = "a value") -> tuple[bytes, Any]:
    """``value``'s bytes, and the value as it comes back from them."""
    data = encode(value, what)
    return data, _decode(data)


def error_of(exc: BaseException) -> dict[str, Any]:
    text = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": str(exc), "traceback": text[-TRACEBACK_LIMIT:]}


def encode_error(error: dict[str, Any]) -> bytes:
    return _encode({"type": str(error.get("type") or "Error"), "message": str(error.get("message") or ""),
                    "traceback": error.get("traceback")})


def decode_error(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {"type": "Error", "message": "", "traceback": None}
    try:
        got = _decode(data)
    except msgspec.DecodeError:
        return {"type": "Error", "message": data[:200].decode("utf-8", "replace"), "traceback": None}
    return got if isinstance(got, dict) else {"type": "Error", "message": str(got), "traceback": None}
