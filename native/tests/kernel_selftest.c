/* Drives the kernels on a file's content so a test can run them under
 * AddressSanitizer/UBSan and compare the output with the Python reference.
 *
 * usage: kernel_selftest OLD NEW BLOCK_SIZE THREADS
 * prints, for NEW: per-block sha256 and xxh3-128 digests, zero flags, the
 * image digest (fed in pieces of varying size, zero pieces via _zero), and
 * the changed extents between OLD's and NEW's sha256 block digests; and
 * "zstd ok" when NEW survives a zstd round trip through bf_zstd_decompress
 * (and a too-small or truncated input is refused). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../diff.h"
#include "../digest.h"
#include "../imagehash.h"
#include "../zero.h"
#include "../zstdio.h"

#include <zstd.h>

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n ? (size_t)n : 1);
    if (buf && n && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void hex(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%02x", p[i]);
}

static int print_digests(int algo, const char *name, const unsigned char *buf, size_t len, size_t bs, unsigned threads,
                         unsigned char **keep)
{
    size_t n = len ? (len + bs - 1) / bs : 0, ds = bf_digest_size(algo);
    unsigned char *d = malloc(n * ds + 1), *z = malloc(n + 1);
    if (bf_block_digests(algo, buf, len, bs, threads, d, z) != 0)
        return -1;
    printf("%s ", name);
    for (size_t i = 0; i < n; i++) {
        if (i)
            putchar(',');
        hex(d + i * ds, ds);
    }
    printf("\nzero-%s ", name);
    for (size_t i = 0; i < n; i++)
        putchar('0' + z[i]);
    putchar('\n');
    free(z);
    if (keep)
        *keep = d;
    else
        free(d);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s OLD NEW BLOCK_SIZE THREADS\n", argv[0]);
        return 2;
    }
    size_t old_len, len, bs = strtoul(argv[3], NULL, 10);
    unsigned threads = (unsigned)strtoul(argv[4], NULL, 10);
    unsigned char *old = slurp(argv[1], &old_len), *buf = slurp(argv[2], &len);
    if (!old || !buf || !bs)
        return 2;

    printf("sha256-isa %s\n", bf_sha256_isa());
    unsigned char *dold = NULL, *dnew = NULL;
    size_t n_old = old_len ? (old_len + bs - 1) / bs : 0, n_new = len ? (len + bs - 1) / bs : 0;
    if (print_digests(BF_ALGO_SHA256, "sha256", buf, len, bs, threads, &dnew) ||
        print_digests(BF_ALGO_XXH3_128, "xxh3-128", buf, len, bs, threads, NULL))
        return 1;
    /* old's digests, quietly */
    dold = malloc(n_old * 32 + 1);
    if (bf_block_digests(BF_ALGO_SHA256, old, old_len, bs, threads, dold, NULL) != 0)
        return 1;

    unsigned char *flags = malloc(n_new + 1);
    bf_zero_flags(buf, len, bs, threads, flags);
    printf("zeroflags ");
    for (size_t i = 0; i < n_new; i++)
        putchar('0' + flags[i]);
    printf("\niszero %d\n", bf_is_zero(buf, len));

    static const size_t pieces[] = {1, 4097, 65536, 100000, 1 << 20, 3};
    struct bf_imagehash *h = bf_imagehash_new(threads);
    for (size_t off = 0, i = 0; off < len; i++) {
        size_t n = pieces[i % 6];
        if (n > len - off)
            n = len - off;
        int rc = bf_is_zero(buf + off, n) ? bf_imagehash_zero(h, n) : bf_imagehash_update(h, buf + off, n);
        if (rc != 0)
            return 1;
        off += n;
    }
    unsigned char img[32], again[32];
    if (bf_imagehash_final(h, img) || bf_imagehash_final(h, again) || memcmp(img, again, 32))
        return 1;
    if (bf_imagehash_update(h, buf, 0) != -1) /* finished: refused */
        return 1;
    bf_imagehash_free(h);
    printf("image ");
    hex(img, 32);

    size_t count = bf_diff_digests(dold, n_old, dnew, n_new, 32, bs, len, NULL, 0);
    struct bf_extent *ext = malloc((count + 1) * sizeof(*ext));
    bf_diff_digests(dold, n_old, dnew, n_new, 32, bs, len, ext, count);
    printf("\ndiff ");
    for (size_t i = 0; i < count; i++)
        printf("%s%llu:%llu", i ? "," : "", (unsigned long long)ext[i].start, (unsigned long long)ext[i].length);
    putchar('\n');

    size_t bound = ZSTD_compressBound(len), zlen, outlen = 0;
    unsigned char *z = malloc(bound + 1), *back = malloc(len + 1);
    const char *err = NULL;
    zlen = ZSTD_compress(z, bound, buf, len, 1);
    if (ZSTD_isError(zlen))
        return 1;
    int ok = bf_zstd_decompress(z, zlen, back, len, &outlen, &err) == 0 && outlen == len && memcmp(back, buf, len) == 0;
    if (len > 0) /* one byte short of room, and a truncated frame: both refused */
        ok = ok && bf_zstd_decompress(z, zlen, back, len - 1, &outlen, &err) == -1 && err &&
             bf_zstd_decompress(z, zlen - 1, back, len, &outlen, &err) == -1;
    printf("zstd %s\n", ok ? "ok" : "FAILED");
    free(z);
    free(back);
    free(ext);
    free(flags);
    free(dold);
    free(dnew);
    free(old);
    free(buf);
    return 0;
}
