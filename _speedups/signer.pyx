# cython: language_level=3
"""HMAC-SHA256 signer in C: the compiled twin of ``stem._signer_py``.

Same API as the twin (``HmacSigner``, ``sha256``, ``hmac_sha256``,
``constant_time_equal``, ``SHA256_BACKEND``), byte-identical signatures.
The speed comes from ``sha256.h``: SHA-NI when the CPU has it, and each key's
ipad/opad midstates computed once, so one HMAC costs the message blocks plus
one.  ``_C_API`` (``signer_capi.h``, declared in ``signer_capi.pxd``) lets the compiled codec sign and
verify a frame in place.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcmp, memset

cimport cython

from signer_capi cimport STEM_SIGNER_CAPI_NAME, STEM_SIGNER_CAPI_VERSION, StemSignerCAPI

from stem.errors import ConfigurationError, SignatureError

cdef extern from "sha256.h":
    ctypedef void (*stem_sha256_blocks_fn)(uint32_t *state, const uint8_t *data, size_t nblocks) noexcept nogil
    ctypedef struct stem_hmac_key:
        uint32_t inner[8]
        uint32_t outer[8]
    stem_sha256_blocks_fn stem_sha256_blocks
    stem_sha256_blocks_fn stem_sha256_backend(const char *name) noexcept nogil
    const char *stem_sha256_select() noexcept nogil
    void stem_sha256_with(stem_sha256_blocks_fn blocks, const uint8_t *data, size_t len, uint8_t *out) noexcept nogil
    void stem_hmac_key_init(stem_hmac_key *hk, const uint8_t *key, size_t key_len) noexcept nogil
    void stem_hmac_sha256(const stem_hmac_key *hk, const uint8_t *msg, size_t len, uint8_t *out) noexcept nogil
    int stem_ct_equal(const uint8_t *a, const uint8_t *b, size_t n) noexcept nogil

__all__ = ["HmacSigner", "SHA256_BACKEND", "SHA256_BACKENDS", "SIGNATURE_SIZE", "constant_time_equal",
           "hmac_sha256", "sha256"]

SHA256_BACKEND = stem_sha256_select().decode("ascii")
# Every block function this CPU runs, fastest first.
SHA256_BACKENDS = tuple(name for name in ("sha-ni", "bmi2", "portable")
                        if stem_sha256_backend(name.encode()) != NULL)
SIGNATURE_SIZE = 32
cdef enum:
    _NOGIL_FROM = 65536  # bodies at least this large are hashed without the GIL


ctypedef struct _KeySlot:
    const char *kid
    Py_ssize_t kid_len
    stem_hmac_key hk


@cython.final
cdef class HmacSigner:
    """HMAC-SHA256 over a frame body with several accepted keys.

    ``keys`` maps key id (bytes, 1..255) to secret; ``active_key`` is the id
    :meth:`sign` uses (None: this signer only verifies).  The public
    ``stem.signing.PayloadSigner`` validates user input before it gets here.
    """

    cdef _KeySlot *_slots
    cdef Py_ssize_t _n
    cdef Py_ssize_t _active
    cdef tuple _kids            # keeps the bytes that _slots[i].kid points into
    cdef readonly bytes active_key

    algorithm = "hmac-sha256"
    signature_size = 32

    def __cinit__(self):
        self._slots = NULL
        self._n = 0
        self._active = -1

    def __init__(self, keys, active_key=None):
        cdef Py_buffer view
        cdef Py_ssize_t i
        items = list(dict(keys).items())
        if not items:
            raise ConfigurationError("HmacSigner needs at least one key")
        for kid, secret in items:
            if type(kid) is not bytes or type(secret) is not bytes:
                raise ConfigurationError("HmacSigner key ids and secrets must be bytes")
            if not 1 <= len(kid) <= 255:
                raise ConfigurationError(f"key id must be 1..255 bytes, got {len(kid)}")
            if not secret:
                raise ConfigurationError(f"key {kid!r} is empty")
        if self._slots != NULL:
            raise ConfigurationError("HmacSigner is already initialised")
        self._slots = <_KeySlot *>PyMem_Malloc(len(items) * sizeof(_KeySlot))
        if self._slots == NULL:
            raise MemoryError()
        self._kids = tuple(kid for kid, _ in items)
        self._n = len(items)
        for i, (kid, secret) in enumerate(items):
            self._slots[i].kid = PyBytes_AS_STRING(kid)
            self._slots[i].kid_len = PyBytes_GET_SIZE(kid)
            stem_hmac_key_init(&self._slots[i].hk, <const uint8_t *>PyBytes_AS_STRING(secret),
                               <size_t>PyBytes_GET_SIZE(secret))
        if active_key is not None:
            active_key = bytes(active_key)
            self._active = self._find(PyBytes_AS_STRING(active_key), PyBytes_GET_SIZE(active_key))
            if self._active < 0:
                raise ConfigurationError(f"active key {active_key!r} is not one of the keys")
            self.active_key = self._kids[self._active]

    def __dealloc__(self):
        if self._slots != NULL:
            memset(self._slots, 0, self._n * sizeof(_KeySlot))
            PyMem_Free(self._slots)
            self._slots = NULL

    def __repr__(self):
        return f"HmacSigner(key_ids={list(self._kids)!r}, active_key={self.active_key!r})"

    @property
    def key_ids(self):
        return self._kids

    @property
    def can_sign(self):
        return self._active >= 0

    cdef Py_ssize_t _find(self, const char *kid, Py_ssize_t kid_len) noexcept:
        cdef Py_ssize_t i
        for i in range(self._n):
            if self._slots[i].kid_len == kid_len and memcmp(self._slots[i].kid, kid, kid_len) == 0:
                return i
        return -1

    cdef int _sign_into(self, const unsigned char *body, Py_ssize_t n, unsigned char *sig) except -1:
        if self._active < 0:
            raise SignatureError("this signer has no active key, so it can only verify; "
                                 "set the active key (STEM_SIGNING_ACTIVE_KEY) to sign")
        if n >= _NOGIL_FROM:
            with nogil:
                stem_hmac_sha256(&self._slots[self._active].hk, body, <size_t>n, sig)
        else:
            stem_hmac_sha256(&self._slots[self._active].hk, body, <size_t>n, sig)
        return 0

    cdef int _verify(self, const unsigned char *kid, Py_ssize_t kid_len, const unsigned char *sig,
                     Py_ssize_t sig_len, const unsigned char *body, Py_ssize_t n) except -1:
        cdef unsigned char expected[32]
        cdef Py_ssize_t i = self._find(<const char *>kid, kid_len)
        if i < 0:
            raise SignatureError(
                f"frame signed with unknown key id {PyBytes_FromStringAndSize(<const char *>kid, kid_len)!r}; "
                f"accepted: {list(self._kids)!r} (add the key to the worker's signing keys)")
        if sig_len != 32:
            raise SignatureError(f"signature is {sig_len} bytes; hmac-sha256 signatures are 32")
        if n >= _NOGIL_FROM:
            with nogil:
                stem_hmac_sha256(&self._slots[i].hk, body, <size_t>n, expected)
        else:
            stem_hmac_sha256(&self._slots[i].hk, body, <size_t>n, expected)
        if not stem_ct_equal(expected, sig, 32):
            raise SignatureError(
                f"signature does not match the frame body (key id {self._kids[i]!r}): "
                "the frame was altered or signed with another secret")
        return 0

    def sign(self, body):
        """Return ``(key_id, signature)`` for ``body`` (bytes-like)."""
        cdef Py_buffer view
        cdef unsigned char sig[32]
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        try:
            self._sign_into(<const unsigned char *>view.buf, view.len, sig)
        finally:
            PyBuffer_Release(&view)
        return self.active_key, PyBytes_FromStringAndSize(<const char *>sig, 32)

    def verify(self, key_id, signature, body):
        """Return None when ``signature`` signs ``body`` under ``key_id``; raise SignatureError."""
        cdef Py_buffer kv, sv, bv
        PyObject_GetBuffer(key_id, &kv, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(signature, &sv, PyBUF_SIMPLE)
            try:
                PyObject_GetBuffer(body, &bv, PyBUF_SIMPLE)
                try:
                    self._verify(<const unsigned char *>kv.buf, kv.len, <const unsigned char *>sv.buf,
                                 sv.len, <const unsigned char *>bv.buf, bv.len)
                finally:
                    PyBuffer_Release(&bv)
            finally:
                PyBuffer_Release(&sv)
        finally:
            PyBuffer_Release(&kv)


def sha256(data):
    """SHA-256 of ``data`` with the block function picked for this CPU."""
    cdef Py_buffer view
    cdef uint8_t out[32]
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        stem_sha256_with(stem_sha256_blocks, <const uint8_t *>view.buf, <size_t>view.len, out)
    finally:
        PyBuffer_Release(&view)
    return PyBytes_FromStringAndSize(<const char *>out, 32)


cdef stem_sha256_blocks_fn _backend_named(str name) except NULL:
    cdef stem_sha256_blocks_fn fn = stem_sha256_backend(name.encode())
    if fn == NULL:
        raise ValueError(f"SHA-256 backend {name!r} is not available here; have {SHA256_BACKENDS}")
    return fn


def _sha256_with(str backend, data):
    """SHA-256 with the named block function (one of ``SHA256_BACKENDS``):
    lets the tests check every fallback on a machine that has SHA-NI."""
    cdef stem_sha256_blocks_fn fn = _backend_named(backend)
    cdef Py_buffer view
    cdef uint8_t out[32]
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        stem_sha256_with(fn, <const uint8_t *>view.buf, <size_t>view.len, out)
    finally:
        PyBuffer_Release(&view)
    return PyBytes_FromStringAndSize(<const char *>out, 32)


def _use_sha256_backend(str backend):
    """Switch every signer in this process to the named block function and
    return the previous one's name.  For benchmarks that emulate a CPU
    without SHA-NI (see benchmarks/README.md); key midstates do not change."""
    global _active_backend
    global stem_sha256_blocks
    fn = _backend_named(backend)
    previous, _active_backend = _active_backend, backend
    stem_sha256_blocks = fn
    return previous


_active_backend = SHA256_BACKEND


def hmac_sha256(key, data):
    """One-shot HMAC-SHA256 (RFC 2104), equal to ``hmac.digest(key, data, "sha256")``."""
    cdef Py_buffer kv, dv
    cdef stem_hmac_key hk
    cdef uint8_t out[32]
    PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
    try:
        stem_hmac_key_init(&hk, <const uint8_t *>kv.buf, <size_t>kv.len)
    finally:
        PyBuffer_Release(&kv)
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    try:
        stem_hmac_sha256(&hk, <const uint8_t *>dv.buf, <size_t>dv.len, out)
    finally:
        PyBuffer_Release(&dv)
    memset(&hk, 0, sizeof(hk))
    return PyBytes_FromStringAndSize(<const char *>out, 32)


def constant_time_equal(a, b):
    """``a == b`` for bytes-like values, in time that depends only on the length."""
    cdef Py_buffer av, bv
    cdef bint equal
    PyObject_GetBuffer(a, &av, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(b, &bv, PyBUF_SIMPLE)
        try:
            equal = av.len == bv.len and stem_ct_equal(<const uint8_t *>av.buf, <const uint8_t *>bv.buf,
                                                       <size_t>av.len)
        finally:
            PyBuffer_Release(&bv)
    finally:
        PyBuffer_Release(&av)
    return equal


# ---- C API for the compiled codec ------------------------------------------

cdef PyObject *_capi_hmac_sign(PyObject *signer, const unsigned char *body, Py_ssize_t n,
                               unsigned char *sig) except NULL:
    cdef HmacSigner s = <HmacSigner>signer
    s._sign_into(body, n, sig)
    return <PyObject *>s.active_key


cdef int _capi_hmac_verify(PyObject *signer, const unsigned char *kid, Py_ssize_t kid_len,
                           const unsigned char *sig, Py_ssize_t sig_len,
                           const unsigned char *body, Py_ssize_t n) except -1:
    return (<HmacSigner>signer)._verify(kid, kid_len, sig, sig_len, body, n)


cdef StemSignerCAPI _capi
_capi.version = STEM_SIGNER_CAPI_VERSION
_capi.hmac_type = <PyTypeObject *>HmacSigner
_capi.hmac_sign = _capi_hmac_sign
_capi.hmac_verify = _capi_hmac_verify
_C_API = PyCapsule_New(<void *>&_capi, STEM_SIGNER_CAPI_NAME, NULL)
