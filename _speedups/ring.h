/* Shared-memory SPSC byte ring: layout constants and the atomics it needs.
 *
 * The layout is documented once, in stem/_ring_py.py (the pure twin); this
 * header must agree with it and tests/test_ring.py checks that it does.
 *
 * Memory ordering (C11 model through the GCC/Clang __atomic builtins):
 *   - each side loads the OTHER side's index with acquire and stores its OWN
 *     index with release, after copying the record bytes, so a reader never
 *     sees an index that covers bytes not yet written, and a writer never
 *     reuses bytes the reader is still copying;
 *   - doorbell flags use the store-buffering pattern with a seq_cst fence on
 *     both sides (reader: flag=1; fence; load tail / writer: store tail;
 *     fence; load flag), so at least one side sees the other's store and a
 *     sleeping reader is never missed.
 */
#ifndef STEM_RING_H
#define STEM_RING_H

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define STEM_RING_CTRL_BYTES   256
#define STEM_RING_HEADER_BYTES 8
#define STEM_RING_SPILL_BYTES  24   /* header + u64 seq + u64 length */
#define STEM_RING_MIN_CAPACITY 64
#define STEM_RING_MAX_CAPACITY (1LL << 31)  /* record lengths are u32 */

#define STEM_KIND_DATA  0u
#define STEM_KIND_PAD   1u
#define STEM_KIND_SPILL 2u

/* byte offsets inside the control block */
#define STEM_OFF_HEAD            0    /* u64, consumer-owned */
#define STEM_OFF_SPILL_SEEN      8    /* u64, consumer-owned */
#define STEM_OFF_TAIL            64   /* u64, producer-owned */
#define STEM_OFF_SPILL_SEQ       72   /* u64, producer-owned */
#define STEM_OFF_READER_WAITING  128  /* u32 */
#define STEM_OFF_WRITER_WAITING  192  /* u32 */
#define STEM_OFF_CLAIM           200  /* u64[STEM_CLAIM_SLOTS], see Ring.offer/claim */
#define STEM_CLAIM_SLOTS         4

static inline uint64_t stem_load_acquire_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint64_t stem_load_relaxed_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void stem_store_release_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void stem_store_relaxed_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline uint32_t stem_load_relaxed_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void stem_store_relaxed_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline uint32_t stem_exchange_u32(uint32_t *p, uint32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}
/* Compare-and-swap: true when *p held `expected` and now holds `desired`. */
static inline int stem_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline void stem_fence_seq_cst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Ring a doorbell: add 1 to an eventfd, or put 8 bytes into a non-blocking
 * pipe.  EAGAIN (pipe full, i.e. a wake-up is already pending) and EBADF
 * (peer side already closed its doorbell) are both harmless here. */
static inline void stem_ring_bell(int fd) {
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(fd, &one, sizeof one);
        (void)r;
    }
}

/* Consume a doorbell's rings: one read of an eventfd (resets it to 0), or of
 * up to 4 KiB of a pipe (more just make the next poll return at once).
 * EAGAIN (rung by nobody after all) is harmless. */
static inline void stem_drain_bell(int fd) {
    char buf[4096];
    ssize_t r = read(fd, buf, sizeof buf);
    (void)r;
}

#endif
