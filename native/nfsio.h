/* NFSv3 through libnfs, synchronous calls only: connecting and whole-buffer
 * pread/pwrite loops. Plain C; the Python glue lives in module.c. A context
 * is not thread-safe (libnfs 4): callers serialize calls on one context. */
#ifndef BF_NFSIO_H
#define BF_NFSIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct nfs_context;
struct nfsfh;

/* Connect and mount `export` on `server`. Ports of 0 ask the portmapper.
 * Every later call fails after timeout_ms instead of hanging; a broken
 * connection is not re-established (the caller opens a new context).
 * Returns NULL with a message in err on failure. */
struct nfs_context *bf_nfs_connect(const char *server, const char *export, int nfs_port, int mount_port,
                                   int timeout_ms, int uid, int gid, char *err, size_t errlen);

/* Write all of buf at offset; 0 or -errno. */
int bf_nfs_pwrite_all(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, const void *buf,
                      size_t len);

/* Read up to len bytes at offset, short only at end of file; the count or
 * -errno. */
ssize_t bf_nfs_pread_full(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, void *buf,
                          size_t len);

#endif
