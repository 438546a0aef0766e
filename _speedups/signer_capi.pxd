# cython: language_level=3
# The signer's C API (signer_capi.h), declared once: signer.pyx fills the struct
# and exports it as the capsule STEM_SIGNER_CAPI_NAME, codec.pyx reads it to sign
# and verify a frame in place.  Both `from signer_capi cimport ...`.

from cpython.object cimport PyObject, PyTypeObject

cdef extern from "signer_capi.h":
    const char *STEM_SIGNER_CAPI_NAME
    int STEM_SIGNER_CAPI_VERSION
    int STEM_HMAC_SIZE
    ctypedef struct StemSignerCAPI:
        int version
        PyTypeObject *hmac_type
        PyObject *(*hmac_sign)(PyObject *, const unsigned char *, Py_ssize_t, unsigned char *) except NULL
        int (*hmac_verify)(PyObject *, const unsigned char *, Py_ssize_t, const unsigned char *,
                           Py_ssize_t, const unsigned char *, Py_ssize_t) except -1
