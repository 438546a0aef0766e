# cython: language_level=3
"""Frame codec in C: the compiled twin of ``stem._codec_py``.

Same API and byte-identical frames; the public face is ``stem.envelope``
(read its docstring for the frame layout).  A whole frame is encoded (and
signed) or verified (and decoded) in one call: the header is parsed and
written in C, HMAC-SHA256 runs in place through the signer's C API
(``signer_capi.h``, declared in ``signer_capi.pxd``) when the signer is the compiled ``HmacSigner``, and the
only allocations are msgspec's body and the output frame.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Check, PyDict_Next, PyDict_Size
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.bool cimport PyBool_Check
from cpython.long cimport PyLong_AsLongLong, PyLong_Check
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cimport cython

from signer_capi cimport STEM_SIGNER_CAPI_NAME, STEM_SIGNER_CAPI_VERSION, StemSignerCAPI

import os

import msgspec
import msgspec.structs

from stem.errors import DecodeError, EncodeError, SignatureError

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyDict_CheckExact(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)

cdef extern from "pthread.h":
    int pthread_atfork(void (*prepare)() noexcept nogil, void (*parent)() noexcept nogil,
                       void (*child)() noexcept nogil)

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameCodec", "HEADER_SIZE", "MAGIC", "WIRE_VERSION", "XaddTemplate"]

MAGIC = b"\xa7S"
WIRE_VERSION = 1
HEADER_SIZE = 24
DEFAULT_MAX_FRAME_SIZE = 16 * 2**20

cdef enum:
    _HEADER_SIZE = 24
    _MAGIC0 = 0xA7
    _MAGIC1 = 0x53       # "S"
    _VERSION = 1
    _MAX_SIG = 64        # largest signature the in-place path writes (HMAC: 32)

cdef uint64_t _NONE_BITS = 0x7FF8000000000000ULL   # quiet NaN: "no not_before"

# The compiled signer's C entry points, when it is built.
cdef const StemSignerCAPI *_signer_capi = NULL
try:
    from stem._speedups import signer as _signer_module
except ImportError:
    _signer_module = None
else:
    _signer_capi = <const StemSignerCAPI *>PyCapsule_GetPointer(_signer_module._C_API, STEM_SIGNER_CAPI_NAME)
    if _signer_capi.version != STEM_SIGNER_CAPI_VERSION:
        _signer_capi = NULL

_tuple_new = tuple.__new__          # builds a NamedTuple without its Python-level __new__
_ENCODE_ERRORS = (msgspec.EncodeError, TypeError, OverflowError, ValueError, RecursionError)
# msgspec.DecodeError is a ValueError; invalid UTF-8 raises UnicodeDecodeError, also one.
_DECODE_ERRORS = (ValueError, RecursionError, OverflowError)


# ---- little-endian fields ----------------------------------------------------

cdef inline void _put_u16(unsigned char *p, uint32_t v) noexcept:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)

cdef inline void _put_u32(unsigned char *p, uint32_t v) noexcept:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)

cdef inline uint32_t _get_u32(const unsigned char *p) noexcept:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline void _put_f64_bits(unsigned char *p, uint64_t u) noexcept:
    _put_u32(p, <uint32_t>u)
    _put_u32(p + 4, <uint32_t>(u >> 32))

cdef inline uint64_t _get_u64(const unsigned char *p) noexcept:
    return _get_u32(p) | (<uint64_t>_get_u32(p + 4) << 32)

cdef inline object _nb_from_bits(uint64_t u):
    cdef double d
    memcpy(&d, &u, 8)
    if d != d:
        return None
    return d


# ---- a cheap read-only view of the body ---------------------------------------

@cython.final
@cython.freelist(8)
cdef class _BodyView:
    """Exports bytes [start, start+len) of a frame through the buffer protocol.

    Cheaper than a memoryview slice (one small object from a free list, no
    release call) and as safe: it holds a reference to the frame object and
    keeps the frame's own buffer (e.g. a bytearray's) exported while alive.
    """
    cdef Py_buffer _frame           # holds a reference to the frame (``_frame.obj``)
    cdef Py_ssize_t _start
    cdef Py_ssize_t _len
    cdef bint _held

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <char *>self._frame.buf + self._start, self._len, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._frame)


cdef _BodyView _body_view(object frame, Py_ssize_t start, Py_ssize_t length):
    cdef _BodyView v = _BodyView.__new__(_BodyView)
    PyObject_GetBuffer(frame, &v._frame, PyBUF_SIMPLE)
    v._held = True
    v._start = start
    v._len = length
    return v


# ---- header ------------------------------------------------------------------

ctypedef struct _Header:
    uint32_t version
    Py_ssize_t key_len
    Py_ssize_t sig_len
    uint32_t attempt
    uint64_t not_before_bits
    Py_ssize_t body_off
    Py_ssize_t body_len


cdef int _parse(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_size, _Header *h) except -1:
    """Check the frame's structure (not its body) and fill ``h``."""
    cdef uint32_t flags, reserved
    cdef Py_ssize_t expected
    if max_size >= 0 and n > max_size:
        raise DecodeError(f"frame is {n} bytes, more than max_size={max_size}")
    if n < _HEADER_SIZE:
        raise DecodeError(f"truncated frame: {n} bytes, the header alone is {_HEADER_SIZE}")
    if p[0] != _MAGIC0 or p[1] != _MAGIC1:
        raise DecodeError(f"not a stem frame: magic {PyBytes_FromStringAndSize(<const char *>p, 2)!r}, "
                          f"expected {MAGIC!r}")
    h.version = p[2]
    if h.version != _VERSION:
        raise DecodeError(f"unsupported wire version {h.version} (this stem reads {_VERSION}); "
                          "run the same stem version on producers and workers")
    flags = p[3]
    reserved = p[6] | (<uint32_t>p[7] << 8)
    if flags != 0 or reserved != 0:
        raise DecodeError(f"unsupported frame flags {flags:#x}/reserved {reserved:#x} "
                          "(written by a newer stem?)")
    h.key_len = p[4]
    h.sig_len = p[5]
    if (h.key_len == 0) != (h.sig_len == 0):
        raise DecodeError(f"malformed frame: key id of {h.key_len} bytes with a signature of {h.sig_len}")
    h.attempt = _get_u32(p + 8)
    h.body_len = _get_u32(p + 12)
    h.not_before_bits = _get_u64(p + 16)
    h.body_off = _HEADER_SIZE + h.key_len + h.sig_len
    expected = h.body_off + h.body_len
    if expected != n:
        raise DecodeError(f"frame length mismatch: the header describes {expected} bytes, got {n}"
                          + (" (truncated)" if n < expected else ""))
    return 0


cdef int _get_frame(object frame, Py_buffer *view) except -1:
    if PyObject_GetBuffer(frame, view, PyBUF_SIMPLE) < 0:
        return -1
    return 0


cdef uint32_t _attempt_of(object attempt) except? 0xFFFFFFFF:
    cdef long long v
    if not PyLong_Check(attempt) or PyBool_Check(attempt):
        raise EncodeError(f"attempt must be an int, got {type(attempt).__name__}")
    try:
        v = PyLong_AsLongLong(attempt)
    except OverflowError:
        v = -1
    if v < 0 or v > 0xFFFFFFFF:
        raise EncodeError(f"attempt must be in 0..4294967295, got {attempt!r}")
    return <uint32_t>v


cdef uint64_t _not_before_bits(object nb) except? 0:
    cdef double d
    cdef uint64_t u
    if nb is None:
        return _NONE_BITS
    if PyFloat_Check(nb):
        d = PyFloat_AS_DOUBLE(nb)
    elif PyLong_Check(nb) and not PyBool_Check(nb):
        try:
            d = <double>nb
        except OverflowError:
            raise EncodeError(f"not_before must be a float (seconds) or None, got {nb!r}") from None
    else:
        raise EncodeError(f"not_before must be a float (seconds) or None, got {type(nb).__name__}")
    memcpy(&u, &d, 8)
    return u


cdef int _check_mapping(object d, str field, bint str_values) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject *k
    cdef PyObject *v
    if not PyDict_Check(d):
        raise EncodeError(f"{field} must be a dict, got {type(d).__name__}")
    while PyDict_Next(d, &pos, &k, &v):
        if not PyUnicode_Check(<object>k):
            raise EncodeError(f"{field} keys must be str, got {<object>k!r} ({type(<object>k).__name__})")
        if str_values and not PyUnicode_Check(<object>v):
            raise EncodeError(f"{field} values must be str, got {<object>v!r} for {<object>k!r}")
    return 0


cdef bytes _EMPTY_MAP = b"\x80"     # msgpack of {}


cdef struct _Scratch:
    unsigned char *data
    Py_ssize_t capacity


cdef int _scratch_reserve(_Scratch *s, Py_ssize_t need) except -1:
    cdef unsigned char *p
    if need <= s.capacity:
        return 0
    p = <unsigned char *>PyMem_Realloc(s.data, need * 2)
    if p == NULL:
        raise MemoryError()
    s.data = p
    s.capacity = need * 2
    return 0


cdef Py_ssize_t _str_header(unsigned char *out, Py_ssize_t n) noexcept:
    """The msgpack str header for ``n`` UTF-8 bytes, in its smallest form (as msgspec writes it)."""
    if n < 32:
        out[0] = <unsigned char>(0xA0 | n)
        return 1
    if n < 0x100:
        out[0] = 0xD9
        out[1] = <unsigned char>n
        return 2
    if n < 0x10000:
        out[0] = 0xDA
        out[1] = <unsigned char>(n >> 8)
        out[2] = <unsigned char>n
        return 3
    out[0] = 0xDB
    out[1] = <unsigned char>(n >> 24)
    out[2] = <unsigned char>(n >> 16)
    out[3] = <unsigned char>(n >> 8)
    out[4] = <unsigned char>n
    return 5


cdef bytes _frame(const unsigned char *body_p, Py_ssize_t body_len, object body, uint32_t attempt,
                  uint64_t nb_bits, object signer, Py_ssize_t max_size):
    """Sign ``body`` (``body_p``/``body_len``; ``body`` is the same bytes as an object, needed
    only for a signer without the C API) and frame it."""
    cdef unsigned char sig_buf[_MAX_SIG]
    cdef const unsigned char *sig_p = NULL
    cdef const unsigned char *kid_p = NULL
    cdef Py_ssize_t kid_len = 0, sig_len = 0, total
    cdef object kid = None, sig = None
    cdef PyObject *kid_ref
    cdef unsigned char *out_p
    cdef bytes out
    if signer is None:
        pass
    elif _signer_capi != NULL and Py_TYPE(signer) == _signer_capi.hmac_type:
        kid_ref = _signer_capi.hmac_sign(<PyObject *>signer, body_p, body_len, sig_buf)
        kid = <object>kid_ref
        sig_p = sig_buf
        sig_len = 32
    else:
        kid, sig = signer.sign(body)
        if type(sig) is not bytes or not 1 <= PyBytes_GET_SIZE(sig) <= 255:
            raise SignatureError(f"{type(signer).__name__}.sign returned a bad signature")
        sig_p = <const unsigned char *>PyBytes_AS_STRING(sig)
        sig_len = PyBytes_GET_SIZE(sig)
    if kid is not None:
        if type(kid) is not bytes or not 1 <= PyBytes_GET_SIZE(kid) <= 255:
            raise SignatureError(f"{type(signer).__name__}.sign returned a bad key id")
        kid_p = <const unsigned char *>PyBytes_AS_STRING(kid)
        kid_len = PyBytes_GET_SIZE(kid)
    if body_len > 0xFFFFFFFF:
        raise EncodeError(f"task body of {body_len} bytes does not fit a frame")
    total = _HEADER_SIZE + kid_len + sig_len + body_len
    if total > max_size:
        raise EncodeError(f"frame would be {total} bytes, more than max_size={max_size}; "
                          "keep large payloads out of args (store them, pass a reference)")
    out = PyBytes_FromStringAndSize(NULL, total)
    out_p = <unsigned char *>PyBytes_AS_STRING(out)
    out_p[0] = _MAGIC0
    out_p[1] = _MAGIC1
    out_p[2] = _VERSION
    out_p[3] = 0
    out_p[4] = <unsigned char>kid_len
    out_p[5] = <unsigned char>sig_len
    _put_u16(out_p + 6, 0)
    _put_u32(out_p + 8, attempt)
    _put_u32(out_p + 12, <uint32_t>body_len)
    _put_f64_bits(out_p + 16, nb_bits)
    out_p += _HEADER_SIZE
    if kid_len:
        memcpy(out_p, kid_p, kid_len)
        out_p += kid_len
        memcpy(out_p, sig_p, sig_len)
        out_p += sig_len
    memcpy(out_p, body_p, body_len)
    return out


# ---- task ids for the single-task template ----------------------------------------

cdef enum:
    _POOL_SIZE = 512     # random bytes fetched at once: 32 ids per os.urandom call

cdef unsigned char _pool[_POOL_SIZE]
cdef Py_ssize_t _pool_left = 0
cdef bint _pool_forked_hook = False
cdef const char *_HEX = b"0123456789abcdef"


cdef void _forget_pool() noexcept nogil:
    """pthread_atfork's child hook: a forked child never hands out its parent's unused bytes."""
    global _pool_left
    memset(_pool, 0, _POOL_SIZE)
    _pool_left = 0


cdef str _new_task_id():
    """A task id as ``stem.ids.new_task_id`` makes it (uuid4 hex, 122 random bits from
    os.urandom), from a pool of random bytes filled 32 ids at a time: one ``getrandom``
    syscall costs more than the rest of the id.  Each byte is used once and wiped; a
    forked child starts with an empty pool (``pthread_atfork``).  The GIL is held (the
    refill's os.urandom may drop it: a thread refilling at the same time only replaces
    the pool with fresh bytes)."""
    global _pool_left, _pool_forked_hook
    cdef unsigned char b[16]
    cdef unsigned char *at
    cdef unsigned char *out
    cdef bytes fresh
    cdef str s
    cdef int i
    if _pool_left < 16:
        if not _pool_forked_hook:
            if pthread_atfork(NULL, NULL, _forget_pool) != 0:
                raise MemoryError()
            _pool_forked_hook = True
        fresh = os.urandom(_POOL_SIZE)
        memcpy(_pool, PyBytes_AS_STRING(fresh), _POOL_SIZE)
        _pool_left = _POOL_SIZE
    at = _pool + (_POOL_SIZE - _pool_left)
    memcpy(b, at, 16)
    memset(at, 0, 16)
    _pool_left -= 16
    b[6] = (b[6] & 0x0F) | 0x40      # version 4
    b[8] = (b[8] & 0x3F) | 0x80      # RFC 4122 variant
    s = PyUnicode_New(32, 127)
    out = <unsigned char *>PyUnicode_DATA(s)
    for i in range(16):
        out[2 * i] = _HEX[b[i] >> 4]
        out[2 * i + 1] = _HEX[b[i] & 15]
    return s


cdef Py_ssize_t _put_decimal(unsigned char *out, Py_ssize_t v) noexcept:
    """``v`` (>= 0) in decimal at ``out``; its length."""
    cdef unsigned char tmp[24]
    cdef Py_ssize_t i = 0, j
    while True:
        tmp[i] = <unsigned char>(48 + v % 10)
        i += 1
        v //= 10
        if v == 0:
            break
    for j in range(i):
        out[j] = tmp[i - 1 - j]
    return i


cdef Py_ssize_t _decimal_len(Py_ssize_t v) noexcept:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline void _put_be_double(unsigned char *p, double d) noexcept:
    """msgpack float64: 0xcb and the IEEE bits, big endian (as msgspec writes every float)."""
    cdef uint64_t u
    cdef int i
    memcpy(&u, &d, 8)
    p[0] = 0xCB
    for i in range(8):
        p[1 + i] = <unsigned char>(u >> (56 - 8 * i))


_TEMPLATE_FIELDS = ("id", "name", "args", "headers", "meta", "queue", "priority", "attempt", "max_retries",
                    "enqueued_at", "not_before", "expires_at")


cdef class FrameCodec:
    """Encodes and decodes frames of ``envelope_type`` (a msgspec Struct).

    ``header_type`` builds the value :meth:`read_header` returns from
    ``(version, key_id, signature, attempt, not_before, body)``.
    A signer is anything with ``sign(body) -> (key_id, signature)`` and
    ``verify(key_id, signature, body)`` raising SignatureError.
    """

    cdef object _env_type
    cdef object _header_type
    cdef object _encode
    cdef object _decode
    cdef object _encode_value
    cdef object _decode_value

    def __init__(self, envelope_type, header_type=tuple):
        self._env_type = envelope_type
        self._header_type = header_type
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(envelope_type).decode
        self._encode_value = msgspec.msgpack.Encoder().encode
        self._decode_value = msgspec.msgpack.Decoder().decode

    # ---- bodies and plain values ---------------------------------------------

    cpdef bytes encode_body(self, env):
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

    def encode_value(self, value):
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

    def encode_frame(self, env, signer=None, Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
        """Frame bytes for ``env``, signed by ``signer`` when given."""
        cdef bytes body = self.encode_body(env)
        return _frame(<const unsigned char *>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), body,
                      _attempt_of(env.attempt), _not_before_bits(env.not_before), signer, max_size)

    def encode_frames(self, env, list ids, list args_list, signer=None,
                      Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
        """The frames of ``env`` with each (id, args) of ``zip(ids, args_list)`` put in,
        byte for byte what ``encode_frame`` makes of each such envelope.

        A producer's batch of one task name differs only in id and args, so the
        envelope is encoded once and every body is spliced from the encoded
        pieces in C (array header, id, name, args, the rest), then signed and
        framed: no Envelope object and no full msgspec encode per task."""
        cdef bytes tmpl, name_enc, args_enc
        cdef Py_ssize_t n = len(ids), i, k, name_len, tail_len, id_len, args_len, body_len, hdr_len
        cdef const unsigned char *t
        cdef const char *id_p
        cdef unsigned char id_hdr[5]
        cdef unsigned char *body_p
        cdef _Scratch scratch
        cdef uint32_t attempt
        cdef uint64_t nb_bits
        cdef object args, body_obj
        cdef list out
        if len(args_list) != n:
            raise ValueError(f"{n} ids for {len(args_list)} args")
        tmpl = self.encode_body(msgspec.structs.replace(env, id="", args={}))
        name_enc = self._encode(env.name)
        t = <const unsigned char *>PyBytes_AS_STRING(tmpl)
        name_len = PyBytes_GET_SIZE(name_enc)
        k = 3 if t[0] == 0xDC else 1     # array16 or fixarray header
        if (PyBytes_GET_SIZE(tmpl) < k + 2 + name_len or t[k] != 0xA0 or t[k + 1 + name_len] != 0x80
                or tmpl[k + 1:k + 1 + name_len] != name_enc):   # not the layout splicing assumes
            return [self.encode_frame(msgspec.structs.replace(env, id=i_, args=a_), signer, max_size)
                    for i_, a_ in zip(ids, args_list)]
        tail_len = PyBytes_GET_SIZE(tmpl) - (k + 2 + name_len)
        attempt = _attempt_of(env.attempt)
        nb_bits = _not_before_bits(env.not_before)
        out = [None] * n
        scratch.data = NULL
        scratch.capacity = 0
        try:
            for i in range(n):
                task_id = ids[i]
                if not PyUnicode_Check(task_id):
                    raise EncodeError(f"task id must be a str, got {type(task_id).__name__}")
                id_p = PyUnicode_AsUTF8AndSize(task_id, &id_len)
                hdr_len = _str_header(id_hdr, id_len)
                args = args_list[i]
                if PyDict_Check(args) and PyDict_Size(args) == 0:
                    args_enc = _EMPTY_MAP
                else:
                    _check_mapping(args, "args", False)
                    try:
                        args_enc = self._encode(args)
                    except _ENCODE_ERRORS as exc:
                        raise EncodeError(f"cannot encode task {env.name!r}: {exc}; args and meta take "
                                          "None, bool, int, float, str, bytes, list, dict and datetime") from exc
                args_len = PyBytes_GET_SIZE(args_enc)
                body_len = k + hdr_len + id_len + name_len + args_len + tail_len
                _scratch_reserve(&scratch, body_len)
                body_p = scratch.data
                memcpy(body_p, t, k)
                body_p += k
                memcpy(body_p, id_hdr, hdr_len)
                body_p += hdr_len
                memcpy(body_p, id_p, id_len)
                body_p += id_len
                memcpy(body_p, PyBytes_AS_STRING(name_enc), name_len)
                body_p += name_len
                memcpy(body_p, PyBytes_AS_STRING(args_enc), args_len)
                body_p += args_len
                memcpy(body_p, t + k + 2 + name_len, tail_len)
                body_obj = None
                if signer is not None and not (_signer_capi != NULL and Py_TYPE(signer) == _signer_capi.hmac_type):
                    body_obj = PyBytes_FromStringAndSize(<const char *>scratch.data, body_len)
                out[i] = _frame(scratch.data, body_len, body_obj, attempt, nb_bits, signer, max_size)
        finally:
            PyMem_Free(scratch.data)
        return out

    def xadd_template(self, env, signer, bytes head not None, bytes tail not None, expires,
                      Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
        """A single task's whole XADD, built per call by ``XaddTemplate.build``."""
        return XaddTemplate(self, env, signer, head, tail, expires, max_size)

    def decode_frame(self, frame, signer=None, Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
        """Envelope from a frame: size, header, signature (when ``signer``), body."""
        cdef Py_buffer view
        cdef _Header h
        cdef const unsigned char *p
        cdef object env, body
        _get_frame(frame, &view)
        try:
            p = <const unsigned char *>view.buf
            _parse(p, view.len, max_size, &h)
            if signer is not None:
                if h.key_len == 0:
                    raise SignatureError("frame is unsigned but this side requires signed frames; "
                                         "give the producer the same signing keys")
                if _signer_capi != NULL and Py_TYPE(signer) == _signer_capi.hmac_type:
                    _signer_capi.hmac_verify(<PyObject *>signer, p + _HEADER_SIZE, h.key_len,
                                             p + _HEADER_SIZE + h.key_len, h.sig_len,
                                             p + h.body_off, h.body_len)
                else:
                    signer.verify(
                        PyBytes_FromStringAndSize(<const char *>p + _HEADER_SIZE, h.key_len),
                        PyBytes_FromStringAndSize(<const char *>p + _HEADER_SIZE + h.key_len, h.sig_len),
                        memoryview(frame).cast("B")[h.body_off:])
            body = _body_view(frame, h.body_off, h.body_len)
            try:
                env = self._decode(body)
            except _DECODE_ERRORS as exc:
                raise DecodeError(f"bad envelope body: {exc}") from exc
        finally:
            PyBuffer_Release(&view)
        env.attempt = h.attempt
        env.not_before = _nb_from_bits(h.not_before_bits)
        return env

    def read_header(self, frame, Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
        """The frame's header fields and a memoryview of its body, without decoding it."""
        cdef Py_buffer view
        cdef _Header h
        cdef const unsigned char *p
        _get_frame(frame, &view)
        try:
            p = <const unsigned char *>view.buf
            _parse(p, view.len, max_size, &h)
            key_id = PyBytes_FromStringAndSize(<const char *>p + _HEADER_SIZE, h.key_len)
            signature = PyBytes_FromStringAndSize(<const char *>p + _HEADER_SIZE + h.key_len, h.sig_len)
        finally:
            PyBuffer_Release(&view)
        body = memoryview(frame) if type(frame) is bytes else memoryview(frame).cast("B")
        return _tuple_new(self._header_type, (h.version, key_id, signature, h.attempt,
                                              _nb_from_bits(h.not_before_bits), body[h.body_off:]))

    def with_delivery(self, frame, attempt, not_before):
        """Copy of ``frame`` with a new delivery header (attempt, not_before)."""
        cdef Py_buffer view
        cdef _Header h
        cdef uint32_t att = _attempt_of(attempt)
        cdef uint64_t nb_bits = _not_before_bits(not_before)
        cdef bytes out
        cdef unsigned char *out_p
        _get_frame(frame, &view)
        try:
            _parse(<const unsigned char *>view.buf, view.len, -1, &h)
            out = PyBytes_FromStringAndSize(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        out_p = <unsigned char *>PyBytes_AS_STRING(out)
        _put_u32(out_p + 8, att)
        _put_f64_bits(out_p + 16, nb_bits)
        return out


@cython.final
cdef class XaddTemplate:
    """One task name's single enqueue, resolved once: ``build(args, now)`` returns the
    task's id and its whole command -- ``head``, the id and the signed frame as RESP bulk
    strings (``$<n>\\r\\n<id>\\r\\n$1\\r\\nf\\r\\n$<n>\\r\\n<frame>\\r\\n``), ``tail``
    -- in one call, or None when ``args`` is anything the general path would refuse
    (not None or a dict with str keys, a value msgpack cannot carry, a frame over
    ``max_size``): the caller then takes that path, which raises its usual error.

    ``env`` is the envelope every task of the template shares, with ``id=""``,
    ``args={}``, ``enqueued_at=0.0``, ``not_before=None`` and ``expires_at=None``;
    ``build`` puts in the id, the args, ``enqueued_at=now`` and
    ``expires_at=now + expires`` (when ``expires`` is not None).  The body is spliced
    from the other fields' msgpack encoded once here (an array's encoding is its
    header and its elements', and msgspec writes every float as a float64), and this
    constructor checks that the pieces make exactly what msgspec writes for ``env``;
    the bytes are ``encode_frame``'s (the pure twin builds the envelope and calls it).
    """

    cdef bytes _head, _tail, _arr, _name, _mid, _rest
    cdef object _encode
    cdef object _signer
    cdef bint _capi
    cdef bint _has_expires
    cdef double _expires
    cdef Py_ssize_t _max_size

    def __init__(self, FrameCodec codec, env, signer, bytes head not None, bytes tail not None, expires,
                 Py_ssize_t max_size=DEFAULT_MAX_FRAME_SIZE):
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
        body = codec.encode_body(env)
        parts = [codec._encode(v) for v in msgspec.structs.astuple(env)]
        arr = body[:len(body) - sum(len(p) for p in parts)]
        if arr + b"".join(parts) != body or parts[9][:1] != b"\xcb" or len(parts[9]) != 9:
            raise ValueError("msgspec does not write this envelope as the splice assumes")
        self._head, self._tail = head, tail
        self._arr, self._name = arr, parts[1]
        self._mid = b"".join(parts[3:9])
        self._rest = b"".join(parts[12:])
        self._encode = codec._encode
        self._signer = signer
        self._capi = (signer is not None and _signer_capi != NULL
                      and Py_TYPE(signer) == _signer_capi.hmac_type)
        self._has_expires = expires is not None
        self._expires = 0.0 if expires is None else float(expires)
        self._max_size = max_size

    def build(self, args, double now, task_id=None):
        """``(task_id, command)``, or None (class docstring); a new id unless ``task_id``."""
        cdef bytes args_enc, out
        cdef Py_ssize_t pos = 0, id_len, args_len, body_len, frame_len, total, kid_len = 0, sig_len = 0, n
        cdef PyObject *k
        cdef PyObject *v
        cdef const char *id_p
        cdef unsigned char small[1024]
        cdef unsigned char *body_p = small
        cdef unsigned char *w
        cdef unsigned char *o
        cdef unsigned char sig_buf[_MAX_SIG]
        cdef const unsigned char *kid_p = NULL
        cdef const unsigned char *sig_p = NULL
        cdef object kid = None, sig = None, body_obj
        cdef PyObject *kid_ref
        if args is None:
            args_enc = _EMPTY_MAP
        elif PyDict_CheckExact(args):
            if PyDict_Size(args) == 0:
                args_enc = _EMPTY_MAP
            else:
                while PyDict_Next(args, &pos, &k, &v):
                    if not PyUnicode_Check(<object>k):
                        return None
                try:
                    args_enc = self._encode(args)
                except _ENCODE_ERRORS:
                    return None
        else:
            return None
        if task_id is None:
            task_id = _new_task_id()
        elif not PyUnicode_Check(task_id):
            raise TypeError(f"task_id must be a str, got {type(task_id).__name__}")
        id_p = PyUnicode_AsUTF8AndSize(task_id, &id_len)
        args_len = PyBytes_GET_SIZE(args_enc)
        body_len = (PyBytes_GET_SIZE(self._arr) + 5 + id_len + PyBytes_GET_SIZE(self._name) + args_len
                    + PyBytes_GET_SIZE(self._mid) + 9 + 1 + (9 if self._has_expires else 1)
                    + PyBytes_GET_SIZE(self._rest))
        if body_len > 1024:
            body_p = <unsigned char *>PyMem_Realloc(NULL, body_len)
            if body_p == NULL:
                raise MemoryError()
        try:
            w = body_p
            n = PyBytes_GET_SIZE(self._arr)
            memcpy(w, PyBytes_AS_STRING(self._arr), n)
            w += n
            w += _str_header(w, id_len)
            memcpy(w, id_p, id_len)
            w += id_len
            n = PyBytes_GET_SIZE(self._name)
            memcpy(w, PyBytes_AS_STRING(self._name), n)
            w += n
            memcpy(w, PyBytes_AS_STRING(args_enc), args_len)
            w += args_len
            n = PyBytes_GET_SIZE(self._mid)
            memcpy(w, PyBytes_AS_STRING(self._mid), n)
            w += n
            _put_be_double(w, now)
            w += 9
            w[0] = 0xC0                       # not_before: None
            w += 1
            if self._has_expires:
                _put_be_double(w, now + self._expires)
                w += 9
            else:
                w[0] = 0xC0
                w += 1
            n = PyBytes_GET_SIZE(self._rest)
            memcpy(w, PyBytes_AS_STRING(self._rest), n)
            w += n
            body_len = w - body_p
            signer = self._signer
            if signer is None:
                pass
            elif self._capi:
                kid_ref = _signer_capi.hmac_sign(<PyObject *>signer, body_p, body_len, sig_buf)
                kid = <object>kid_ref
                sig_p = sig_buf
                sig_len = 32
            else:
                body_obj = PyBytes_FromStringAndSize(<const char *>body_p, body_len)
                kid, sig = signer.sign(body_obj)
                if type(sig) is not bytes or not 1 <= PyBytes_GET_SIZE(sig) <= 255:
                    raise SignatureError(f"{type(signer).__name__}.sign returned a bad signature")
                sig_p = <const unsigned char *>PyBytes_AS_STRING(sig)
                sig_len = PyBytes_GET_SIZE(sig)
            if kid is not None:
                if type(kid) is not bytes or not 1 <= PyBytes_GET_SIZE(kid) <= 255:
                    raise SignatureError(f"{type(signer).__name__}.sign returned a bad key id")
                kid_p = <const unsigned char *>PyBytes_AS_STRING(kid)
                kid_len = PyBytes_GET_SIZE(kid)
            frame_len = _HEADER_SIZE + kid_len + sig_len + body_len
            if body_len > 0xFFFFFFFF or frame_len > self._max_size:
                return None
            total = (PyBytes_GET_SIZE(self._head) + 1 + _decimal_len(id_len) + 2 + id_len + 10
                     + _decimal_len(frame_len) + 2 + frame_len + 2 + PyBytes_GET_SIZE(self._tail))
            out = PyBytes_FromStringAndSize(NULL, total)
            o = <unsigned char *>PyBytes_AS_STRING(out)
            w = o
            n = PyBytes_GET_SIZE(self._head)
            memcpy(w, PyBytes_AS_STRING(self._head), n)
            w += n
            w[0] = 36                           # $<id length>\r\n<id>\r\n
            w += 1
            w += _put_decimal(w, id_len)
            memcpy(w, b"\r\n", 2)
            w += 2
            memcpy(w, id_p, id_len)
            w += id_len
            memcpy(w, b"\r\n$1\r\nf\r\n$", 10)  # the field name "f", then $<frame length>
            w += 10
            w += _put_decimal(w, frame_len)
            memcpy(w, b"\r\n", 2)
            w += 2
            w[0] = _MAGIC0
            w[1] = _MAGIC1
            w[2] = _VERSION
            w[3] = 0
            w[4] = <unsigned char>kid_len
            w[5] = <unsigned char>sig_len
            _put_u16(w + 6, 0)
            _put_u32(w + 8, 0)                   # attempt
            _put_u32(w + 12, <uint32_t>body_len)
            _put_f64_bits(w + 16, _NONE_BITS)    # not_before: none
            w += _HEADER_SIZE
            if kid_len:
                memcpy(w, kid_p, kid_len)
                w += kid_len
                memcpy(w, sig_p, sig_len)
                w += sig_len
            memcpy(w, body_p, body_len)
            w += body_len
            memcpy(w, b"\r\n", 2)
            w += 2
            n = PyBytes_GET_SIZE(self._tail)
            memcpy(w, PyBytes_AS_STRING(self._tail), n)
            w += n
        finally:
            if body_p != small:
                PyMem_Free(body_p)
        return task_id, out
