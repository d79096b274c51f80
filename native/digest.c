#include "digest.h"

#include <openssl/evp.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>
#include <xxhash.h>

#include <stdlib.h>

#include "parallel.h"
#include "sha256_x16.h"
#include "xxh3_isa.h"
#include "zero.h"

static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void fetch_sha256(void)
{
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

size_t bf_digest_size(int algo)
{
    switch (algo) {
    case BF_ALGO_SHA256:
        return 32;
    case BF_ALGO_XXH3_128:
        return 16;
    default:
        return 0;
    }
}

/* One SHA-256 with a context the caller reuses across blocks. */
static int sha256_with(EVP_MD_CTX *ctx, const void *buf, size_t len, uint8_t *out)
{
    unsigned int n = 0;
    if (EVP_DigestInit_ex2(ctx, sha256_md, NULL) != 1 || EVP_DigestUpdate(ctx, buf, len) != 1 ||
        EVP_DigestFinal_ex(ctx, out, &n) != 1)
        return -1;
    return 0;
}

/* The widest XXH3 build this CPU runs; BF_XXH3_ISA=sse2|avx2|avx512 forces
 * one (tests check every build against the reference). */
static void (*xxh3_fn)(const void *, size_t, uint8_t *);
static const char *xxh3_name;
static pthread_once_t xxh3_once = PTHREAD_ONCE_INIT;

static void pick_xxh3(void)
{
    const char *force = getenv("BF_XXH3_ISA");
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2");
    if (force && strcmp(force, "sse2") == 0)
        avx512 = avx2 = false;
    else if (force && strcmp(force, "avx2") == 0)
        avx512 = false;
    if (avx512) {
        xxh3_fn = bf_xxh3_128_avx512, xxh3_name = "avx512";
    } else if (avx2) {
        xxh3_fn = bf_xxh3_128_avx2, xxh3_name = "avx2";
    } else {
        xxh3_fn = bf_xxh3_128_sse2, xxh3_name = "sse2";
    }
}

/* Block digests use 16-lane SHA-256 (sha256_x16.c) when the CPU has
 * AVX-512; BF_SHA256_ISA=openssl forces OpenSSL one block at a time (tests
 * check both against hashlib). */
static bool sha256_x16_ok;
static pthread_once_t sha256_isa_once = PTHREAD_ONCE_INIT;

static void pick_sha256(void)
{
    const char *force = getenv("BF_SHA256_ISA");
    __builtin_cpu_init();
    sha256_x16_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    !(force && strcmp(force, "openssl") == 0);
}

const char *bf_sha256_isa(void)
{
    pthread_once(&sha256_isa_once, pick_sha256);
    return sha256_x16_ok ? "avx512" : "openssl";
}

const char *bf_xxh3_isa(void)
{
    pthread_once(&xxh3_once, pick_xxh3);
    return xxh3_name;
}

static void xxh3_128(const void *buf, size_t len, uint8_t *out)
{
    pthread_once(&xxh3_once, pick_xxh3);
    xxh3_fn(buf, len, out);
}

int bf_digest(int algo, const void *buf, size_t len, uint8_t *out)
{
    if (algo == BF_ALGO_XXH3_128) {
        xxh3_128(buf, len, out);
        return 0;
    }
    if (algo != BF_ALGO_SHA256)
        return -1;
    pthread_once(&sha256_once, fetch_sha256);
    if (!sha256_md)
        return -1;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return -1;
    int rc = sha256_with(ctx, buf, len, out);
    EVP_MD_CTX_free(ctx);
    return rc;
}

/* Zero-block digests are hashed once per (algorithm, length) and cached: the
 * usual callers ask for a handful of block sizes over and over. */
#define ZERO_CACHE_SLOTS 16
static struct {
    int algo;
    size_t len;
    uint8_t digest[BF_MAX_DIGEST];
} zero_cache[ZERO_CACHE_SLOTS];
static unsigned zero_cache_next;
static pthread_mutex_t zero_cache_lock = PTHREAD_MUTEX_INITIALIZER;
static const uint8_t zero_page[65536];

static int hash_zeros(int algo, size_t len, uint8_t *out)
{
    if (algo == BF_ALGO_XXH3_128) {
        XXH3_state_t *st = XXH3_createState();
        if (!st)
            return -1;
        XXH3_128bits_reset(st);
        for (size_t done = 0; done < len;) {
            size_t n = len - done < sizeof(zero_page) ? len - done : sizeof(zero_page);
            XXH3_128bits_update(st, zero_page, n);
            done += n;
        }
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
        XXH3_freeState(st);
        memcpy(out, c.digest, 16);
        return 0;
    }
    pthread_once(&sha256_once, fetch_sha256);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx || !sha256_md)
        goto fail;
    if (EVP_DigestInit_ex2(ctx, sha256_md, NULL) != 1)
        goto fail;
    for (size_t done = 0; done < len;) {
        size_t n = len - done < sizeof(zero_page) ? len - done : sizeof(zero_page);
        if (EVP_DigestUpdate(ctx, zero_page, n) != 1)
            goto fail;
        done += n;
    }
    unsigned int dn = 0;
    if (EVP_DigestFinal_ex(ctx, out, &dn) != 1)
        goto fail;
    EVP_MD_CTX_free(ctx);
    return 0;
fail:
    EVP_MD_CTX_free(ctx);
    return -1;
}

int bf_zero_digest(int algo, size_t len, uint8_t *out)
{
    size_t dsize = bf_digest_size(algo);
    if (!dsize)
        return -1;
    pthread_mutex_lock(&zero_cache_lock);
    for (unsigned i = 0; i < ZERO_CACHE_SLOTS; i++) {
        if (zero_cache[i].algo == algo && zero_cache[i].len == len) {
            memcpy(out, zero_cache[i].digest, dsize);
            pthread_mutex_unlock(&zero_cache_lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&zero_cache_lock);

    uint8_t d[BF_MAX_DIGEST];
    if (hash_zeros(algo, len, d) != 0)
        return -1;
    pthread_mutex_lock(&zero_cache_lock);
    unsigned slot = zero_cache_next++ % ZERO_CACHE_SLOTS;
    zero_cache[slot].algo = algo;
    zero_cache[slot].len = len;
    memcpy(zero_cache[slot].digest, d, dsize);
    pthread_mutex_unlock(&zero_cache_lock);
    memcpy(out, d, dsize);
    return 0;
}

struct blocks_ctx {
    int algo;
    size_t dsize;
    const uint8_t *buf;
    size_t len;
    size_t block_size;
    uint8_t *digests;
    uint8_t *zero_flags;
    const uint8_t *full_zero_digest;
    int failed; /* set by any worker; read after join */
};

/* Full-size blocks waiting to be hashed 16 at a time. */
struct lanes {
    unsigned n;
    const uint8_t *in[BF_SHA256_LANES];
    uint8_t *out[BF_SHA256_LANES];
};

/* Hash the waiting blocks: 16 lanes cost about as much as 8 blocks through
 * OpenSSL, so fewer than 8 go through OpenSSL and the rest of the lanes
 * repeat the first block into a scratch digest. */
static int lanes_flush(struct lanes *l, size_t len, EVP_MD_CTX *ctx)
{
    if (l->n >= BF_SHA256_LANES / 2) {
        uint8_t spare[BF_SHA256_LANES][32];
        for (unsigned j = l->n; j < BF_SHA256_LANES; j++) {
            l->in[j] = l->in[0];
            l->out[j] = spare[j];
        }
        bf_sha256_x16(l->in, len, l->out);
    } else {
        for (unsigned j = 0; j < l->n; j++)
            if (sha256_with(ctx, l->in[j], len, l->out[j]) != 0)
                return -1;
    }
    l->n = 0;
    return 0;
}

static void blocks_range(void *arg, size_t first, size_t count)
{
    struct blocks_ctx *c = arg;
    EVP_MD_CTX *ctx = NULL;
    if (c->algo == BF_ALGO_SHA256 && !(ctx = EVP_MD_CTX_new())) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    struct lanes lanes = {0};
    bool multi = c->algo == BF_ALGO_SHA256 && sha256_x16_ok;
    for (size_t i = first; i < first + count; i++) {
        size_t off = i * c->block_size;
        size_t n = c->len - off < c->block_size ? c->len - off : c->block_size;
        uint8_t *out = c->digests + i * c->dsize;
        bool zero = bf_is_zero(c->buf + off, n);
        if (c->zero_flags)
            c->zero_flags[i] = zero;
        if (zero) {
            if (n == c->block_size)
                memcpy(out, c->full_zero_digest, c->dsize);
            else if (bf_zero_digest(c->algo, n, out) != 0)
                __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        } else if (multi && n == c->block_size) {
            lanes.in[lanes.n] = c->buf + off;
            lanes.out[lanes.n++] = out;
            if (lanes.n == BF_SHA256_LANES && lanes_flush(&lanes, n, ctx) != 0)
                __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        } else if (c->algo == BF_ALGO_SHA256) {
            if (sha256_with(ctx, c->buf + off, n, out) != 0)
                __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        } else {
            xxh3_128(c->buf + off, n, out);
        }
    }
    if (lanes.n && lanes_flush(&lanes, c->block_size, ctx) != 0)
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
    EVP_MD_CTX_free(ctx);
}

int bf_block_digests(int algo, const uint8_t *buf, size_t len, size_t block_size, unsigned threads, uint8_t *digests,
                     uint8_t *zero_flags)
{
    size_t dsize = bf_digest_size(algo);
    if (!dsize || block_size == 0)
        return -1;
    if (len == 0)
        return 0;
    if (algo == BF_ALGO_SHA256) {
        pthread_once(&sha256_once, fetch_sha256);
        pthread_once(&sha256_isa_once, pick_sha256);
        if (!sha256_md)
            return -1;
    }
    uint8_t full_zero[BF_MAX_DIGEST];
    if (bf_zero_digest(algo, block_size, full_zero) != 0)
        return -1;
    struct blocks_ctx c = {algo, dsize, buf, len, block_size, digests, zero_flags, full_zero, 0};
    size_t n = (len + block_size - 1) / block_size;
    /* A thread is worth starting for about 1 MiB of input. */
    size_t min_items = (1u << 20) / block_size + 1;
    bf_parallel_for(n, threads, min_items, blocks_range, &c);
    return c.failed ? -1 : 0;
}
