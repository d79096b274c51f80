/* One XXH3-128 entry point compiled for the instruction set the including
 * file selects with #pragma GCC target. libxxhash as Debian builds it uses
 * SSE2 only; inlining the header per ISA gives AVX2/AVX-512 speed, chosen at
 * run time in digest.c. Include this from exactly one .c file per ISA. */
#ifndef BF_XXH3_FN
#error "define BF_XXH3_FN before including xxh3_impl.h"
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

void BF_XXH3_FN(const void *buf, size_t len, uint8_t *out);

void BF_XXH3_FN(const void *buf, size_t len, uint8_t *out)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, len));
    memcpy(out, c.digest, 16);
}
