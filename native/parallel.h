/* Split a range of independent items over a few short-lived threads. */
#ifndef BF_PARALLEL_H
#define BF_PARALLEL_H

#include <stddef.h>

/* Called once per contiguous range [first, first + count). */
typedef void (*bf_range_fn)(void *ctx, size_t first, size_t count);

/* Number of threads to use for `threads` as given by a caller: 0 means one
 * per online CPU (at most BF_MAX_THREADS). */
#define BF_MAX_THREADS 64
unsigned bf_effective_threads(unsigned threads);

/* Run fn over n items with up to `threads` threads (the calling thread is one
 * of them). Ranges never split below min_items items. If a thread cannot be
 * created its range runs on the calling thread, so this never fails. */
void bf_parallel_for(size_t n, unsigned threads, size_t min_items, bf_range_fn fn, void *ctx);

#endif
