#include "imagehash.h"

#include <openssl/evp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "digest.h"

/* Block digests are computed in batches of this many blocks (4 MiB of digests
 * for 8 GiB of content would be too much to hold at once). */
#define BATCH_BLOCKS 2048u
/* Zero-block digests fed to the outer hash per update call. */
#define ZERO_RUN 128u

struct bf_imagehash {
    EVP_MD_CTX *outer;
    unsigned threads;
    uint64_t length;
    size_t pending_len;
    bool finished;
    uint8_t result[BF_IMAGE_DIGEST_SIZE];
    uint8_t zero_run[ZERO_RUN * 32]; /* the full zero-block digest, repeated */
    uint8_t digests[BATCH_BLOCKS * 32];
    uint8_t pending[BF_IMAGE_BLOCK_SIZE];
};

struct bf_imagehash *bf_imagehash_new(unsigned threads)
{
    struct bf_imagehash *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->threads = threads;
    uint8_t zd[32];
    EVP_MD *md = EVP_MD_fetch(NULL, "SHA256", NULL);
    h->outer = EVP_MD_CTX_new();
    if (!md || !h->outer || EVP_DigestInit_ex2(h->outer, md, NULL) != 1 ||
        bf_zero_digest(BF_ALGO_SHA256, BF_IMAGE_BLOCK_SIZE, zd) != 0) {
        EVP_MD_free(md);
        bf_imagehash_free(h);
        return NULL;
    }
    EVP_MD_free(md);
    for (unsigned i = 0; i < ZERO_RUN; i++)
        memcpy(h->zero_run + i * 32, zd, 32);
    return h;
}

void bf_imagehash_free(struct bf_imagehash *h)
{
    if (!h)
        return;
    EVP_MD_CTX_free(h->outer);
    free(h);
}

uint64_t bf_imagehash_length(const struct bf_imagehash *h)
{
    return h->length;
}

/* Hash whole blocks of buf (len a multiple of the block size, or the final
 * short block) and feed their digests to the outer hash. */
static int add_blocks(struct bf_imagehash *h, const uint8_t *buf, size_t len)
{
    while (len) {
        size_t take =
            len < (size_t)BATCH_BLOCKS * BF_IMAGE_BLOCK_SIZE ? len : (size_t)BATCH_BLOCKS * BF_IMAGE_BLOCK_SIZE;
        size_t n = (take + BF_IMAGE_BLOCK_SIZE - 1) / BF_IMAGE_BLOCK_SIZE;
        if (bf_block_digests(BF_ALGO_SHA256, buf, take, BF_IMAGE_BLOCK_SIZE, h->threads, h->digests, NULL) != 0)
            return -1;
        if (EVP_DigestUpdate(h->outer, h->digests, n * 32) != 1)
            return -1;
        buf += take;
        len -= take;
    }
    return 0;
}

static int flush_pending_if_full(struct bf_imagehash *h)
{
    if (h->pending_len < BF_IMAGE_BLOCK_SIZE)
        return 0;
    h->pending_len = 0;
    return add_blocks(h, h->pending, BF_IMAGE_BLOCK_SIZE);
}

int bf_imagehash_update(struct bf_imagehash *h, const uint8_t *buf, size_t len)
{
    if (h->finished)
        return -1;
    h->length += len;
    if (h->pending_len) {
        size_t take = BF_IMAGE_BLOCK_SIZE - h->pending_len;
        if (take > len)
            take = len;
        memcpy(h->pending + h->pending_len, buf, take);
        h->pending_len += take;
        buf += take;
        len -= take;
        if (flush_pending_if_full(h) != 0)
            return -1;
        if (h->pending_len) /* all of buf went into the partial block */
            return 0;
    }
    size_t whole = len - len % BF_IMAGE_BLOCK_SIZE;
    if (add_blocks(h, buf, whole) != 0)
        return -1;
    memcpy(h->pending, buf + whole, len - whole);
    h->pending_len = len - whole;
    return 0;
}

int bf_imagehash_zero(struct bf_imagehash *h, uint64_t len)
{
    if (h->finished)
        return -1;
    h->length += len;
    if (h->pending_len) {
        uint64_t take = BF_IMAGE_BLOCK_SIZE - h->pending_len;
        if (take > len)
            take = len;
        memset(h->pending + h->pending_len, 0, take);
        h->pending_len += take;
        len -= take;
        if (flush_pending_if_full(h) != 0)
            return -1;
        if (h->pending_len) /* all of len went into the partial block */
            return 0;
    }
    uint64_t blocks = len / BF_IMAGE_BLOCK_SIZE;
    while (blocks) {
        uint64_t n = blocks < ZERO_RUN ? blocks : ZERO_RUN;
        if (EVP_DigestUpdate(h->outer, h->zero_run, n * 32) != 1)
            return -1;
        blocks -= n;
    }
    h->pending_len = len % BF_IMAGE_BLOCK_SIZE;
    memset(h->pending, 0, h->pending_len);
    return 0;
}

int bf_imagehash_final(struct bf_imagehash *h, uint8_t *out)
{
    if (!h->finished) {
        if (h->pending_len && add_blocks(h, h->pending, h->pending_len) != 0)
            return -1;
        h->pending_len = 0;
        uint8_t le[8];
        for (int i = 0; i < 8; i++)
            le[i] = (uint8_t)(h->length >> (8 * i));
        unsigned int n = 0;
        if (EVP_DigestUpdate(h->outer, le, 8) != 1 || EVP_DigestFinal_ex(h->outer, h->result, &n) != 1)
            return -1;
        h->finished = true;
    }
    memcpy(out, h->result, BF_IMAGE_DIGEST_SIZE);
    return 0;
}
