/* SHA-256 of 16 equal-length messages at once, one per 32-bit lane of
 * AVX-512 registers (multi-buffer hashing). A single SHA-256 stream is a
 * chain of dependent rounds that leaves the vector units idle even with the
 * SHA extensions; 16 independent streams keep them busy (docs/native.md,
 * bench/native_bench.py). Block digests are independent
 * messages of one length, which is what this needs. */
#ifndef BF_SHA256_X16_H
#define BF_SHA256_X16_H

#include <stddef.h>
#include <stdint.h>

#define BF_SHA256_LANES 16

/* out[j] = SHA-256(in[j][0..len)) for j < 16. Needs AVX-512F and AVX-512BW
 * (the caller checks the CPU). The same pointer may appear in several lanes. */
void bf_sha256_x16(const uint8_t *const in[BF_SHA256_LANES], size_t len, uint8_t *const out[BF_SHA256_LANES]);

#endif
