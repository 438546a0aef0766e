# cython: language_level=3
"""RESP request packing in C: the compiled twin of ``stem._resp_py`` (same API,
byte-identical output).  One growing C buffer per batch, arguments copied
straight from the bytes/str objects, integers formatted in C."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EBADF, EINTR, errno
from libc.string cimport memchr, memcmp, memcpy, strerror

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from "unistd.h" nogil:
    ssize_t write(int fd, const void* buf, size_t n)
    ssize_t read(int fd, void* buf, size_t n)

__all__ = ["command_keys", "exchange", "pack_command", "pack_commands", "pack_xadds", "scan_replies"]


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


def pack_xadds(key, list task_ids, list frames, priority, vt_ms) -> bytes:
    """``XADD key * t <id> f <frame> p <priority> v <vt_ms>`` for each (id, frame) pair,
    as one buffer: a batch of one lane as ``enqueue_many`` publishes it, without
    a command tuple per task.  Same bytes as ``pack_commands`` of those commands."""
    cdef Buf b, head, tail
    cdef Py_ssize_t i, n = len(task_ids)
    if len(frames) != n:
        raise ValueError(f"{n} task ids for {len(frames)} frames")
    b.data = head.data = tail.data = NULL
    b.length = head.length = tail.length = 0
    b.capacity = head.capacity = tail.capacity = 0
    try:
        _put_header(&head, 42, 11)
        for a in (b"XADD", key, b"*", b"t"):
            _put_arg(&head, a)
        for a in (b"p", priority, b"v", vt_ms):
            _put_arg(&tail, a)
        for i in range(n):
            _put(&b, head.data, head.length)
            _put_arg(&b, task_ids[i])
            _put_bulk(&b, "f", 1)
            _put_arg(&b, frames[i])
            _put(&b, tail.data, tail.length)
        return PyBytes_FromStringAndSize(b.data, b.length)
    finally:
        PyMem_Free(b.data)
        PyMem_Free(head.data)
        PyMem_Free(tail.data)


cdef Py_ssize_t _line_end(const char* p, Py_ssize_t pos, Py_ssize_t end) noexcept:
    """Index of the "\\r" ending the line that starts at pos, or -1 when it is not all there."""
    cdef const char* nl = <const char*> memchr(p + pos, 10, end - pos)
    if nl == NULL:
        return -1
    if nl == p + pos or (nl - 1)[0] != 13:
        return -2
    return nl - 1 - p


cdef long long _line_int(const char* p, Py_ssize_t start, Py_ssize_t stop) except? -3:
    cdef long long v = 0
    cdef bint neg = False
    cdef Py_ssize_t i = start
    if i < stop and p[i] == 45:
        neg = True
        i += 1
    if i == stop:
        raise ValueError("bad RESP reply: a length without digits")
    while i < stop:
        if not 48 <= p[i] <= 57:
            raise ValueError("bad RESP reply: a length with a non-digit")
        v = v * 10 + (p[i] - 48)
        i += 1
    return -v if neg else v


cdef Py_ssize_t _skip_reply(const char* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* err_start,
                            Py_ssize_t* err_stop) except -2:
    """The index just past the reply at pos, or -1 when it is not all in p[pos:end].  For an
    error reply, err_start/err_stop get its message's bounds."""
    cdef Py_ssize_t cr, stop
    cdef long long n, i
    cdef char kind
    if pos >= end:
        return -1
    kind = p[pos]
    cr = _line_end(p, pos + 1, end)
    if cr == -1:
        return -1
    if cr == -2:
        raise ValueError("bad RESP reply: a line not ended by CRLF")
    stop = cr + 2
    if kind in b"+:_,#(":
        return stop
    if kind == 45:                      # '-': an error reply
        if err_start[0] < 0:
            err_start[0] = pos + 1
            err_stop[0] = cr
        return stop
    if kind in b"$=!":                  # bulk string (RESP3: verbatim, bulk error)
        n = _line_int(p, pos + 1, cr)
        if n < 0:
            return stop
        if end - stop < n + 2:
            return -1
        if kind == 33 and err_start[0] < 0:   # '!'
            err_start[0] = stop
            err_stop[0] = stop + n
        return stop + n + 2
    if kind in b"*~>%":                 # aggregates (RESP3 maps hold 2n replies)
        n = _line_int(p, pos + 1, cr)
        if kind == 37:
            n *= 2
        i = 0
        while i < n:
            stop = _skip_reply(p, stop, end, err_start, err_stop)
            if stop == -1:
                return -1
            i += 1
        return stop
    raise ValueError(f"bad RESP reply: unknown type byte {kind!r}")


def scan_replies(buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t want):
    """Step over up to ``want`` complete replies in ``buf[pos:end]`` without building them.

    Returns ``(pos, count, error)``: the index after the last complete reply,
    how many were complete, and the message of the first error reply among
    them as ``(index, bytes)`` (index counted from this call's first reply),
    or None.  A reply cut at ``end`` is left for the next call."""
    cdef Py_buffer view
    cdef Py_ssize_t count = 0, nxt, err_start, err_stop
    cdef object error = None
    cdef const char* p
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if not 0 <= pos <= end <= view.len:
            raise ValueError(f"bad bounds {pos}:{end} for a buffer of {view.len} bytes")
        p = <const char*> view.buf
        while count < want:
            err_start = -1
            nxt = _skip_reply(p, pos, end, &err_start, &err_stop)
            if nxt == -1:
                break
            if err_start >= 0 and error is None:
                error = (count, PyBytes_FromStringAndSize(p + err_start, err_stop - err_start))
            pos = nxt
            count += 1
    finally:
        PyBuffer_Release(&view)
    return pos, count, error


cdef bint _is_script_call(const char* p, Py_ssize_t n) noexcept:
    """EVAL, EVALSHA, EVAL_RO, EVALSHA_RO, FCALL or FCALL_RO, in any case."""
    cdef char u[10]
    cdef Py_ssize_t i
    if n < 4 or n > 10:
        return False
    for i in range(n):
        u[i] = p[i] - 32 if 97 <= p[i] <= 122 else p[i]
    if n == 4:
        return memcmp(u, b"EVAL", 4) == 0
    if n == 5:
        return memcmp(u, b"FCALL", 5) == 0
    if n == 7:
        return memcmp(u, b"EVALSHA", 7) == 0 or memcmp(u, b"EVAL_RO", 7) == 0
    if n == 8:
        return memcmp(u, b"FCALL_RO", 8) == 0
    if n == 10:
        return memcmp(u, b"EVALSHA_RO", 10) == 0
    return False


def command_keys(buf):
    """``(end, name, key)`` for each command of a packed pipeline (``pack_commands``): the
    index just past it, its name as sent, and the key that routes it on a Redis Cluster --
    the first key of a script call (EVAL*, FCALL*; None without keys), else the first
    argument (None for a one-word command)."""
    cdef Py_buffer view
    cdef const char* p
    cdef Py_ssize_t pos = 0, end, cr, s, argc, i, n
    cdef Py_ssize_t starts[4]
    cdef Py_ssize_t lens[4]
    cdef list out = []
    cdef object key
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const char*> view.buf
        end = view.len
        while pos < end:
            if p[pos] != 42:   # '*'
                raise ValueError(f"not a packed Redis command at byte {pos}")
            cr = _line_end(p, pos + 1, end)
            if cr < 0:
                raise ValueError("a packed Redis command cut short")
            argc = _line_int(p, pos + 1, cr)
            if argc < 1:
                raise ValueError("an empty packed Redis command")
            pos = cr + 2
            for i in range(argc):
                if pos >= end or p[pos] != 36:   # '$'
                    raise ValueError(f"not a bulk string argument at byte {pos}")
                cr = _line_end(p, pos + 1, end)
                if cr < 0:
                    raise ValueError("a packed Redis command cut short")
                n = _line_int(p, pos + 1, cr)
                s = cr + 2
                if n < 0 or s + n + 2 > end:
                    raise ValueError("a packed Redis command cut short")
                if i < 4:
                    starts[i] = s
                    lens[i] = n
                pos = s + n + 2
            if _is_script_call(p + starts[0], lens[0]):
                if argc > 3 and not (lens[2] == 1 and p[starts[2]] == 48):
                    key = PyBytes_FromStringAndSize(p + starts[3], lens[3])
                else:
                    key = None
            elif argc > 1:
                key = PyBytes_FromStringAndSize(p + starts[1], lens[1])
            else:
                key = None
            out.append((pos, PyBytes_FromStringAndSize(p + starts[0], lens[0]), key))
    finally:
        PyBuffer_Release(&view)
    return out


cdef enum:
    _EXCHANGE_READ = 512     # one bulk reply (an XADD's entry id) fits many times over


cdef int _signal_check() except -1:
    """After EINTR: run the signal handlers (their exception goes up), then the caller retries."""
    if PyErr_CheckSignals() < 0:
        return -1
    return 0


def exchange(sock, bytes packed not None, feed):
    """One round trip on a blocking socket (``sock``: anything with ``fileno()``) whose
    timeouts the kernel keeps (``SO_SNDTIMEO``/``SO_RCVTIMEO``): write all of ``packed``
    (one command), read until its one reply is whole, and return the reply's payload
    when it is a bulk string (an XADD's entry id) and nothing more arrived.  Anything
    else -- an error reply, another type, bytes past the reply, a reply longer than
    the read buffer -- is passed as read to ``feed`` (a hiredis ``Reader.feed``) and
    None is returned: the caller reads the reply from its reader.  The GIL is released
    around each ``write``/``read``; EINTR runs the signal handlers and retries (PEP 475);
    any other failure raises ``OSError`` from errno (``BlockingIOError`` when a kernel
    timeout expired), and end of file raises ``ConnectionError``."""
    cdef const char* p = PyBytes_AS_STRING(packed)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(packed), sent = 0, got = 0, end, cr
    cdef ssize_t r
    cdef char buf[_EXCHANGE_READ]
    cdef int fd = -1 if sock is None else sock if type(sock) is int else sock.fileno()
    cdef long long length
    cdef Py_ssize_t err_start = -1, err_stop = -1
    cdef int err = 0
    if fd < 0:                         # a socket closed (or dropped: None) under its connection
        raise OSError(EBADF, strerror(EBADF).decode())
    while sent < n:
        with nogil:
            r = write(fd, p + sent, n - sent)
            err = errno if r < 0 else 0    # read before the GIL is taken again
        if r < 0:
            if err == EINTR:
                _signal_check()
                continue
            raise OSError(err, strerror(err).decode())   # its subclass: BlockingIOError for EAGAIN
        sent += r
    while True:
        with nogil:
            r = read(fd, buf + got, _EXCHANGE_READ - got)
            err = errno if r < 0 else 0
        if r < 0:
            if err == EINTR:
                _signal_check()
                continue
            raise OSError(err, strerror(err).decode())
        if r == 0:
            raise ConnectionError("Connection closed by server.")
        got += r
        try:
            end = _skip_reply(buf, 0, got, &err_start, &err_stop)
        except ValueError:
            end = -2                   # not RESP: hiredis says what is wrong
        if end == -1 and got < _EXCHANGE_READ:
            continue                   # the reply is not whole yet
        if end == got and buf[0] == 36:   # '$': one bulk string, nothing after it
            cr = _line_end(buf, 1, got)
            length = _line_int(buf, 1, cr)
            if length >= 0:
                return PyBytes_FromStringAndSize(buf + cr + 2, <Py_ssize_t>length)
        feed(PyBytes_FromStringAndSize(buf, got))
        return None
