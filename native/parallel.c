#include "parallel.h"

#include <pthread.h>
#include <unistd.h>

unsigned bf_effective_threads(unsigned threads)
{
    if (threads == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cpus > 0 ? (unsigned)cpus : 1;
    }
    return threads > BF_MAX_THREADS ? BF_MAX_THREADS : threads;
}

struct range_job {
    bf_range_fn fn;
    void *ctx;
    size_t first;
    size_t count;
};

static void *run_range(void *arg)
{
    struct range_job *job = arg;
    job->fn(job->ctx, job->first, job->count);
    return NULL;
}

void bf_parallel_for(size_t n, unsigned threads, size_t min_items, bf_range_fn fn, void *ctx)
{
    if (n == 0)
        return;
    if (min_items == 0)
        min_items = 1;
    size_t workers = bf_effective_threads(threads);
    if (workers > n / min_items)
        workers = n / min_items;
    if (workers <= 1) {
        fn(ctx, 0, n);
        return;
    }

    struct range_job jobs[BF_MAX_THREADS];
    pthread_t tids[BF_MAX_THREADS];
    int started[BF_MAX_THREADS] = {0};
    size_t per = n / workers, extra = n % workers, first = 0;
    for (size_t i = 0; i < workers; i++) {
        size_t count = per + (i < extra ? 1 : 0);
        jobs[i] = (struct range_job){fn, ctx, first, count};
        first += count;
    }
    /* Workers 1..k in new threads, worker 0 here. */
    for (size_t i = 1; i < workers; i++)
        started[i] = pthread_create(&tids[i], NULL, run_range, &jobs[i]) == 0;
    run_range(&jobs[0]);
    for (size_t i = 1; i < workers; i++) {
        if (started[i])
            pthread_join(tids[i], NULL);
        else
            run_range(&jobs[i]);
    }
}
