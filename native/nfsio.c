#include "nfsio.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <nfsc/libnfs.h>

struct nfs_context *bf_nfs_connect(const char *server, const char *export, int nfs_port, int mount_port,
                                   int timeout_ms, int uid, int gid, char *err, size_t errlen)
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

int bf_nfs_pwrite_all(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, const void *buf,
                      size_t len)
{
    /* At most the server's write size per call: larger calls (libnfs 4.0
     * caps or splits them itself) measured more than twice the client CPU,
     * 1.25 against 0.52 CPU-seconds per 2 GiB in 4 MiB calls (README,
     * targets benchmark). */
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

ssize_t bf_nfs_pread_full(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, void *buf,
                          size_t len)
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
