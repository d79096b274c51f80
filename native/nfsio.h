/* NFSv3 through libnfs, synchronous calls only. This is the one file that
 * calls libnfs: connecting, whole-buffer pread/pwrite loops and the path
 * operations the Python glue (py_nfs.c) offers. Plain C. A context is not
 * thread-safe (libnfs 4): callers serialize calls on one context. Every call
 * that can fail returns 0 (or a count) or -errno; bf_nfs_error() then holds
 * the server's message. */
#ifndef BF_NFSIO_H
#define BF_NFSIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct nfs_context;
struct nfsfh;
struct nfsdir;

/* Connect and mount `export` on `server`. Ports of 0 ask the portmapper.
 * Every later call fails after timeout_ms instead of hanging; a broken
 * connection is not re-established (the caller opens a new context).
 * Returns NULL with a message in err on failure. */
struct nfs_context *bf_nfs_connect(const char *server, const char *export, int nfs_port, int mount_port, int timeout_ms,
                                   int uid, int gid, char *err, size_t errlen);

/* Unmount and free the context (and every file still open on it). */
void bf_nfs_disconnect(struct nfs_context *nfs);

/* The last error libnfs recorded on the context, or "" (never NULL). */
const char *bf_nfs_error(struct nfs_context *nfs);

/* Open path with os.O_* flags; O_CREAT creates the file with mode. */
int bf_nfs_open(struct nfs_context *nfs, const char *path, int flags, int mode, struct nfsfh **fh);
void bf_nfs_close(struct nfs_context *nfs, struct nfsfh *fh);
int bf_nfs_fsync(struct nfs_context *nfs, struct nfsfh *fh);

/* Write all of buf at offset; 0 or -errno. */
int bf_nfs_pwrite_all(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, const void *buf, size_t len);

/* Read up to len bytes at offset, short only at end of file; the count or
 * -errno. */
ssize_t bf_nfs_pread_full(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, void *buf, size_t len);

int bf_nfs_unlink(struct nfs_context *nfs, const char *path);
int bf_nfs_mkdir(struct nfs_context *nfs, const char *path, int mode);
int bf_nfs_rmdir(struct nfs_context *nfs, const char *path);
int bf_nfs_rename(struct nfs_context *nfs, const char *from, const char *to);

struct bf_nfs_stat {
    uint64_t size;
    uint64_t mode;
    uint64_t used; /* bytes allocated on the server */
    double mtime;  /* seconds since the epoch */
    int is_dir;
};
int bf_nfs_stat(struct nfs_context *nfs, const char *path, struct bf_nfs_stat *st);

struct bf_nfs_statvfs {
    uint64_t frsize, blocks, bfree, bavail;
};
int bf_nfs_statvfs(struct nfs_context *nfs, const char *path, struct bf_nfs_statvfs *st);

/* A directory listing: opendir reads all of it from the server; next walks
 * it locally (1 and an entry, 0 at the end; "." and ".." are skipped). */
struct bf_nfs_dirent {
    const char *name; /* valid until bf_nfs_closedir */
    int is_dir;
    uint64_t size;
};
int bf_nfs_opendir(struct nfs_context *nfs, const char *path, struct nfsdir **dir);
int bf_nfs_readdir(struct nfs_context *nfs, struct nfsdir *dir, struct bf_nfs_dirent *out);
void bf_nfs_closedir(struct nfs_context *nfs, struct nfsdir *dir);

#endif
