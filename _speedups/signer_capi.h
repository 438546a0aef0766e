/* The C entry points stem._speedups.signer exports to stem._speedups.codec.
 *
 * The codec imports the signer module and reads the capsule
 * "stem._speedups.signer._C_API" (the pattern of CPython's datetime CAPI), so
 * a compiled codec signs and verifies a frame in place, without building the
 * (key id, signature) tuple and bytes objects of the Python-level API.  A codec
 * built without the signer (or given any other signer object) falls back to
 * the Python methods sign()/verify().  Cython sees this header through
 * signer_capi.pxd, the one declaration both .pyx files cimport.
 */
#ifndef STEM_SIGNER_CAPI_H
#define STEM_SIGNER_CAPI_H

#include <Python.h>

#define STEM_SIGNER_CAPI_NAME "stem._speedups.signer._C_API"
#define STEM_SIGNER_CAPI_VERSION 1
#define STEM_HMAC_SIZE 32

typedef struct {
    int version;              /* STEM_SIGNER_CAPI_VERSION */
    PyTypeObject *hmac_type;  /* exact type the two functions accept */
    /* Sign `body` with the active key: write STEM_HMAC_SIZE bytes to `sig`,
     * return the active key id (a borrowed bytes object), or NULL with an
     * exception set. */
    PyObject *(*hmac_sign)(PyObject *signer, const unsigned char *body, Py_ssize_t len,
                           unsigned char *sig);
    /* 0 when `sig` is the HMAC of `body` under key `kid`; -1 with
     * SignatureError set otherwise (unknown key id, wrong size, mismatch). */
    int (*hmac_verify)(PyObject *signer, const unsigned char *kid, Py_ssize_t kid_len,
                       const unsigned char *sig, Py_ssize_t sig_len,
                       const unsigned char *body, Py_ssize_t len);
} StemSignerCAPI;

#endif /* STEM_SIGNER_CAPI_H */
