/* Zero detection. */
#ifndef BF_ZERO_H
#define BF_ZERO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True if all len bytes are zero (true for len == 0). */
bool bf_is_zero(const void *buf, size_t len);

/* flags[i] = 1 if block i (block_size bytes, the last one possibly shorter)
 * is all zero, else 0. Spreads over `threads` threads (0 = all CPUs). */
void bf_zero_flags(const uint8_t *buf, size_t len, size_t block_size, unsigned threads, uint8_t *flags);

#endif
