/* Changed-block extents from two digest lists. */
#ifndef BF_DIFF_H
#define BF_DIFF_H

#include <stddef.h>
#include <stdint.h>

struct bf_extent {
    uint64_t start;
    uint64_t length;
};

/* Compare the digest lists `old` (n_old entries) and `new` (n_new entries),
 * each entry dsize bytes, for an image of `length` bytes cut into block_size
 * blocks (the new image: n_new == ceil(length / block_size)). Block i has
 * changed when i >= n_old or its digests differ. Adjacent changed blocks are
 * merged into one extent, clipped to `length`.
 *
 * Writes at most max_out extents to out (out may be NULL when max_out is 0)
 * and returns the total number of extents, so a caller can size its array
 * with a first call. */
size_t bf_diff_digests(const uint8_t *old, size_t n_old, const uint8_t *new, size_t n_new, size_t dsize,
                       uint64_t block_size, uint64_t length, struct bf_extent *out, size_t max_out);

#endif
