"""The task envelope and the wire frame every broker carries.

One frame per task, little endian::

    offset size
     0      2   magic        b"\\xa7S"
     2      1   version      WIRE_VERSION
     3      1   flags        reserved, 0
     4      1   key_len      0 = unsigned
     5      1   sig_len      0 = unsigned
     6      2   reserved     0
     8      4   attempt      u32  } delivery header: rewritten while the task
    12      4   body_len     u32  } travels (retries), NOT signed
    16      8   not_before   f64  } (NaN = none)
    24          key id (key_len bytes) | signature (sig_len bytes) | body (body_len bytes)

The body is ``msgpack(Envelope)``; the signature covers exactly the body
bytes, so a worker verifies before it decodes anything.  ``attempt`` and
``not_before`` in the body are the values at first publish; the delivery
header overrides them on decode.  A retry rewrites only the header
(:func:`with_delivery`) and never needs a signing key.

Forward compatibility of the body: ``Envelope`` is an array-like msgspec
Struct, so its fields travel by position.  msgspec fills missing trailing
elements with the field defaults and ignores extra trailing elements, so a
new field may be *appended* (with a default) and old and new stems still read
each other's frames.  Never reorder, remove or retype a field: that needs a new
``WIRE_VERSION``, which readers of the old one reject with DecodeError.  A
frame with unknown flags or reserved bits is rejected for the same reason.

The work is done by ``stem._speedups.codec`` (compiled) or its pure twin
``stem._codec_py``, chosen by ``stem._native``; ``IMPLEMENTATION`` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import msgspec

from stem import _native

if TYPE_CHECKING:
    from stem.signing import PayloadSigner

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE", "Envelope", "FrameHeader", "HEADER_SIZE", "IMPLEMENTATION", "MAGIC",
    "WIRE_VERSION", "decode_body", "decode_frame", "decode_value", "encode_body", "encode_frame",
    "encode_frames", "encode_value", "frame_encoder", "read_header", "with_delivery", "xadd_template",
]

WIRE_VERSION = 1
MAGIC = b"\xa7S"
HEADER_SIZE = 24
DEFAULT_MAX_FRAME_SIZE = 16 * 2**20


class Envelope(msgspec.Struct, array_like=True):
    """One task as it travels.  Fields go by position: append new ones at the end only."""

    id: str
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    attempt: int = 0
    max_retries: int = 0
    enqueued_at: float = 0.0
    not_before: float | None = None
    expires_at: float | None = None
    visibility_timeout: float | None = None
    soft_time_limit: float | None = None
    hard_time_limit: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    # option fields its producer left unset (it had no registry and was not told):
    # the worker fills them from its handler (``stem.worker.execution.apply_handler_options``)
    unset_options: list[str] = msgspec.field(default_factory=list)
    # "started": the worker frees the task's unique key when the task starts (``TaskOptions.unique_until``)
    unique_until: str | None = None
    # TaskOptions.result_ttl / failure_ttl / ignore_result; None: not set by the producer
    # (the worker takes its handler's, ``stem.worker.execution.apply_result_options``)
    result_ttl: float | None = None
    failure_ttl: float | None = None
    ignore_result: bool | None = None
    # its place in a canvas (stem.canvas): where it reports when it ends, the chain steps
    # still to run, its predecessor's result; None for a task outside any canvas
    canvas: dict[str, Any] | None = None


class FrameHeader(NamedTuple):
    """What :func:`read_header` finds in a frame without decoding its body."""

    version: int
    key_id: bytes            # b"" when unsigned
    signature: bytes         # b"" when unsigned
    attempt: int
    not_before: float | None
    body: memoryview         # the signed msgpack bytes, a view into the frame


_module = _native.load("codec")
#: "cython" or "python": which codec build this process runs (``stem._native`` decides)
IMPLEMENTATION = _native.implementation("codec")
_codec = _module.FrameCodec(Envelope, FrameHeader)
if (_module.WIRE_VERSION, _module.MAGIC, _module.HEADER_SIZE) != (WIRE_VERSION, MAGIC, HEADER_SIZE):
    raise ImportError(f"{_module.__name__} speaks another wire format; rebuild stem (make build)")

_encode_frame = _codec.encode_frame
_decode_frame = _codec.decode_frame
# A PayloadSigner hands its backend (e.g. the compiled HmacSigner, which the
# compiled codec drives in place); any other object with sign()/verify() works too.


def encode_frame(env: Envelope, signer: PayloadSigner | None = None, *,
                 max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The frame for ``env``, its body signed by ``signer`` when given.

    Raises EncodeError when args, meta or headers cannot be encoded (a value
    msgpack cannot carry, a non-str key) or the frame would pass ``max_size``.
    """
    return _encode_frame(env, None if signer is None else getattr(signer, "_backend", signer), max_size)


def frame_encoder(signer: PayloadSigner | None = None, *,
                  max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Callable[[Envelope], bytes]:
    """``encode_frame`` with ``signer`` and ``max_size`` bound once, for a producer
    that frames a whole batch: the per-call signer lookup and keyword handling
    are a measurable part of a ~1 us encode.  Same bytes and errors as
    :func:`encode_frame`."""
    encode, backend = _encode_frame, None if signer is None else getattr(signer, "_backend", signer)

    def encode_one(env: Envelope) -> bytes:
        return encode(env, backend, max_size)

    return encode_one


def encode_frames(env: Envelope, ids: list[str], args_list: list[dict[str, Any]],
                  signer: PayloadSigner | None = None, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[bytes]:
    """The frames of ``env`` with each id and args of ``zip(ids, args_list)`` put in:
    what ``encode_frame`` makes of each such envelope, for a batch of one task name.
    The compiled codec encodes the shared fields once and splices each body.  Raises
    what ``encode_frame`` raises (EncodeError also for an id that is not a str)."""
    return _codec.encode_frames(env, ids, args_list, None if signer is None else getattr(signer, "_backend", signer),
                                max_size)


def xadd_template(env: Envelope, signer: PayloadSigner | None, head: bytes, tail: bytes, expires: float | None, *,
                  max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Any:
    """A producer's single enqueue of one task name in one compiled call: the template's
    ``build(args, now)`` returns ``(task_id, command)``, the command being ``head``, the
    new id and the frame ``encode_frame`` makes of ``env`` with that id, ``args``,
    ``enqueued_at=now`` and ``expires_at=now + expires`` put in (RESP bulk strings), and
    ``tail``; or None for args the general path refuses (it raises the error).  ``env``
    has ``id=""``, ``args={}``, ``enqueued_at=0.0``, ``not_before`` and ``expires_at``
    None (ValueError otherwise)."""
    return _codec.xadd_template(env, None if signer is None else getattr(signer, "_backend", signer), head, tail,
                                expires, max_size)


def decode_frame(frame: bytes | memoryview, signer: PayloadSigner | None = None, *,
                 max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Envelope:
    """The envelope in ``frame``, its attempt and not_before taken from the delivery header.

    Checks the size before anything else, then the header; with a ``signer``
    the signature is verified before the body is decoded (unsigned frame,
    unknown key id, bad signature: SignatureError).  Without a signer a signed
    frame decodes and its signature is ignored.  Any malformed frame (truncated,
    oversized, bad magic, unknown version, wrong lengths, garbage or mistyped
    body) raises DecodeError, which is also a ValueError.
    """
    return _decode_frame(frame, None if signer is None else getattr(signer, "_backend", signer), max_size)


def read_header(frame: bytes | memoryview, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> FrameHeader:
    """The header of ``frame`` and a view of its body, without decoding it (DecodeError if malformed)."""
    return _codec.read_header(frame, max_size)


def with_delivery(frame: bytes | memoryview, *, attempt: int, not_before: float | None) -> bytes:
    """A copy of ``frame`` with a new delivery header; the signed body is untouched.

    DecodeError if ``frame`` is malformed, EncodeError if ``attempt`` is not in
    0..2**32-1 or ``not_before`` is not a float or None.
    """
    return _codec.with_delivery(frame, attempt, not_before)


def encode_body(env: Envelope) -> bytes:
    """msgpack of ``env``: the bytes a frame carries and its signature covers."""
    return _codec.encode_body(env)


def decode_body(body: bytes | memoryview) -> Envelope:
    """The envelope in a frame body (DecodeError if it is not one)."""
    return _codec.decode_body(body)


def encode_value(value: Any) -> bytes:
    """msgpack of a plain value, e.g. a task result (EncodeError if it cannot be encoded)."""
    return _codec.encode_value(value)


def decode_value(data: bytes | memoryview) -> Any:
    """A plain value from msgpack bytes (DecodeError if they are not msgpack)."""
    return _codec.decode_value(data)
