#include "nfsio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <nfsc/libnfs.h>

struct nfs_context *bf_nfs_connect(const char *server, const char *export, int nfs_port, int mount_port, int timeout_ms,
                                   int uid, int gid, char *err, size_t errlen)
{
    struct nfs_context *nfs = nfs_init_context();
    if (!nfs) {
        snprintf(err, errlen, "cannot create an NFS context");
        return NULL;
    }
    char url[1024];
    int n = snprintf(url, sizeof(url), "nfs://%s%s?version=3&autoreconnect=0", server, export);
    if (nfs_port > 0)
        n += snprintf(url + n, sizeof(url) - (size_t)n, "&nfsport=%d", nfs_port);
    if (mount_port > 0)
        n += snprintf(url + n, sizeof(url) - (size_t)n, "&mountport=%d", mount_port);
    if (n >= (int)sizeof(url)) {
        snprintf(err, errlen, "server or export name too long");
        nfs_destroy_context(nfs);
        return NULL;
    }
    /* Parsing the URL applies its arguments (ports, version) to the context. */
    struct nfs_url *u = nfs_parse_url_dir(nfs, url);
    if (!u) {
        snprintf(err, errlen, "bad server or export: %s", nfs_get_error(nfs));
        nfs_destroy_context(nfs);
        return NULL;
    }
    if (timeout_ms > 0)
        nfs_set_timeout(nfs, timeout_ms);
    if (uid >= 0)
        nfs_set_uid(nfs, uid);
    if (gid >= 0)
        nfs_set_gid(nfs, gid);
    int rc = nfs_mount(nfs, u->server, u->path);
    nfs_destroy_url(u);
    if (rc != 0) {
        snprintf(err, errlen, "mount failed: %s", nfs_get_error(nfs));
        nfs_destroy_context(nfs);
        return NULL;
    }
    return nfs;
}

int bf_nfs_pwrite_all(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, const void *buf, size_t len)
{
    /* At most the server's write size per call: larger calls (libnfs 4.0
     * caps or splits them itself) cost about twice the client CPU (see
     * docs/benchmarks.md, targets). */
    uint64_t max = nfs_get_writemax(nfs);
    const char *p = buf;
    while (len > 0) {
        size_t step = max && len > max ? (size_t)max : len;
        int n = nfs_pwrite(nfs, fh, offset, step, p);
        if (n < 0)
            return n;
        if (n == 0)
            return -EIO;
        p += n;
        offset += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

ssize_t bf_nfs_pread_full(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, void *buf, size_t len)
{
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        int n = nfs_pread(nfs, fh, offset + got, len - got, p + got);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

void bf_nfs_disconnect(struct nfs_context *nfs)
{
    nfs_destroy_context(nfs);
}

const char *bf_nfs_error(struct nfs_context *nfs)
{
    const char *msg = nfs ? nfs_get_error(nfs) : NULL;
    return msg ? msg : "";
}

int bf_nfs_open(struct nfs_context *nfs, const char *path, int flags, int mode, struct nfsfh **fh)
{
    if (flags & O_CREAT)
        return nfs_create(nfs, path, flags & ~O_CREAT, mode, fh);
    return nfs_open(nfs, path, flags, fh);
}

void bf_nfs_close(struct nfs_context *nfs, struct nfsfh *fh)
{
    nfs_close(nfs, fh);
}

int bf_nfs_fsync(struct nfs_context *nfs, struct nfsfh *fh)
{
    return nfs_fsync(nfs, fh);
}

int bf_nfs_unlink(struct nfs_context *nfs, const char *path)
{
    return nfs_unlink(nfs, path);
}

int bf_nfs_mkdir(struct nfs_context *nfs, const char *path, int mode)
{
    return nfs_mkdir2(nfs, path, mode);
}

int bf_nfs_rmdir(struct nfs_context *nfs, const char *path)
{
    return nfs_rmdir(nfs, path);
}

int bf_nfs_rename(struct nfs_context *nfs, const char *from, const char *to)
{
    return nfs_rename(nfs, from, to);
}

int bf_nfs_stat(struct nfs_context *nfs, const char *path, struct bf_nfs_stat *st)
{
    struct nfs_stat_64 s;
    int rc = nfs_stat64(nfs, path, &s);
    if (rc < 0)
        return rc;
    st->size = s.nfs_size;
    st->mode = s.nfs_mode;
    st->used = s.nfs_used;
    st->mtime = (double)s.nfs_mtime + s.nfs_mtime_nsec / 1e9;
    st->is_dir = (s.nfs_mode & S_IFMT) == S_IFDIR;
    return 0;
}

int bf_nfs_statvfs(struct nfs_context *nfs, const char *path, struct bf_nfs_statvfs *st)
{
    struct nfs_statvfs_64 s;
    int rc = nfs_statvfs64(nfs, path, &s);
    if (rc < 0)
        return rc;
    st->frsize = s.f_frsize;
    st->blocks = s.f_blocks;
    st->bfree = s.f_bfree;
    st->bavail = s.f_bavail;
    return 0;
}

int bf_nfs_opendir(struct nfs_context *nfs, const char *path, struct nfsdir **dir)
{
    return nfs_opendir(nfs, path, dir);
}

int bf_nfs_readdir(struct nfs_context *nfs, struct nfsdir *dir, struct bf_nfs_dirent *out)
{
    struct nfsdirent *e;
    while ((e = nfs_readdir(nfs, dir)) != NULL) {
        if (strcmp(e->name, ".") == 0 || strcmp(e->name, "..") == 0)
            continue;
        out->name = e->name;
        out->is_dir = (e->mode & S_IFMT) == S_IFDIR;
        out->size = e->size;
        return 1;
    }
    return 0;
}

void bf_nfs_closedir(struct nfs_context *nfs, struct nfsdir *dir)
{
    nfs_closedir(nfs, dir);
}
