/* Per-block content digests: SHA-256 (OpenSSL libcrypto, or 16 blocks at once
 * with AVX-512: sha256_x16.h) and XXH3-128
 * (libxxhash). All-zero blocks are detected first and never hashed: the
 * digest of a zero block of that length stands in (cached). */
#ifndef BF_DIGEST_H
#define BF_DIGEST_H

#include <stddef.h>
#include <stdint.h>

enum bf_algo {
    BF_ALGO_SHA256 = 1,   /* 32-byte digest: content identity */
    BF_ALGO_XXH3_128 = 2, /* 16-byte digest (canonical, big-endian): change detection */
};

#define BF_MAX_DIGEST 32

/* Digest size in bytes, or 0 for an unknown algorithm. */
size_t bf_digest_size(int algo);

/* Digest of one buffer. Returns 0, or -1 for an unknown algorithm or a
 * library failure. */
int bf_digest(int algo, const void *buf, size_t len, uint8_t *out);

/* Digest of len zero bytes, without hashing when it was computed before. */
int bf_zero_digest(int algo, size_t len, uint8_t *out);

/* Digests of consecutive blocks of buf: n = ceil(len / block_size) entries of
 * bf_digest_size(algo) bytes go to `digests`. If zero_flags is not NULL,
 * zero_flags[i] tells whether block i was all zero. Spread over `threads`
 * threads (0 = all CPUs). Returns 0 or -1 (unknown algorithm, bad block size,
 * library failure). */
int bf_block_digests(int algo, const uint8_t *buf, size_t len, size_t block_size, unsigned threads, uint8_t *digests,
                     uint8_t *zero_flags);

/* How block digests hash SHA-256: "avx512" (16 blocks at once) or "openssl". */
const char *bf_sha256_isa(void);

/* Which XXH3 build runs on this CPU: "avx512", "avx2" or "sse2". */
const char *bf_xxh3_isa(void);

#endif
