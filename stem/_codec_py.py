"""Frame codec in pure Python: the twin of ``stem._speedups.codec``.

Same API, byte-identical frames, the same errors with the same messages.  The
public face is ``stem.envelope`` (its docstring draws the frame layout).
"""

from __future__ import annotations

import os
import struct

import msgspec
import msgspec.structs

from stem.errors import DecodeError, EncodeError, SignatureError

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameCodec", "HEADER_SIZE", "MAGIC", "WIRE_VERSION", "XaddTemplate"]

MAGIC = b"\xa7S"
WIRE_VERSION = 1
HEADER_SIZE = 24
DEFAULT_MAX_FRAME_SIZE = 16 * 2**20

# magic, version, flags, key_len, sig_len, reserved, attempt, body_len, not_before
_HEADER = struct.Struct("<2sBBBBHIId")
_DELIVERY = struct.Struct("<IId")          # attempt, body_len, not_before at offset 8
_NONE = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000))[0]   # "no not_before"
_MAX_U32 = 0xFFFFFFFF
_tuple_new = tuple.__new__          # builds a NamedTuple without its Python-level __new__
_ENCODE_ERRORS = (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError)
# msgspec.DecodeError is a ValueError; invalid UTF-8 raises UnicodeDecodeError, also one.
_DECODE_ERRORS = (ValueError, RecursionError, OverflowError)


def _parse(frame, n: int, max_size: int):
    """Check the frame's structure (not its body); return its header fields."""
    if 0 <= max_size < n:
        raise DecodeError(f"frame is {n} bytes, more than max_size={max_size}")
    if n < HEADER_SIZE:
        raise DecodeError(f"truncated frame: {n} bytes, the header alone is {HEADER_SIZE}")
    magic, version, flags, key_len, sig_len, reserved, attempt, body_len, nb = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise DecodeError(f"not a stem frame: magic {magic!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {version} (this stem reads {WIRE_VERSION}); "
                          "run the same stem version on producers and workers")
    if flags or reserved:
        raise DecodeError(f"unsupported frame flags {flags:#x}/reserved {reserved:#x} "
                          "(written by a newer stem?)")
    if (key_len == 0) != (sig_len == 0):
        raise DecodeError(f"malformed frame: key id of {key_len} bytes with a signature of {sig_len}")
    body_off = HEADER_SIZE + key_len + sig_len
    expected = body_off + body_len
    if expected != n:
        raise DecodeError(f"frame length mismatch: the header describes {expected} bytes, got {n}"
                          + (" (truncated)" if n < expected else ""))
    return version, key_len, sig_len, attempt, body_len, None if nb != nb else nb, body_off


def _as_bytes_view(frame):
    """``frame`` itself when bytes, else a flat byte view of it (TypeError if not bytes-like)."""
    if type(frame) is bytes:
        return frame
    return memoryview(frame).cast("B")


def _attempt_of(attempt) -> int:
    if type(attempt) is not int and (not isinstance(attempt, int) or isinstance(attempt, bool)):
        raise EncodeError(f"attempt must be an int, got {type(attempt).__name__}")
    if not 0 <= attempt <= _MAX_U32:
        raise EncodeError(f"attempt must be in 0..4294967295, got {attempt!r}")
    return attempt


def _not_before_of(nb) -> float:
    if nb is None:
        return _NONE
    if isinstance(nb, float):
        return nb
    if isinstance(nb, int) and not isinstance(nb, bool):
        try:
            return float(nb)
        except OverflowError:
            raise EncodeError(f"not_before must be a float (seconds) or None, got {nb!r}") from None
    raise EncodeError(f"not_before must be a float (seconds) or None, got {type(nb).__name__}")


def _check_mapping(d, field: str, str_values: bool) -> None:
    if not isinstance(d, dict):
        raise EncodeError(f"{field} must be a dict, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(k, str):
            raise EncodeError(f"{field} keys must be str, got {k!r} ({type(k).__name__})")
        if str_values and not isinstance(v, str):
            raise EncodeError(f"{field} values must be str, got {v!r} for {k!r}")


class FrameCodec:
    """Encodes and decodes frames of ``envelope_type`` (a msgspec Struct).

    ``header_type`` builds the value :meth:`read_header` returns from
    ``(version, key_id, signature, attempt, not_before, body)``.
    A signer is anything with ``sign(body) -> (key_id, signature)`` and
    ``verify(key_id, signature, body)`` raising SignatureError.
    """

    __slots__ = ("_env_type", "_header_type", "_encode", "_decode", "_encode_value", "_decode_value")

    def __init__(self, envelope_type, header_type=tuple):
        self._env_type = envelope_type
        self._header_type = header_type
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(envelope_type).decode
        self._encode_value = msgspec.msgpack.Encoder().encode
        self._decode_value = msgspec.msgpack.Decoder().decode

    # ---- bodies and plain values ---------------------------------------------

    def encode_body(self, env) -> bytes:
        """msgpack of the envelope (the bytes a signature covers)."""
        if not isinstance(env, self._env_type):
            raise EncodeError(f"expected {self._env_type.__name__}, got {type(env).__name__}")
        _check_mapping(env.args, "args", False)
        _check_mapping(env.headers, "headers", True)
        _check_mapping(env.meta, "meta", False)
        try:
            return self._encode(env)
        except _ENCODE_ERRORS as exc:
            raise EncodeError(f"cannot encode task {env.name!r}: {exc}; args and meta take "
                              "None, bool, int, float, str, bytes, list, dict and datetime") from exc

    def decode_body(self, body):
        """Envelope from msgpack bytes (no frame header)."""
        try:
            return self._decode(body)
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"bad envelope body: {exc}") from exc

    def encode_value(self, value) -> bytes:
        """msgpack of a plain value (task results)."""
        try:
            return self._encode_value(value)
        except _ENCODE_ERRORS as exc:
            raise EncodeError(f"cannot encode value of type {type(value).__name__}: {exc}") from exc

    def decode_value(self, data):
        """A plain value from msgpack bytes."""
        try:
            return self._decode_value(data)
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"bad msgpack value: {exc}") from exc

    # ---- frames ---------------------------------------------------------------

    def encode_frame(self, env, signer=None, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
        """Frame bytes for ``env``, signed by ``signer`` when given."""
        body = self.encode_body(env)
        attempt = _attempt_of(env.attempt)
        nb = _not_before_of(env.not_before)
        if signer is None:
            kid = sig = b""
        else:
            kid, sig = signer.sign(body)
            if type(sig) is not bytes or not 1 <= len(sig) <= 255:
                raise SignatureError(f"{type(signer).__name__}.sign returned a bad signature")
            if type(kid) is not bytes or not 1 <= len(kid) <= 255:
                raise SignatureError(f"{type(signer).__name__}.sign returned a bad key id")
        body_len = len(body)
        if body_len > _MAX_U32:
            raise EncodeError(f"task body of {body_len} bytes does not fit a frame")
        total = HEADER_SIZE + len(kid) + len(sig) + body_len
        if total > max_size:
            raise EncodeError(f"frame would be {total} bytes, more than max_size={max_size}; "
                              "keep large payloads out of args (store them, pass a reference)")
        header = _HEADER.pack(MAGIC, WIRE_VERSION, 0, len(kid), len(sig), 0, attempt, body_len, nb)
        return b"".join((header, kid, sig, body))

    def encode_frames(self, env, ids: list, args_list: list, signer=None,
                      max_size: int = DEFAULT_MAX_FRAME_SIZE) -> list:
        """The frames of ``env`` with each (id, args) of ``zip(ids, args_list)`` put in,
        byte for byte what ``encode_frame`` makes of each such envelope.  (The
        compiled twin splices the bodies from pieces encoded once.)"""
        if len(args_list) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(args_list)} args")
        replace, encode = msgspec.structs.replace, self.encode_frame
        out = []
        for task_id, args in zip(ids, args_list):
            if not isinstance(task_id, str):
                raise EncodeError(f"task id must be a str, got {type(task_id).__name__}")
            out.append(encode(replace(env, id=task_id, args=args), signer, max_size))
        return out

    def xadd_template(self, env, signer, head: bytes, tail: bytes, expires,
                      max_size: int = DEFAULT_MAX_FRAME_SIZE) -> "XaddTemplate":
        """A single task's whole XADD, built per call by ``XaddTemplate.build``."""
        return XaddTemplate(self, env, signer, head, tail, expires, max_size)

    def decode_frame(self, frame, signer=None, max_size: int = DEFAULT_MAX_FRAME_SIZE):
        """Envelope from a frame: size, header, signature (when ``signer``), body."""
        frame = _as_bytes_view(frame)
        _, key_len, sig_len, attempt, _, nb, body_off = _parse(frame, len(frame), max_size)
        body = memoryview(frame)[body_off:]
        if signer is not None:
            if not key_len:
                raise SignatureError("frame is unsigned but this side requires signed frames; "
                                     "give the producer the same signing keys")
            signer.verify(bytes(frame[HEADER_SIZE:HEADER_SIZE + key_len]),
                          bytes(frame[HEADER_SIZE + key_len:body_off]), body)
        try:
            env = self._decode(body)
        except _DECODE_ERRORS as exc:
            raise DecodeError(f"bad envelope body: {exc}") from exc
        env.attempt = attempt
        env.not_before = nb
        return env

    def read_header(self, frame, max_size: int = DEFAULT_MAX_FRAME_SIZE):
        """The frame's header fields and a memoryview of its body, without decoding it."""
        frame = _as_bytes_view(frame)
        version, key_len, _, attempt, _, nb, body_off = _parse(frame, len(frame), max_size)
        return _tuple_new(self._header_type, (version, bytes(frame[HEADER_SIZE:HEADER_SIZE + key_len]),
                                              bytes(frame[HEADER_SIZE + key_len:body_off]), attempt, nb,
                                              memoryview(frame)[body_off:]))

    def with_delivery(self, frame, attempt, not_before) -> bytes:
        """Copy of ``frame`` with a new delivery header (attempt, not_before)."""
        attempt = _attempt_of(attempt)
        nb = _not_before_of(not_before)
        frame = _as_bytes_view(frame)
        body_len = _parse(frame, len(frame), -1)[4]
        return b"".join((frame[:8], _DELIVERY.pack(attempt, body_len, nb), frame[HEADER_SIZE:]))


def _new_task_id() -> str:
    """A uuid4 hex, as ``stem.ids.new_task_id`` makes it (that module sits a layer above)."""
    buf = bytearray(os.urandom(16))
    buf[6] = (buf[6] & 0x0F) | 0x40
    buf[8] = (buf[8] & 0x3F) | 0x80
    return buf.hex()


_TEMPLATE_FIELDS = ("id", "name", "args", "headers", "meta", "queue", "priority", "attempt", "max_retries",
                    "enqueued_at", "not_before", "expires_at")


class XaddTemplate:
    """One task name's single enqueue, resolved once: ``build(args, now)`` returns the
    task's id and its whole command -- ``head``, the id and the signed frame as RESP bulk
    strings, ``tail`` -- or None when ``args`` is anything the general path would refuse
    (the caller then takes that path, which raises its usual error).  The compiled twin
    splices the body from pieces encoded once; this one builds the envelope and frames it
    with ``encode_frame``, so both write ``encode_frame``'s bytes."""

    __slots__ = ("_codec", "_env", "_signer", "_head", "_tail", "_expires", "_max_size")

    def __init__(self, codec: FrameCodec, env, signer, head: bytes, tail: bytes, expires,
                 max_size: int = DEFAULT_MAX_FRAME_SIZE):
        if not isinstance(env, codec._env_type):
            raise TypeError(f"expected {codec._env_type.__name__}, got {type(env).__name__}")
        if tuple(env.__struct_fields__[:len(_TEMPLATE_FIELDS)]) != _TEMPLATE_FIELDS:
            raise ValueError("the envelope's fields are not the ones XaddTemplate splices")
        if (env.id != "" or env.args != {} or type(env.enqueued_at) is not float or env.enqueued_at != 0.0
                or env.attempt != 0 or env.not_before is not None or env.expires_at is not None):
            raise ValueError("a template envelope has id='', args={}, enqueued_at=0.0, attempt=0, "
                             "not_before=None and expires_at=None")
        if expires is not None and type(expires) is not float and type(expires) is not int:
            raise TypeError(f"expires must be seconds or None, got {expires!r}")
        if type(head) is not bytes or type(tail) is not bytes:
            raise TypeError("head and tail are bytes")
        codec.encode_body(env)
        self._codec, self._env, self._signer = codec, env, signer
        self._head, self._tail = head, tail
        self._expires = None if expires is None else float(expires)
        self._max_size = max_size

    def build(self, args, now: float, task_id=None):
        """``(task_id, command)``, or None (class docstring); a new id unless ``task_id``."""
        now = float(now)
        if args is None:
            args = {}
        elif type(args) is not dict or not all(isinstance(k, str) for k in args):
            return None
        if task_id is None:
            task_id = _new_task_id()
        elif not isinstance(task_id, str):
            raise TypeError(f"task_id must be a str, got {type(task_id).__name__}")
        env = msgspec.structs.replace(self._env, id=task_id, args=args, enqueued_at=now,
                                      expires_at=None if self._expires is None else now + self._expires)
        try:
            frame = self._codec.encode_frame(env, self._signer, self._max_size)
        except EncodeError:
            return None
        tid = task_id.encode()
        return task_id, b"%s$%d\r\n%s\r\n$1\r\nf\r\n$%d\r\n%s\r\n%s" % (
            self._head, len(tid), tid, len(frame), frame, self._tail)
