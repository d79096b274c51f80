/* iSCSI through libiscsi, synchronous calls only: log in to one LUN, read
 * and write whole buffers by byte offset, flush the target's cache, discover
 * targets. Plain C; the Python glue lives in py_iscsi.c. A context is not
 * thread-safe: callers serialize calls on one context. Secrets passed in are
 * handed to libiscsi only and never copied into error messages. */
#ifndef BF_ISCSIIO_H
#define BF_ISCSIIO_H

#include <stddef.h>
#include <stdint.h>

struct iscsi_context;

enum bf_iscsi_fail { BF_ISCSI_OK = 0, BF_ISCSI_CONNECT, BF_ISCSI_AUTH, BF_ISCSI_SCSI };

/* Log in to target (normal session) on portal "host:port" and, unless
 * probe is set, read the LUN's capacity. user/secret NULL or empty: no
 * CHAP. */
struct iscsi_context *bf_iscsi_login(const char *initiator, const char *portal, const char *target, int lun, int probe,
                                     const char *user, const char *secret, int timeout_s, uint32_t *block_size,
                                     uint64_t *num_blocks, enum bf_iscsi_fail *fail, char *err, size_t errlen);

/* Read or write len bytes at a byte offset (both multiples of block_size),
 * straight from/to buf, as 1 MiB commands with up to 8 in flight. 0 or -1
 * with err set. */
int bf_iscsi_read(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, void *buf, size_t len,
                  char *err, size_t errlen);
int bf_iscsi_write(struct iscsi_context *iscsi, int lun, uint32_t block_size, uint64_t offset, const void *buf,
                   size_t len, char *err, size_t errlen);

/* Log out and free the context. */
void bf_iscsi_close(struct iscsi_context *iscsi);

/* SYNCHRONIZE CACHE(16) over the whole LUN. */
int bf_iscsi_flush(struct iscsi_context *iscsi, int lun, char *err, size_t errlen);

/* REPORT LUNS into luns[max]; the count or -1. */
int bf_iscsi_report_luns(struct iscsi_context *iscsi, int *luns, int max, char *err, size_t errlen);

/* Capacity of another LUN of the same session. */
int bf_iscsi_capacity(struct iscsi_context *iscsi, int lun, uint32_t *block_size, uint64_t *num_blocks, char *err,
                      size_t errlen);

/* SendTargets discovery on portal: target names, one per line, into out
 * (NUL-terminated). 0 or -1. */
int bf_iscsi_discover(const char *initiator, const char *portal, const char *user, const char *secret, int timeout_s,
                      char *out, size_t outlen, enum bf_iscsi_fail *fail, char *err, size_t errlen);

#endif
