#include "zstdio.h"

#include <pthread.h>
#include <zstd.h>

static pthread_key_t dctx_key;
static pthread_once_t dctx_once = PTHREAD_ONCE_INIT;
static int dctx_key_ok;

static void free_dctx(void *p)
{
    ZSTD_freeDCtx(p);
}

static void make_key(void)
{
    dctx_key_ok = pthread_key_create(&dctx_key, free_dctx) == 0;
}

static ZSTD_DCtx *thread_dctx(void)
{
    pthread_once(&dctx_once, make_key);
    if (!dctx_key_ok)
        return NULL;
    ZSTD_DCtx *d = pthread_getspecific(dctx_key);
    if (!d) {
        d = ZSTD_createDCtx();
        if (d && pthread_setspecific(dctx_key, d) != 0) {
            ZSTD_freeDCtx(d);
            d = NULL;
        }
    }
    return d;
}

int bf_zstd_decompress(const void *src, size_t src_len, void *dst, size_t cap, size_t *out_len, const char **err)
{
    ZSTD_DCtx *d = thread_dctx();
    if (!d) {
        *err = "cannot create a zstd decompression context";
        return -1;
    }
    size_t n = ZSTD_decompressDCtx(d, dst, cap, src, src_len);
    if (ZSTD_isError(n)) {
        /* A failed call leaves the context reusable, but start clean anyway. */
        ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
        *err = ZSTD_getErrorName(n);
        return -1;
    }
    *out_len = n;
    return 0;
}
