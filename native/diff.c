#include "diff.h"

#include <stdbool.h>
#include <string.h>

size_t bf_diff_digests(const uint8_t *old, size_t n_old, const uint8_t *new, size_t n_new, size_t dsize,
                       uint64_t block_size, uint64_t length, struct bf_extent *out, size_t max_out)
{
    size_t count = 0;
    bool open = false;
    uint64_t start = 0;
    for (size_t i = 0; i <= n_new; i++) {
        bool changed = i < n_new && (i >= n_old || memcmp(old + i * dsize, new + i * dsize, dsize) != 0);
        if (changed && !open) {
            open = true;
            start = (uint64_t)i * block_size;
        } else if (!changed && open) {
            open = false;
            uint64_t end = (uint64_t)i * block_size;
            if (end > length)
                end = length;
            if (count < max_out)
                out[count] = (struct bf_extent){start, end - start};
            count++;
        }
    }
    return count;
}
