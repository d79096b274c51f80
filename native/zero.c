#include "zero.h"

#include <string.h>

#include "parallel.h"

/* OR-reduce 256 bytes at a time; the compiler turns the fixed inner loop into
 * wide vector loads. Stop at the first non-zero 256-byte group. */
__attribute__((target_clones("avx512f", "avx2", "default"))) static bool is_zero_aligned(const uint64_t *p,
                                                                                         size_t words)
{
    size_t i = 0;
    for (; i + 32 <= words; i += 32) {
        uint64_t acc = 0;
        for (size_t j = 0; j < 32; j++)
            acc |= p[i + j];
        if (acc)
            return false;
    }
    uint64_t acc = 0;
    for (; i < words; i++)
        acc |= p[i];
    return acc == 0;
}

bool bf_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    /* Most data blocks fail in the first bytes: check those cheaply. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return false;
    /* Unaligned head up to an 8-byte boundary, then words, then the tail. */
    while (len && ((uintptr_t)p & 7)) {
        if (*p)
            return false;
        p++;
        len--;
    }
    size_t words = len / 8;
    if (!is_zero_aligned((const uint64_t *)(const void *)p, words))
        return false;
    for (size_t i = words * 8; i < len; i++)
        if (p[i])
            return false;
    return true;
}

struct zero_flags_ctx {
    const uint8_t *buf;
    size_t len;
    size_t block_size;
    uint8_t *flags;
};

static void zero_flags_range(void *arg, size_t first, size_t count)
{
    struct zero_flags_ctx *c = arg;
    for (size_t i = first; i < first + count; i++) {
        size_t off = i * c->block_size;
        size_t n = c->len - off < c->block_size ? c->len - off : c->block_size;
        c->flags[i] = bf_is_zero(c->buf + off, n);
    }
}

void bf_zero_flags(const uint8_t *buf, size_t len, size_t block_size, unsigned threads, uint8_t *flags)
{
    if (len == 0 || block_size == 0)
        return;
    size_t n = (len + block_size - 1) / block_size;
    struct zero_flags_ctx c = {buf, len, block_size, flags};
    /* A thread is worth starting for about 1 MiB of input. */
    size_t min_items = (1u << 20) / block_size + 1;
    bf_parallel_for(n, threads, min_items, zero_flags_range, &c);
}
