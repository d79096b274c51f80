#include "iscsiio.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define MAX_XFER (1u << 20)

static enum bf_iscsi_fail classify(const char *msg)
{
    if (msg && (strstr(msg, "uthentication") || strstr(msg, "uthorization") || strstr(msg, "CHAP")))
        return BF_ISCSI_AUTH;
    return BF_ISCSI_CONNECT;
}

static struct iscsi_context *new_context(const char *initiator, const char *user, const char *secret, int timeout_s,
                                         char *err, size_t errlen)
{
    struct iscsi_context *iscsi = iscsi_create_context(initiator);
    if (!iscsi) {
        snprintf(err, errlen, "cannot create an iSCSI context");
        return NULL;
    }
    iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_noautoreconnect(iscsi, 1);
    if (timeout_s > 0)
        iscsi_set_timeout(iscsi, timeout_s);
    if (user && *user && iscsi_set_initiator_username_pwd(iscsi, user, secret ? secret : "") != 0) {
        snprintf(err, errlen, "cannot set CHAP credentials");
        iscsi_destroy_context(iscsi);
        return NULL;
    }
    return iscsi;
}

/* A target reports UNIT ATTENTION (reset, capacity changed...) once to each
 * new session; the command is simply repeated. */
static int unit_attention(struct scsi_task *task)
{
    return task && task->status == SCSI_STATUS_CHECK_CONDITION && task->sense.key == SCSI_SENSE_UNIT_ATTENTION;
}

#define WITH_UA_RETRY(task, call)                          \
    do {                                                   \
        for (int attempt_ = 0; attempt_ < 4; attempt_++) { \
            task = (call);                                 \
            if (!unit_attention(task))                     \
                break;                                     \
            scsi_free_scsi_task(task);                     \
            task = NULL;                                   \
        }                                                  \
    } while (0)

static int task_failed(struct iscsi_context *iscsi, struct scsi_task *task, const char *what, char *err, size_t errlen)
{
    if (task && task->status == SCSI_STATUS_GOOD)
        return 0;
    if (task && task->status == SCSI_STATUS_CHECK_CONDITION)
        snprintf(err, errlen, "%s: %s (%s)", what, scsi_sense_key_str(task->sense.key),
                 scsi_sense_ascq_str(task->sense.ascq));
    else
        snprintf(err, errlen, "%s: %s", what, iscsi_get_error(iscsi));
    return -1;
}

static int read_capacity(struct iscsi_context *iscsi, int lun, uint32_t *block_size, uint64_t *num_blocks, char *err,
                         size_t errlen)
{
    struct scsi_task *task;
    WITH_UA_RETRY(task, iscsi_readcapacity16_sync(iscsi, lun));
    if (task_failed(iscsi, task, "READ CAPACITY(16)", err, errlen)) {
        if (task)
            scsi_free_scsi_task(task);
        return -1;
    }
    struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(task);
    if (!rc) {
        snprintf(err, errlen, "READ CAPACITY(16): cannot parse the reply");
        scsi_free_scsi_task(task);
        return -1;
    }
    *block_size = rc->block_length;
    *num_blocks = rc->returned_lba + 1;
    scsi_free_scsi_task(task);
    return 0;
}

struct iscsi_context *bf_iscsi_login(const char *initiator, const char *portal, const char *target, int lun, int probe,
                                     const char *user, const char *secret, int timeout_s, uint32_t *block_size,
                                     uint64_t *num_blocks, enum bf_iscsi_fail *fail, char *err, size_t errlen)
{
    *fail = BF_ISCSI_CONNECT;
    struct iscsi_context *iscsi = new_context(initiator, user, secret, timeout_s, err, errlen);
    if (!iscsi)
        return NULL;
    iscsi_set_targetname(iscsi, target);
    iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
    if (iscsi_full_connect_sync(iscsi, portal, lun) != 0) {
        const char *msg = iscsi_get_error(iscsi);
        *fail = classify(msg);
        snprintf(err, errlen, "login to %s failed: %s", target, msg);
        iscsi_destroy_context(iscsi);
        return NULL;
    }
    if (probe) {
        *block_size = 0;
        *num_blocks = 0;
    } else if (read_capacity(iscsi, lun, block_size, num_blocks, err, errlen) != 0) {
        *fail = BF_ISCSI_SCSI;
        iscsi_logout_sync(iscsi);
        iscsi_destroy_context(iscsi);
        return NULL;
    }
    *fail = BF_ISCSI_OK;
    return iscsi;
}

static int bf_iscsi_read_sync(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, void *buf,
                              size_t len, char *err, size_t errlen)
{
    char *p = buf;
    while (len > 0) {
        uint32_t n = len > MAX_XFER ? MAX_XFER : (uint32_t)len;
        struct scsi_iovec iov = {p, n};
        struct scsi_task *task;
        WITH_UA_RETRY(
            task, iscsi_read16_iov_sync(iscsi, lun, offset / block_size, n, (int)block_size, 0, 0, 0, 0, 0, &iov, 1));
        int bad = task_failed(iscsi, task, "READ(16)", err, errlen);
        if (task)
            scsi_free_scsi_task(task);
        if (bad)
            return -1;
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

static int bf_iscsi_write_sync(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset,
                               const void *buf, size_t len, char *err, size_t errlen)
{
    const char *p = buf;
    while (len > 0) {
        uint32_t n = len > MAX_XFER ? MAX_XFER : (uint32_t)len;
        struct scsi_task *task;
        WITH_UA_RETRY(task, iscsi_write16_sync(iscsi, lun, offset / block_size, (unsigned char *)p, n, (int)block_size,
                                               0, 0, 0, 0, 0));
        int bad = task_failed(iscsi, task, "WRITE(16)", err, errlen);
        if (task)
            scsi_free_scsi_task(task);
        if (bad)
            return -1;
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

/* Pipelined I/O: up to DEPTH commands of at most MAX_XFER bytes in flight on
 * the one connection, served by poll() + iscsi_service(). A piece that
 * comes back with UNIT ATTENTION is redone synchronously afterwards (with
 * the retry above); any other failure ends the call. */
#define DEPTH 8

struct piece {
    uint64_t offset;
    char *buf;
    uint32_t len;
};

struct pipeline {
    int inflight;
    int failed;
    int n_retry;
    struct piece retry[DEPTH * 2];
    char *err;
    size_t errlen;
    const char *what;
};

struct pending {
    struct pipeline *pl;
    struct piece pc;
    struct scsi_iovec iov;
};

static void piece_done(struct iscsi_context *iscsi, int status, void *command_data, void *private_data)
{
    struct pending *pd = private_data;
    struct pipeline *pl = pd->pl;
    struct scsi_task *task = command_data;
    pl->inflight--;
    if (status == SCSI_STATUS_GOOD) {
        /* done */
    } else if (unit_attention(task) && pl->n_retry < (int)(sizeof(pl->retry) / sizeof(pl->retry[0]))) {
        pl->retry[pl->n_retry++] = pd->pc;
    } else if (!pl->failed) {
        pl->failed = 1;
        if (task && status == SCSI_STATUS_CHECK_CONDITION)
            snprintf(pl->err, pl->errlen, "%s: %s (%s)", pl->what, scsi_sense_key_str(task->sense.key),
                     scsi_sense_ascq_str(task->sense.ascq));
        else
            snprintf(pl->err, pl->errlen, "%s: %s", pl->what, iscsi_get_error(iscsi));
    }
    if (task)
        scsi_free_scsi_task(task);
    free(pd);
}

static int pump(struct iscsi_context *iscsi, struct pipeline *pl)
{
    struct pollfd pfd = {.fd = iscsi_get_fd(iscsi), .events = (short)iscsi_which_events(iscsi)};
    int rc = poll(&pfd, 1, 1000);
    if (rc < 0 && errno != EINTR) {
        snprintf(pl->err, pl->errlen, "%s: poll: %s", pl->what, strerror(errno));
        return -1;
    }
    /* revents 0 on a timeout lets libiscsi expire overdue commands */
    if (iscsi_service(iscsi, rc > 0 ? pfd.revents : 0) < 0) {
        snprintf(pl->err, pl->errlen, "%s: %s", pl->what, iscsi_get_error(iscsi));
        return -1;
    }
    return 0;
}

static int pipelined(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, char *buf, size_t len,
                     int write, char *err, size_t errlen)
{
    struct pipeline pl = {.err = err, .errlen = errlen, .what = write ? "WRITE(16)" : "READ(16)"};
    int broken = 0;
    while ((len > 0 && !pl.failed && !broken) || pl.inflight > 0) {
        while (len > 0 && !pl.failed && !broken && pl.inflight < DEPTH) {
            uint32_t n = len > MAX_XFER ? MAX_XFER : (uint32_t)len;
            struct pending *pd = malloc(sizeof(*pd));
            if (!pd) {
                snprintf(err, errlen, "%s: out of memory", pl.what);
                broken = 1;
                break;
            }
            pd->pl = &pl;
            pd->pc = (struct piece){offset, buf, n};
            pd->iov = (struct scsi_iovec){buf, n};
            struct scsi_task *task = write ? iscsi_write16_task(iscsi, lun, offset / block_size, (unsigned char *)buf,
                                                                n, (int)block_size, 0, 0, 0, 0, 0, piece_done, pd)
                                           : iscsi_read16_iov_task(iscsi, lun, offset / block_size, n, (int)block_size,
                                                                   0, 0, 0, 0, 0, piece_done, pd, &pd->iov, 1);
            if (!task) {
                snprintf(err, errlen, "%s: %s", pl.what, iscsi_get_error(iscsi));
                free(pd);
                broken = 1;
                break;
            }
            pl.inflight++;
            buf += n;
            offset += n;
            len -= n;
        }
        if (pl.inflight > 0 && pump(iscsi, &pl) != 0) {
            /* the connection is gone: cancel what is left (their callbacks run now) */
            iscsi_scsi_cancel_all_tasks(iscsi);
            return -1;
        }
    }
    if (pl.failed || broken)
        return -1;
    for (int i = 0; i < pl.n_retry; i++) {
        struct piece *pc = &pl.retry[i];
        int rc = write ? bf_iscsi_write_sync(iscsi, lun, block_size, pc->offset, pc->buf, pc->len, err, errlen)
                       : bf_iscsi_read_sync(iscsi, lun, block_size, pc->offset, pc->buf, pc->len, err, errlen);
        if (rc)
            return -1;
    }
    return 0;
}

int bf_iscsi_read(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, void *buf, size_t len,
                  char *err, size_t errlen)
{
    return pipelined(iscsi, lun, block_size, offset, buf, len, 0, err, errlen);
}

int bf_iscsi_write(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, const void *buf,
                   size_t len, char *err, size_t errlen)
{
    return pipelined(iscsi, lun, block_size, offset, (char *)buf, len, 1, err, errlen);
}

void bf_iscsi_close(struct iscsi_context *iscsi)
{
    iscsi_logout_sync(iscsi);
    iscsi_destroy_context(iscsi);
}

int bf_iscsi_flush(struct iscsi_context *iscsi, int lun, char *err, size_t errlen)
{
    struct scsi_task *task;
    WITH_UA_RETRY(task, iscsi_synchronizecache16_sync(iscsi, lun, 0, 0, 0, 0));
    int bad = task_failed(iscsi, task, "SYNCHRONIZE CACHE(16)", err, errlen);
    if (task)
        scsi_free_scsi_task(task);
    return bad ? -1 : 0;
}

int bf_iscsi_report_luns(struct iscsi_context *iscsi, int *luns, int max, char *err, size_t errlen)
{
    struct scsi_task *task;
    WITH_UA_RETRY(task, iscsi_reportluns_sync(iscsi, 0, 16384));
    if (task_failed(iscsi, task, "REPORT LUNS", err, errlen)) {
        if (task)
            scsi_free_scsi_task(task);
        return -1;
    }
    struct scsi_reportluns_list *list = scsi_datain_unmarshall(task);
    if (!list) {
        snprintf(err, errlen, "REPORT LUNS: cannot parse the reply");
        scsi_free_scsi_task(task);
        return -1;
    }
    int n = 0;
    for (uint32_t i = 0; i < list->num && n < max; i++)
        luns[n++] = list->luns[i];
    scsi_free_scsi_task(task);
    return n;
}

int bf_iscsi_capacity(struct iscsi_context *iscsi, int lun, uint32_t *block_size, uint64_t *num_blocks, char *err,
                      size_t errlen)
{
    return read_capacity(iscsi, lun, block_size, num_blocks, err, errlen);
}

int bf_iscsi_discover(const char *initiator, const char *portal, const char *user, const char *secret, int timeout_s,
                      char *out, size_t outlen, enum bf_iscsi_fail *fail, char *err, size_t errlen)
{
    *fail = BF_ISCSI_CONNECT;
    struct iscsi_context *iscsi = new_context(initiator, user, secret, timeout_s, err, errlen);
    if (!iscsi)
        return -1;
    iscsi_set_session_type(iscsi, ISCSI_SESSION_DISCOVERY);
    if (iscsi_connect_sync(iscsi, portal) != 0 || iscsi_login_sync(iscsi) != 0) {
        const char *msg = iscsi_get_error(iscsi);
        *fail = classify(msg);
        snprintf(err, errlen, "discovery on %s failed: %s", portal, msg);
        iscsi_destroy_context(iscsi);
        return -1;
    }
    struct iscsi_discovery_address *addrs = iscsi_discovery_sync(iscsi);
    if (!addrs && iscsi_get_error(iscsi) && *iscsi_get_error(iscsi)) {
        snprintf(err, errlen, "SendTargets on %s failed: %s", portal, iscsi_get_error(iscsi));
        *fail = BF_ISCSI_SCSI;
        iscsi_logout_sync(iscsi);
        iscsi_destroy_context(iscsi);
        return -1;
    }
    size_t used = 0;
    out[0] = '\0';
    for (struct iscsi_discovery_address *a = addrs; a; a = a->next) {
        int w = snprintf(out + used, outlen - used, "%s\n", a->target_name);
        if (w < 0 || (size_t)w >= outlen - used)
            break;
        used += (size_t)w;
    }
    if (addrs)
        iscsi_free_discovery_data(iscsi, addrs);
    iscsi_logout_sync(iscsi);
    iscsi_destroy_context(iscsi);
    *fail = BF_ISCSI_OK;
    return 0;
}
