/*
** xxh3.c -- XXH3 64-bit with a seed, for inputs over 240 bytes: SQLite pages.
**
** The whole-database checksum (docs/FORMAT.md §3) is the XOR of every page's
** XXH3-64 seeded with its page number.  Python computes it with the xxhash
** package; the consumer computes it here, per batch with the GIL released,
** so it must give the same numbers (tests/test_commit_runs.py compares them
** for every page size).  Written from the algorithm's specification: only the
** long-input path, since a page is never 240 bytes or fewer; SSE2 on x86-64,
** scalar elsewhere.
*/
#include <stdint.h>
#include <string.h>

#define XXH_STRIPE 64
#define XXH_SECRET_SIZE 192
#define XXH_STRIPES_PER_BLOCK ((XXH_SECRET_SIZE - XXH_STRIPE) / 8)
#define XXH_BLOCK (XXH_STRIPE * XXH_STRIPES_PER_BLOCK)

static const uint64_t P32_1 = 0x9E3779B1u, P32_2 = 0x85EBCA77u, P32_3 = 0xC2B2AE3Du;
static const uint64_t P64_1 = 0x9E3779B185EBCA87ull, P64_2 = 0xC2B2AE3D27D4EB4Full;
static const uint64_t P64_3 = 0x165667B19E3779F9ull, P64_4 = 0x85EBCA77C2B2AE63ull;
static const uint64_t P64_5 = 0x27D4EB2F165667C5ull;

/* The specification's default secret. */
static const unsigned char xxhSecret[XXH_SECRET_SIZE] = {
  0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
  0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
  0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
  0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
  0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
  0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
  0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
  0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
  0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
  0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
  0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
  0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

static uint64_t xxhRead64(const unsigned char *p) {
  uint64_t v;
  memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

static void xxhWrite64(unsigned char *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  memcpy(p, &v, 8);
}

static uint64_t xxhFold(uint64_t a, uint64_t b) {
  __uint128_t m = (__uint128_t)a * b;
  return (uint64_t)m ^ (uint64_t)(m >> 64);
}

static uint64_t xxhAvalanche(uint64_t h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ull;
  return h ^ (h >> 32);
}

#ifdef __SSE2__
#include <emmintrin.h>
/* Two accumulators per 128-bit lane: the same arithmetic as the scalar code below, which
   the accumulation dominates (SSE2 is part of x86-64, so this is every x86-64 build). */
typedef __m128i xxhAcc[4];

static void xxhStripe(xxhAcc acc, const unsigned char *in, const unsigned char *secret) {
  for (int i = 0; i < 4; i++) {
    __m128i v = _mm_loadu_si128((const __m128i *)(in + 16 * i));
    __m128i k = _mm_xor_si128(v, _mm_loadu_si128((const __m128i *)(secret + 16 * i)));
    __m128i product = _mm_mul_epu32(k, _mm_shuffle_epi32(k, _MM_SHUFFLE(0, 3, 0, 1)));
    __m128i swapped = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2));
    acc[i] = _mm_add_epi64(acc[i], _mm_add_epi64(product, swapped));
  }
}

static void xxhScramble(xxhAcc acc, const unsigned char *secret) {
  const __m128i prime = _mm_set1_epi32((int)P32_1);
  for (int i = 0; i < 4; i++) {
    __m128i a = _mm_xor_si128(acc[i], _mm_srli_epi64(acc[i], 47));
    a = _mm_xor_si128(a, _mm_loadu_si128((const __m128i *)(secret + 16 * i)));
    __m128i lo = _mm_mul_epu32(a, prime);
    __m128i hi = _mm_mul_epu32(_mm_shuffle_epi32(a, _MM_SHUFFLE(0, 3, 0, 1)), prime);
    acc[i] = _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
  }
}

static void xxhAccInit(xxhAcc acc) {
  acc[0] = _mm_set_epi64x((long long)P64_1, (long long)P32_3);
  acc[1] = _mm_set_epi64x((long long)P64_3, (long long)P64_2);
  acc[2] = _mm_set_epi64x((long long)P32_2, (long long)P64_4);
  acc[3] = _mm_set_epi64x((long long)P32_1, (long long)P64_5);
}

static void xxhAccOut(xxhAcc acc, uint64_t out[8]) {
  memcpy(out, acc, 64);
}
#else
typedef uint64_t xxhAcc[8];

static void xxhStripe(xxhAcc acc, const unsigned char *in, const unsigned char *secret) {
  for (int i = 0; i < 8; i++) {
    uint64_t v = xxhRead64(in + 8 * i);
    uint64_t k = v ^ xxhRead64(secret + 8 * i);
    acc[i ^ 1] += v;
    acc[i] += (k & 0xFFFFFFFFu) * (k >> 32);
  }
}

static void xxhScramble(xxhAcc acc, const unsigned char *secret) {
  for (int i = 0; i < 8; i++) {
    uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= xxhRead64(secret + 8 * i);
    acc[i] = a * P32_1;
  }
}

static void xxhAccInit(xxhAcc acc) {
  const uint64_t init[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
  memcpy(acc, init, 64);
}

static void xxhAccOut(xxhAcc acc, uint64_t out[8]) {
  memcpy(out, acc, 64);
}
#endif

/* XXH3_64bits_withSeed(in, len, seed) for len > 240. */
static uint64_t ws_xxh3_long(const unsigned char *in, size_t len, uint64_t seed) {
  unsigned char secret[XXH_SECRET_SIZE];
  for (int i = 0; i < XXH_SECRET_SIZE; i += 16) {
    xxhWrite64(secret + i, xxhRead64(xxhSecret + i) + seed);
    xxhWrite64(secret + i + 8, xxhRead64(xxhSecret + i + 8) - seed);
  }
  xxhAcc acc;
  xxhAccInit(acc);
  size_t nBlock = (len - 1) / XXH_BLOCK;
  for (size_t b = 0; b < nBlock; b++) {
    const unsigned char *block = in + b * XXH_BLOCK;
    for (int s = 0; s < XXH_STRIPES_PER_BLOCK; s++) {
      xxhStripe(acc, block + s * XXH_STRIPE, secret + s * 8);
    }
    xxhScramble(acc, secret + XXH_SECRET_SIZE - XXH_STRIPE);
  }
  const unsigned char *last = in + nBlock * XXH_BLOCK;
  size_t nStripe = ((len - 1) - nBlock * XXH_BLOCK) / XXH_STRIPE;
  for (size_t s = 0; s < nStripe; s++) {
    xxhStripe(acc, last + s * XXH_STRIPE, secret + s * 8);
  }
  xxhStripe(acc, in + len - XXH_STRIPE, secret + XXH_SECRET_SIZE - XXH_STRIPE - 7);
  uint64_t a[8], h = (uint64_t)len * P64_1;
  xxhAccOut(acc, a);
  for (int i = 0; i < 4; i++) {
    h += xxhFold(a[2 * i] ^ xxhRead64(secret + 11 + 16 * i),
                 a[2 * i + 1] ^ xxhRead64(secret + 11 + 16 * i + 8));
  }
  return xxhAvalanche(h);
}

/* For tests: the hash of one page as the checksum takes it. */
uint64_t ws_page_hash(const unsigned char *page, uint32_t n, uint64_t pgno) {
  return n > 240 ? ws_xxh3_long(page, n, pgno) : 0;
}

/* The XOR of the page hashes of n consecutive pages, the first numbered pgno: a run of a
** database image hashed in one call from Python, which cffi makes with the GIL released. */
uint64_t ws_run_hash(const unsigned char *pages, uint32_t page_size, uint64_t n, uint64_t pgno) {
  uint64_t x = 0;
  for (uint64_t i = 0; i < n; i++) {
    x ^= ws_page_hash(pages + i * page_size, page_size, pgno + i);
  }
  return x;
}
