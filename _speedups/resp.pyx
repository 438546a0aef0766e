# cython: language_level=3
"""RESP request packing in C: the compiled twin of ``stem._resp_py`` (same API,
byte-identical output).  One growing C buffer per batch, arguments copied
straight from the bytes/str objects, integers formatted in C."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcpy

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

__all__ = ["pack_command", "pack_commands"]


cdef struct Buf:
    char* data
    Py_ssize_t length
    Py_ssize_t capacity


cdef int _reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.length + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.capacity:
        return 0
    cap = b.capacity * 2 if b.capacity else 4096
    while cap < need:
        cap *= 2
    p = <char*> PyMem_Realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.capacity = cap
    return 0


cdef int _put(Buf* b, const char* s, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.data + b.length, s, n)
    b.length += n
    return 0


cdef Py_ssize_t _format_int(char* out, long long v) noexcept:
    """Decimal digits of v into out (at least 21 bytes); returns the length."""
    cdef char tmp[24]
    cdef int i = 0, j
    cdef unsigned long long u
    cdef bint neg = v < 0
    if neg:
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        tmp[i] = <char>(48 + u % 10)
        i += 1
        u //= 10
        if u == 0:
            break
    j = 0
    if neg:
        out[0] = 45
        j = 1
    while i > 0:
        i -= 1
        out[j] = tmp[i]
        j += 1
    return j


cdef int _put_header(Buf* b, char kind, Py_ssize_t n) except -1:
    cdef char tmp[32]
    cdef Py_ssize_t k
    tmp[0] = kind
    k = 1 + _format_int(tmp + 1, n)
    tmp[k] = 13
    tmp[k + 1] = 10
    return _put(b, tmp, k + 2)


cdef int _put_bulk(Buf* b, const char* s, Py_ssize_t n) except -1:
    _put_header(b, 36, n)          # '$'
    _reserve(b, n + 2)
    memcpy(b.data + b.length, s, n)
    b.data[b.length + n] = 13
    b.data[b.length + n + 1] = 10
    b.length += n + 2
    return 0


cdef int _put_arg(Buf* b, object a) except -1:
    cdef Py_ssize_t n
    cdef const char* s
    cdef char digits[32]
    cdef int overflow = 0
    cdef long long v
    cdef Py_buffer view
    t = type(a)
    if t is bytes:
        return _put_bulk(b, PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a))
    if t is str:
        s = PyUnicode_AsUTF8AndSize(a, &n)
        return _put_bulk(b, s, n)
    if t is int:
        v = PyLong_AsLongLongAndOverflow(a, &overflow)
        if overflow == 0:
            n = _format_int(digits, v)
            return _put_bulk(b, digits, n)
        enc = b"%d" % a
        return _put_bulk(b, PyBytes_AS_STRING(enc), PyBytes_GET_SIZE(enc))
    if t is float:
        enc = repr(a).encode()
        return _put_bulk(b, PyBytes_AS_STRING(enc), PyBytes_GET_SIZE(enc))
    if t is bytearray or t is memoryview:
        PyObject_GetBuffer(a, &view, PyBUF_SIMPLE)
        try:
            _put_bulk(b, <const char*> view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0
    raise TypeError(f"cannot send a {t.__name__} to Redis (bytes, str, int or float)")


def pack_commands(commands) -> bytes:
    """One buffer holding every command of ``commands``, in order."""
    cdef Buf b
    b.data = NULL
    b.length = 0
    b.capacity = 0
    try:
        for cmd in commands:
            if type(cmd) is not tuple and type(cmd) is not list:
                cmd = tuple(cmd)
            if not cmd:
                raise ValueError("an empty Redis command")
            _put_header(&b, 42, len(cmd))   # '*'
            for a in cmd:
                _put_arg(&b, a)
        return PyBytes_FromStringAndSize(b.data, b.length)
    finally:
        PyMem_Free(b.data)


def pack_command(*args) -> bytes:
    return pack_commands((args,))
