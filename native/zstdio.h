/* zstd decompression straight into a caller's buffer (a restore's recycled
 * chunk buffers), so no fresh 4 MiB allocation is paged in per chunk. One
 * decompression context per thread, freed when the thread exits. */
#ifndef BF_ZSTDIO_H
#define BF_ZSTDIO_H

#include <stddef.h>

/* Decompress the zstd frame(s) src[0:src_len] into dst[0:cap]. Returns 0 and
 * sets *out_len, or -1 with *err set to a static message (a damaged frame,
 * or content larger than cap). */
int bf_zstd_decompress(const void *src, size_t src_len, void *dst, size_t cap, size_t *out_len, const char **err);

#endif
