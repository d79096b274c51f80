/* XXH3-128 builds per instruction set (see xxh3_impl.h). */
#ifndef BF_XXH3_ISA_H
#define BF_XXH3_ISA_H

#include <stddef.h>
#include <stdint.h>

void bf_xxh3_128_sse2(const void *buf, size_t len, uint8_t *out);
void bf_xxh3_128_avx2(const void *buf, size_t len, uint8_t *out);
void bf_xxh3_128_avx512(const void *buf, size_t len, uint8_t *out);

#endif
