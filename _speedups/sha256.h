/* SHA-256 and HMAC-SHA256 for stem's signer, with no external library.
 *
 * Block functions with one signature, the fastest this CPU runs picked at
 * run time (CPUID) by stem_sha256_select():
 *   - stem_sha256_blocks_shani:    x86 SHA extensions (SHA-NI), ~1.6 GB/s;
 *   - stem_sha256_blocks_bmi2:     the scalar code compiled for BMI2 (rorx),
 *                                  ~35% faster than plain on x86 without SHA-NI;
 *   - stem_sha256_blocks_portable: plain C99, any platform.
 * OpenSSL uses SHA-NI (or AVX2) when the CPU has it, so a portable-only build
 * would lose to hashlib for bodies of more than a few blocks.
 *
 * HMAC keeps the key's ipad/opad midstates (the state after one 64-byte block
 * of key ^ 0x36 / key ^ 0x5c), computed once per key: one HMAC then costs the
 * message blocks plus one outer block (RFC 2104, section 4 "Implementation
 * note").  Checked against hashlib/hmac by tests/test_signing.py (hypothesis).
 */
#ifndef STEM_SHA256_H
#define STEM_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define STEM_HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>
#endif

typedef void (*stem_sha256_blocks_fn)(uint32_t state[8], const uint8_t *data, size_t nblocks);

typedef struct {
    uint32_t inner[8]; /* state after the key ^ ipad block */
    uint32_t outer[8]; /* state after the key ^ opad block */
} stem_hmac_key;

static const uint32_t stem_sha256_iv[8] = {
    0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
    0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u,
};

static const uint32_t stem_sha256_k[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u,
};

static inline uint32_t stem_load_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void stem_store_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static inline void stem_store_be64(uint8_t *p, uint64_t v) {
    stem_store_be32(p, (uint32_t)(v >> 32));
    stem_store_be32(p + 4, (uint32_t)v);
}

/* ---- portable block function ------------------------------------------ */

#define STEM_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define STEM_CH(x, y, z) (((x) & (y)) ^ (~(x) & (z)))
#define STEM_MAJ(x, y, z) (((x) & (y)) ^ ((x) & (z)) ^ ((y) & (z)))
#define STEM_S0(x) (STEM_ROTR(x, 2) ^ STEM_ROTR(x, 13) ^ STEM_ROTR(x, 22))
#define STEM_S1(x) (STEM_ROTR(x, 6) ^ STEM_ROTR(x, 11) ^ STEM_ROTR(x, 25))
#define STEM_G0(x) (STEM_ROTR(x, 7) ^ STEM_ROTR(x, 18) ^ ((x) >> 3))
#define STEM_G1(x) (STEM_ROTR(x, 17) ^ STEM_ROTR(x, 19) ^ ((x) >> 10))

/* One round with the working variables renamed instead of shifted, and the
 * message schedule kept in a rolling window of 16 words. */
#define STEM_ROUND(a, b, c, d, e, f, g, h, k, w)                              \
    do {                                                                     \
        uint32_t t1_ = (h) + STEM_S1(e) + STEM_CH(e, f, g) + (k) + (w);       \
        (d) += t1_;                                                          \
        (h) = t1_ + STEM_S0(a) + STEM_MAJ(a, b, c);                          \
    } while (0)

#define STEM_SCHED(i) \
    (w[(i) & 15] += STEM_G1(w[((i) - 2) & 15]) + w[((i) - 7) & 15] + STEM_G0(w[((i) - 15) & 15]))

#define STEM_EIGHT(i, W)                                                                     \
    STEM_ROUND(a, b, c, d, e, f, g, h, stem_sha256_k[(i) + 0], W((i) + 0));                  \
    STEM_ROUND(h, a, b, c, d, e, f, g, stem_sha256_k[(i) + 1], W((i) + 1));                  \
    STEM_ROUND(g, h, a, b, c, d, e, f, stem_sha256_k[(i) + 2], W((i) + 2));                  \
    STEM_ROUND(f, g, h, a, b, c, d, e, stem_sha256_k[(i) + 3], W((i) + 3));                  \
    STEM_ROUND(e, f, g, h, a, b, c, d, stem_sha256_k[(i) + 4], W((i) + 4));                  \
    STEM_ROUND(d, e, f, g, h, a, b, c, stem_sha256_k[(i) + 5], W((i) + 5));                  \
    STEM_ROUND(c, d, e, f, g, h, a, b, stem_sha256_k[(i) + 6], W((i) + 6));                  \
    STEM_ROUND(b, c, d, e, f, g, h, a, stem_sha256_k[(i) + 7], W((i) + 7))

#define STEM_W_LOAD(i) (w[i] = stem_load_be32(data + 4 * (i)))

#if defined(__GNUC__) || defined(__clang__)
#define STEM_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define STEM_ALWAYS_INLINE static inline
#endif

STEM_ALWAYS_INLINE void stem_sha256_blocks_scalar(uint32_t state[8], const uint8_t *data, size_t nblocks) {
    uint32_t w[16];
    while (nblocks--) {
        uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
        uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
        STEM_EIGHT(0, STEM_W_LOAD);
        STEM_EIGHT(8, STEM_W_LOAD);
        STEM_EIGHT(16, STEM_SCHED);
        STEM_EIGHT(24, STEM_SCHED);
        STEM_EIGHT(32, STEM_SCHED);
        STEM_EIGHT(40, STEM_SCHED);
        STEM_EIGHT(48, STEM_SCHED);
        STEM_EIGHT(56, STEM_SCHED);
        state[0] += a; state[1] += b; state[2] += c; state[3] += d;
        state[4] += e; state[5] += f; state[6] += g; state[7] += h;
        data += 64;
    }
}

static void stem_sha256_blocks_portable(uint32_t state[8], const uint8_t *data, size_t nblocks) {
    stem_sha256_blocks_scalar(state, data, nblocks);
}

/* ---- SHA-NI block function (x86) -------------------------------------- */

#ifdef STEM_HAVE_SHANI

/* Four rounds: i is the group (0..15), Gi holds message words 4i..4i+3,
 * Gprev words 4i-4.., Gnext words 4i+4.. (being built by msg1/msg2). */
#define STEM_SHANI_GROUP(i, Gi, Gprev, Gnext)                                       \
    do {                                                                            \
        MSG = _mm_add_epi32(Gi, _mm_loadu_si128((const __m128i *)&stem_sha256_k[4 * (i)])); \
        STATE1 = _mm_sha256rnds2_epu32(STATE1, STATE0, MSG);                         \
        if ((i) >= 3 && (i) <= 14) {                                                \
            TMP = _mm_alignr_epi8(Gi, Gprev, 4);                                    \
            Gnext = _mm_add_epi32(Gnext, TMP);                                      \
            Gnext = _mm_sha256msg2_epu32(Gnext, Gi);                                \
        }                                                                           \
        MSG = _mm_shuffle_epi32(MSG, 0x0E);                                         \
        STATE0 = _mm_sha256rnds2_epu32(STATE0, STATE1, MSG);                         \
        if ((i) >= 1 && (i) <= 12) Gprev = _mm_sha256msg1_epu32(Gprev, Gi);          \
    } while (0)

__attribute__((target("sha,ssse3,sse4.1")))
static void stem_sha256_blocks_shani(uint32_t state[8], const uint8_t *data, size_t nblocks) {
    __m128i STATE0, STATE1, MSG, TMP, M0, M1, M2, M3, ABEF_SAVE, CDGH_SAVE;
    const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);

    TMP = _mm_loadu_si128((const __m128i *)&state[0]);
    STATE1 = _mm_loadu_si128((const __m128i *)&state[4]);
    TMP = _mm_shuffle_epi32(TMP, 0xB1);          /* CDAB */
    STATE1 = _mm_shuffle_epi32(STATE1, 0x1B);    /* EFGH */
    STATE0 = _mm_alignr_epi8(TMP, STATE1, 8);    /* ABEF */
    STATE1 = _mm_blend_epi16(STATE1, TMP, 0xF0); /* CDGH */

    while (nblocks--) {
        ABEF_SAVE = STATE0;
        CDGH_SAVE = STATE1;
        M0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 0)), MASK);
        M1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16)), MASK);
        M2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 32)), MASK);
        M3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 48)), MASK);
        STEM_SHANI_GROUP(0, M0, M3, M1);
        STEM_SHANI_GROUP(1, M1, M0, M2);
        STEM_SHANI_GROUP(2, M2, M1, M3);
        STEM_SHANI_GROUP(3, M3, M2, M0);
        STEM_SHANI_GROUP(4, M0, M3, M1);
        STEM_SHANI_GROUP(5, M1, M0, M2);
        STEM_SHANI_GROUP(6, M2, M1, M3);
        STEM_SHANI_GROUP(7, M3, M2, M0);
        STEM_SHANI_GROUP(8, M0, M3, M1);
        STEM_SHANI_GROUP(9, M1, M0, M2);
        STEM_SHANI_GROUP(10, M2, M1, M3);
        STEM_SHANI_GROUP(11, M3, M2, M0);
        STEM_SHANI_GROUP(12, M0, M3, M1);
        STEM_SHANI_GROUP(13, M1, M0, M2);
        STEM_SHANI_GROUP(14, M2, M1, M3);
        STEM_SHANI_GROUP(15, M3, M2, M0);
        STATE0 = _mm_add_epi32(STATE0, ABEF_SAVE);
        STATE1 = _mm_add_epi32(STATE1, CDGH_SAVE);
        data += 64;
    }

    TMP = _mm_shuffle_epi32(STATE0, 0x1B);       /* FEBA */
    STATE1 = _mm_shuffle_epi32(STATE1, 0xB1);    /* DCHG */
    STATE0 = _mm_blend_epi16(TMP, STATE1, 0xF0); /* DCBA */
    STATE1 = _mm_alignr_epi8(STATE1, TMP, 8);    /* HGFE */
    _mm_storeu_si128((__m128i *)&state[0], STATE0);
    _mm_storeu_si128((__m128i *)&state[4], STATE1);
}

__attribute__((target("bmi2")))
static void stem_sha256_blocks_bmi2(uint32_t state[8], const uint8_t *data, size_t nblocks) {
    stem_sha256_blocks_scalar(state, data, nblocks);
}

#define STEM_CPU_SHANI 1
#define STEM_CPU_BMI2 2

static int stem_cpu_features(void) {
    unsigned int a, b, c, d, ssse3_sse41;
    int features = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    ssse3_sse41 = (c & (1u << 9)) && (c & (1u << 19));
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (ssse3_sse41 && (b & (1u << 29))) features |= STEM_CPU_SHANI; /* SHA */
    if (b & (1u << 8)) features |= STEM_CPU_BMI2;
    return features;
}
#endif /* STEM_HAVE_SHANI */

/* ---- dispatch, one-shot hash, HMAC ------------------------------------- */

static stem_sha256_blocks_fn stem_sha256_blocks = stem_sha256_blocks_portable;

/* The block function called `name` ("sha-ni", "bmi2", "portable") if this CPU
 * runs it, else NULL. */
static stem_sha256_blocks_fn stem_sha256_backend(const char *name) {
#ifdef STEM_HAVE_SHANI
    int features = stem_cpu_features();
    if (strcmp(name, "sha-ni") == 0) return (features & STEM_CPU_SHANI) ? stem_sha256_blocks_shani : NULL;
    if (strcmp(name, "bmi2") == 0) return (features & STEM_CPU_BMI2) ? stem_sha256_blocks_bmi2 : NULL;
#endif
    if (strcmp(name, "portable") == 0) return stem_sha256_blocks_portable;
    return NULL;
}

/* Use the fastest block function this CPU runs; returns its name. */
static const char *stem_sha256_select(void) {
    static const char *const order[] = {"sha-ni", "bmi2", "portable"};
    size_t i;
    for (i = 0; i < sizeof order / sizeof order[0]; i++) {
        stem_sha256_blocks_fn fn = stem_sha256_backend(order[i]);
        if (fn) {
            stem_sha256_blocks = fn;
            return order[i];
        }
    }
    return "portable";
}

/* Hash `len` bytes starting from `state`, where `prefix_len` bytes were
 * already absorbed into it (a whole number of blocks); write the digest. */
static void stem_sha256_finish(stem_sha256_blocks_fn blocks, uint32_t state[8], uint64_t prefix_len,
                               const uint8_t *data, size_t len, uint8_t out[32]) {
    uint8_t tail[128];
    size_t full = len / 64, rest = len % 64, tail_len;
    int i;
    if (full) blocks(state, data, full);
    memcpy(tail, data + full * 64, rest);
    tail[rest] = 0x80;
    tail_len = rest < 56 ? 64 : 128;
    memset(tail + rest + 1, 0, tail_len - rest - 1 - 8);
    stem_store_be64(tail + tail_len - 8, (prefix_len + (uint64_t)len) * 8u);
    blocks(state, tail, tail_len / 64);
    for (i = 0; i < 8; i++) stem_store_be32(out + 4 * i, state[i]);
}

static void stem_sha256_with(stem_sha256_blocks_fn blocks, const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t state[8];
    memcpy(state, stem_sha256_iv, sizeof state);
    stem_sha256_finish(blocks, state, 0, data, len, out);
}

static void stem_hmac_key_init(stem_hmac_key *hk, const uint8_t *key, size_t key_len) {
    uint8_t block[64], hashed[32];
    int i;
    if (key_len > 64) {
        stem_sha256_with(stem_sha256_blocks, key, key_len, hashed);
        key = hashed;
        key_len = 32;
    }
    memset(block, 0, sizeof block);
    memcpy(block, key, key_len);
    for (i = 0; i < 64; i++) block[i] ^= 0x36;
    memcpy(hk->inner, stem_sha256_iv, sizeof hk->inner);
    stem_sha256_blocks(hk->inner, block, 1);
    for (i = 0; i < 64; i++) block[i] ^= 0x36 ^ 0x5c;
    memcpy(hk->outer, stem_sha256_iv, sizeof hk->outer);
    stem_sha256_blocks(hk->outer, block, 1);
    memset(block, 0, sizeof block);
    memset(hashed, 0, sizeof hashed);
}

static void stem_hmac_sha256(const stem_hmac_key *hk, const uint8_t *msg, size_t len, uint8_t out[32]) {
    uint32_t state[8];
    uint8_t inner[32];
    memcpy(state, hk->inner, sizeof state);
    stem_sha256_finish(stem_sha256_blocks, state, 64, msg, len, inner);
    memcpy(state, hk->outer, sizeof state);
    stem_sha256_finish(stem_sha256_blocks, state, 64, inner, 32, out);
}

/* 1 when equal; the time depends on n only, never on where the bytes differ. */
static int stem_ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    volatile uint8_t diff = 0;
    size_t i;
    for (i = 0; i < n; i++) diff |= (uint8_t)(a[i] ^ b[i]);
    return diff == 0;
}

#endif /* STEM_SHA256_H */
