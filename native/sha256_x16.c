/* SHA-256 (FIPS 180-4) over 16 messages in the 16 lanes of AVX-512 registers.
 * Checked against OpenSSL and hashlib for every length class and lane
 * (tests/test_native.py, native/tests/kernel_selftest.c). */
#pragma GCC target("avx512f,avx512bw")
#include "sha256_x16.h"

#include <immintrin.h>
#include <string.h>

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

#define ROR(x, n) _mm512_ror_epi32((x), (n))
/* ternary logic truth tables: a ^ b ^ c, a ? b : c (Ch), majority (Maj) */
#define XOR3(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0x96)
#define CH(e, f, g) _mm512_ternarylogic_epi32((e), (f), (g), 0xCA)
#define MAJ(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0xE8)
#define ADD(a, b) _mm512_add_epi32((a), (b))

/* r[j] holds the 16 words of lane j's 64-byte block; afterwards r[t] holds
 * word t of every lane (a 16x16 transpose of 32-bit words). */
static inline void transpose16(__m512i r[16])
{
    __m512i t[16];
    /* 1. pairs of rows: in each 128-bit part k, t[i] = r[i][4k], r[i+1][4k],
     *    r[i][4k+1], r[i+1][4k+1]; t[i+1] the same for words 4k+2, 4k+3 */
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* 2. groups of four rows g = i/4: r[i+m] holds, in part k, word 4k+m of
     *    rows i..i+3 */
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* 3-4. word 4k+m of group g sits in part k of r[4g+m]; it must go to part
     *    g of word 4k+m: a 4x4 transpose of 128-bit parts, for each m */
    for (int m = 0; m < 4; m++) {
        __m512i a = r[m], b = r[4 + m], c = r[8 + m], d = r[12 + m];
        __m512i ab02 = _mm512_shuffle_i32x4(a, b, 0x88), ab13 = _mm512_shuffle_i32x4(a, b, 0xDD);
        __m512i cd02 = _mm512_shuffle_i32x4(c, d, 0x88), cd13 = _mm512_shuffle_i32x4(c, d, 0xDD);
        r[m] = _mm512_shuffle_i32x4(ab02, cd02, 0x88);      /* k = 0 */
        r[4 + m] = _mm512_shuffle_i32x4(ab13, cd13, 0x88);  /* k = 1 */
        r[8 + m] = _mm512_shuffle_i32x4(ab02, cd02, 0xDD);  /* k = 2 */
        r[12 + m] = _mm512_shuffle_i32x4(ab13, cd13, 0xDD); /* k = 3 */
    }
}

/* Run the compression function over nblocks 64-byte blocks of each lane. */
static void compress(__m512i s[8], const uint8_t *const p[BF_SHA256_LANES], size_t nblocks)
{
    const __m512i bswap =
        _mm512_broadcast_i32x4(_mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL)); /* big-endian words */
    for (size_t blk = 0; blk < nblocks; blk++) {
        __m512i w[16];
        for (int j = 0; j < BF_SHA256_LANES; j++)
            w[j] = _mm512_loadu_si512(p[j] + 64 * blk);
        transpose16(w);
        __m512i a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
        for (int t = 0; t < 64; t++) {
            __m512i wt; /* the message schedule, 16 words kept in a ring */
            if (t < 16) {
                wt = w[t] = _mm512_shuffle_epi8(w[t], bswap);
            } else {
                __m512i w15 = w[(t - 15) & 15], w2 = w[(t - 2) & 15];
                __m512i s0 = XOR3(ROR(w15, 7), ROR(w15, 18), _mm512_srli_epi32(w15, 3));
                __m512i s1 = XOR3(ROR(w2, 17), ROR(w2, 19), _mm512_srli_epi32(w2, 10));
                wt = w[t & 15] = ADD(ADD(w[t & 15], s0), ADD(w[(t - 7) & 15], s1));
            }
            __m512i t1 = ADD(ADD(h, XOR3(ROR(e, 6), ROR(e, 11), ROR(e, 25))),
                             ADD(CH(e, f, g), ADD(wt, _mm512_set1_epi32((int)K[t]))));
            __m512i t2 = ADD(XOR3(ROR(a, 2), ROR(a, 13), ROR(a, 22)), MAJ(a, b, c));
            h = g;
            g = f;
            f = e;
            e = ADD(d, t1);
            d = c;
            c = b;
            b = a;
            a = ADD(t1, t2);
        }
        s[0] = ADD(s[0], a);
        s[1] = ADD(s[1], b);
        s[2] = ADD(s[2], c);
        s[3] = ADD(s[3], d);
        s[4] = ADD(s[4], e);
        s[5] = ADD(s[5], f);
        s[6] = ADD(s[6], g);
        s[7] = ADD(s[7], h);
    }
}

void bf_sha256_x16(const uint8_t *const in[BF_SHA256_LANES], size_t len, uint8_t *const out[BF_SHA256_LANES])
{
    __m512i s[8];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_set1_epi32((int)H0[i]);
    size_t full = len / 64, rest = len % 64;
    compress(s, in, full);

    /* padding: the rest, 0x80, zeros, the bit length (big-endian) at the end
     * of one block, or of two when fewer than 9 bytes are left in the first */
    size_t tail_blocks = rest < 56 ? 1 : 2;
    uint8_t tail[BF_SHA256_LANES][128];
    const uint8_t *tp[BF_SHA256_LANES];
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < BF_SHA256_LANES; j++) {
        memset(tail[j], 0, sizeof(tail[j]));
        memcpy(tail[j], in[j] + full * 64, rest);
        tail[j][rest] = 0x80;
        for (int i = 0; i < 8; i++)
            tail[j][tail_blocks * 64 - 1 - i] = (uint8_t)(bits >> (8 * i));
        tp[j] = tail[j];
    }
    compress(s, tp, tail_blocks);

    uint32_t words[8][BF_SHA256_LANES];
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512(words[i], s[i]);
    for (int j = 0; j < BF_SHA256_LANES; j++) {
        for (int i = 0; i < 8; i++) {
            uint32_t v = words[i][j];
            out[j][4 * i] = (uint8_t)(v >> 24);
            out[j][4 * i + 1] = (uint8_t)(v >> 16);
            out[j][4 * i + 2] = (uint8_t)(v >> 8);
            out[j][4 * i + 3] = (uint8_t)v;
        }
    }
}
