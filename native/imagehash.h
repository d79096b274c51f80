/* Image digest: a digest of guest-visible content that does not depend on the
 * image format (raw file, qcow2 read through NBD, RBD image).
 *
 * Format "bf-image-sha256-v1" (pinned by golden tests; never change it):
 *   - the content is cut into 64 KiB blocks; the last block may be shorter;
 *   - each block's SHA-256 is taken over its exact bytes (an all-zero block is
 *     detected and its cached digest used, so zeros are never hashed);
 *   - the image digest is SHA-256 over the concatenated block digests in
 *     order, followed by the content length as 8 bytes little-endian.
 *
 * Data may arrive in pieces of any size (update), and known-zero ranges such
 * as holes may be added without any data (zero). */
#ifndef BF_IMAGEHASH_H
#define BF_IMAGEHASH_H

#include <stddef.h>
#include <stdint.h>

#define BF_IMAGE_BLOCK_SIZE 65536u
#define BF_IMAGE_DIGEST_SIZE 32u

struct bf_imagehash;

/* threads: how many threads update() may use for large pieces (0 = all CPUs).
 * Returns NULL when out of memory or when SHA-256 is unavailable. */
struct bf_imagehash *bf_imagehash_new(unsigned threads);
void bf_imagehash_free(struct bf_imagehash *h);

/* Add len bytes of content. Returns 0, or -1 on a library failure or after
 * bf_imagehash_final. */
int bf_imagehash_update(struct bf_imagehash *h, const uint8_t *buf, size_t len);

/* Add len zero bytes without reading or hashing any. Same return values. */
int bf_imagehash_zero(struct bf_imagehash *h, uint64_t len);

/* Content length added so far. */
uint64_t bf_imagehash_length(const struct bf_imagehash *h);

/* Finish and write the 32-byte digest. Calling it again returns the same
 * digest. Returns 0 or -1. */
int bf_imagehash_final(struct bf_imagehash *h, uint8_t *out);

#endif
