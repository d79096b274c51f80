/* agent._native: the only file that knows about Python. Every kernel call
 * runs with the GIL released; buffers stay exported (and so pinned) while it
 * runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>

#include <nfsc/libnfs.h>

#include "diff.h"
#include "digest.h"
#include "imagehash.h"
#include "iscsiio.h"
#include "nfsio.h"
#include "zero.h"
#include "zstdio.h"

static int parse_algo(const char *name)
{
    if (strcmp(name, "sha256") == 0)
        return BF_ALGO_SHA256;
    if (strcmp(name, "xxh3-128") == 0)
        return BF_ALGO_XXH3_128;
    PyErr_Format(PyExc_ValueError, "algo: unknown digest algorithm '%s' (use 'sha256' or 'xxh3-128')",
                 name);
    return 0;
}

static int check_block_size(Py_ssize_t block_size)
{
    if (block_size <= 0) {
        PyErr_Format(PyExc_ValueError, "block_size: must be positive, got %zd", block_size);
        return -1;
    }
    return 0;
}

static PyObject *py_digest_size(PyObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s:digest_size", &name))
        return NULL;
    int algo = parse_algo(name);
    if (!algo)
        return NULL;
    return PyLong_FromSize_t(bf_digest_size(algo));
}

static PyObject *py_block_digests(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"algo", "data", "block_size", "threads", NULL};
    const char *name;
    Py_buffer data;
    Py_ssize_t block_size;
    unsigned int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sy*n|I:block_digests", kwlist, &name, &data,
                                     &block_size, &threads))
        return NULL;
    PyObject *digests = NULL, *flags = NULL, *result = NULL;
    int algo = parse_algo(name);
    if (!algo || check_block_size(block_size) < 0)
        goto out;
    size_t dsize = bf_digest_size(algo);
    size_t n = data.len ? ((size_t)data.len + (size_t)block_size - 1) / (size_t)block_size : 0;
    digests = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * dsize));
    flags = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!digests || !flags)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_block_digests(algo, data.buf, (size_t)data.len, (size_t)block_size, threads,
                          (uint8_t *)PyBytes_AS_STRING(digests), (uint8_t *)PyBytes_AS_STRING(flags));
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "digest computation failed in libcrypto");
        goto out;
    }
    result = PyTuple_Pack(2, digests, flags);
out:
    Py_XDECREF(digests);
    Py_XDECREF(flags);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *py_is_zero(PyObject *self, PyObject *args)
{
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:is_zero", &data))
        return NULL;
    int zero;
    Py_BEGIN_ALLOW_THREADS
    zero = bf_is_zero(data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyBool_FromLong(zero);
}

static PyObject *py_zero_flags(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "block_size", "threads", NULL};
    Py_buffer data;
    Py_ssize_t block_size;
    unsigned int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*n|I:zero_flags", kwlist, &data, &block_size,
                                     &threads))
        return NULL;
    PyObject *flags = NULL;
    if (check_block_size(block_size) < 0)
        goto out;
    size_t n = data.len ? ((size_t)data.len + (size_t)block_size - 1) / (size_t)block_size : 0;
    flags = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!flags)
        goto out;
    Py_BEGIN_ALLOW_THREADS
    bf_zero_flags(data.buf, (size_t)data.len, (size_t)block_size, threads,
                  (uint8_t *)PyBytes_AS_STRING(flags));
    Py_END_ALLOW_THREADS
out:
    PyBuffer_Release(&data);
    return flags;
}

static PyObject *py_diff_digests(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"old", "new", "digest_size", "block_size", "length", NULL};
    Py_buffer old, new;
    Py_ssize_t dsize, block_size;
    unsigned long long length;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*nnK:diff_digests", kwlist, &old, &new, &dsize,
                                     &block_size, &length))
        return NULL;
    PyObject *result = NULL;
    struct bf_extent *ext = NULL;
    if (dsize != 16 && dsize != 32) {
        PyErr_Format(PyExc_ValueError, "digest_size: must be 16 or 32, got %zd", dsize);
        goto out;
    }
    if (check_block_size(block_size) < 0)
        goto out;
    if (old.len % dsize || new.len % dsize) {
        PyErr_SetString(PyExc_ValueError, "old/new: length is not a multiple of digest_size");
        goto out;
    }
    size_t n_old = (size_t)(old.len / dsize), n_new = (size_t)(new.len / dsize);
    if (n_new != (length + (unsigned long long)block_size - 1) / (unsigned long long)block_size) {
        PyErr_Format(PyExc_ValueError, "length: %llu bytes is not %zu blocks of %zd bytes", length,
                     n_new, block_size);
        goto out;
    }
    size_t count, total;
    Py_BEGIN_ALLOW_THREADS
    count = bf_diff_digests(old.buf, n_old, new.buf, n_new, (size_t)dsize, (uint64_t)block_size,
                            length, NULL, 0);
    Py_END_ALLOW_THREADS
    ext = PyMem_RawMalloc((count ? count : 1) * sizeof(*ext));
    if (!ext) {
        PyErr_NoMemory();
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    total = bf_diff_digests(old.buf, n_old, new.buf, n_new, (size_t)dsize, (uint64_t)block_size,
                            length, ext, count);
    Py_END_ALLOW_THREADS
    (void)total;
    result = PyList_New((Py_ssize_t)count);
    if (!result)
        goto out;
    for (size_t i = 0; i < count; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)ext[i].start,
                                    (unsigned long long)ext[i].length);
        if (!t) {
            Py_CLEAR(result);
            goto out;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, t);
    }
out:
    PyMem_RawFree(ext);
    PyBuffer_Release(&old);
    PyBuffer_Release(&new);
    return result;
}

/* ImageHash: the streaming image digest. */
typedef struct {
    PyObject_HEAD
    struct bf_imagehash *h;
    int busy; /* a call is running with the GIL released */
} ImageHashObject;

static int imagehash_enter(ImageHashObject *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "ImageHash is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static int ImageHash_init(ImageHashObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"threads", NULL};
    unsigned int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|I:ImageHash", kwlist, &threads))
        return -1;
    bf_imagehash_free(self->h);
    self->h = bf_imagehash_new(threads);
    if (!self->h) {
        PyErr_SetString(PyExc_RuntimeError, "cannot create image hash (libcrypto SHA-256)");
        return -1;
    }
    return 0;
}

static void ImageHash_dealloc(ImageHashObject *self)
{
    bf_imagehash_free(self->h);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ImageHash_update(ImageHashObject *self, PyObject *args)
{
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:update", &data))
        return NULL;
    if (imagehash_enter(self) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_imagehash_update(self->h, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&data);
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "update: image hash already finished or libcrypto failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *ImageHash_zero(ImageHashObject *self, PyObject *args)
{
    long long length;
    if (!PyArg_ParseTuple(args, "L:zero", &length))
        return NULL;
    if (length < 0) {
        PyErr_Format(PyExc_ValueError, "length: must not be negative, got %lld", length);
        return NULL;
    }
    if (imagehash_enter(self) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_imagehash_zero(self->h, (uint64_t)length);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "zero: image hash already finished or libcrypto failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *ImageHash_digest(ImageHashObject *self, PyObject *unused)
{
    uint8_t out[BF_IMAGE_DIGEST_SIZE];
    if (imagehash_enter(self) < 0)
        return NULL;
    int rc = bf_imagehash_final(self->h, out);
    self->busy = 0;
    if (rc != 0) {
        PyErr_SetString(PyExc_RuntimeError, "digest: libcrypto failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, BF_IMAGE_DIGEST_SIZE);
}

static PyObject *ImageHash_get_length(ImageHashObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(bf_imagehash_length(self->h));
}

static PyMethodDef ImageHash_methods[] = {
    {"update", (PyCFunction)ImageHash_update, METH_VARARGS, "Add content bytes."},
    {"zero", (PyCFunction)ImageHash_zero, METH_VARARGS, "Add length zero bytes without data."},
    {"digest", (PyCFunction)ImageHash_digest, METH_NOARGS,
     "Finish and return the 32-byte image digest (idempotent)."},
    {NULL},
};

static PyGetSetDef ImageHash_getset[] = {
    {"length", (getter)ImageHash_get_length, NULL, "Content length added so far.", NULL},
    {NULL},
};

static PyTypeObject ImageHashType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.ImageHash",
    .tp_basicsize = sizeof(ImageHashObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Streaming image digest (format bf-image-sha256-v1).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ImageHash_init,
    .tp_dealloc = (destructor)ImageHash_dealloc,
    .tp_methods = ImageHash_methods,
    .tp_getset = ImageHash_getset,
};


/* ---- NFS (libnfs): NfsContext and NfsFile ----
 * One NfsContext is one mounted connection. libnfs 4 contexts are not
 * thread-safe, so every call takes the context's lock, with the GIL
 * released while it waits and while the call runs. */
typedef struct {
    PyObject_HEAD
    struct nfs_context *nfs;
    PyThread_type_lock lock;
} NfsContextObject;

typedef struct {
    PyObject_HEAD
    NfsContextObject *ctx;
    struct nfsfh *fh;
} NfsFileObject;

static PyTypeObject NfsFileType;

static void nfs_lock(NfsContextObject *c)
{
    if (!PyThread_acquire_lock(c->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(c->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

/* Raise OSError(-rc, "<what> <path>: <libnfs message>"); call with the lock held. */
static PyObject *nfs_raise(NfsContextObject *c, int rc, const char *what, const char *path)
{
    const char *msg = c->nfs ? nfs_get_error(c->nfs) : NULL;
    int err = rc < 0 ? -rc : EIO;
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, "");
    if (!exc)
        return NULL;
    /* OSError(errno, ...) picks the subclass (FileNotFoundError...); the
     * message names the operation, the path and what the server said. */
    PyObject *text = PyUnicode_FromFormat("%s %s: %s", what, path ? path : "",
                                          msg && *msg ? msg : strerror(err));
    if (text) {
        PyObject_SetAttrString(exc, "strerror", text);
        Py_DECREF(text);
    }
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

static int check_open(NfsContextObject *c)
{
    if (!c->nfs) {
        PyErr_SetString(PyExc_ValueError, "NFS context is closed");
        return -1;
    }
    return 0;
}

/* Take the context's lock for a call; on a closed context release it and
 * fail (ValueError set). */
static int nfs_enter(NfsContextObject *c)
{
    nfs_lock(c);
    if (check_open(c) < 0) {
        PyThread_release_lock(c->lock);
        return -1;
    }
    return 0;
}

static int NfsContext_init(NfsContextObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"server", "export", "nfs_port", "mount_port", "timeout_ms", "uid", "gid", NULL};
    const char *server, *export;
    int nfs_port = 0, mount_port = 0, timeout_ms = 30000, uid = -1, gid = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|iiiii:NfsContext", kwlist, &server, &export, &nfs_port,
                                     &mount_port, &timeout_ms, &uid, &gid))
        return -1;
    if (self->nfs) {
        PyErr_SetString(PyExc_ValueError, "NfsContext is already connected");
        return -1;
    }
    if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    char err[512] = "";
    struct nfs_context *nfs;
    Py_BEGIN_ALLOW_THREADS
    nfs = bf_nfs_connect(server, export, nfs_port, mount_port, timeout_ms, uid, gid, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (!nfs) {
        PyErr_Format(PyExc_ConnectionError, "nfs://%s%s: %s", server, export, err);
        return -1;
    }
    self->nfs = nfs;
    return 0;
}

static void nfs_context_close(NfsContextObject *self)
{
    if (self->nfs) {
        struct nfs_context *nfs = self->nfs;
        self->nfs = NULL;
        Py_BEGIN_ALLOW_THREADS
        nfs_destroy_context(nfs);
        Py_END_ALLOW_THREADS
    }
}

static void NfsContext_dealloc(NfsContextObject *self)
{
    nfs_context_close(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *NfsContext_close(NfsContextObject *self, PyObject *unused)
{
    nfs_lock(self);
    nfs_context_close(self);
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

/* open(path, flags, mode=0o640) -> NfsFile; flags are os.O_* values. */
static PyObject *NfsContext_open(NfsContextObject *self, PyObject *args)
{
    const char *path;
    int flags, mode = 0640;
    if (!PyArg_ParseTuple(args, "si|i:open", &path, &flags, &mode))
        return NULL;
    struct nfsfh *fh = NULL;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (flags & O_CREAT)
        rc = nfs_create(self->nfs, path, flags & ~O_CREAT, mode, &fh);
    else
        rc = nfs_open(self->nfs, path, flags, &fh);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        nfs_raise(self, rc, "open", path);
        PyThread_release_lock(self->lock);
        return NULL;
    }
    PyThread_release_lock(self->lock);
    NfsFileObject *f = PyObject_New(NfsFileObject, &NfsFileType);
    if (!f) {
        nfs_lock(self);
        if (self->nfs)
            nfs_close(self->nfs, fh);
        PyThread_release_lock(self->lock);
        return NULL;
    }
    Py_INCREF(self);
    f->ctx = self;
    f->fh = fh;
    return (PyObject *)f;
}

/* The path operations share one shape: call, then raise on a negative rc. */
enum path_op { OP_UNLINK, OP_MKDIR, OP_RMDIR, OP_RENAME };

static PyObject *nfs_path_op(NfsContextObject *self, enum path_op op, const char *a, const char *b, int mode)
{
    static const char *names[] = {"unlink", "mkdir", "rmdir", "rename"};
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    switch (op) {
    case OP_UNLINK: rc = nfs_unlink(self->nfs, a); break;
    case OP_MKDIR: rc = nfs_mkdir2(self->nfs, a, mode); break;
    case OP_RMDIR: rc = nfs_rmdir(self->nfs, a); break;
    default: rc = nfs_rename(self->nfs, a, b); break;
    }
    Py_END_ALLOW_THREADS
    PyObject *res = rc < 0 ? nfs_raise(self, rc, names[op], a) : (Py_INCREF(Py_None), Py_None);
    PyThread_release_lock(self->lock);
    return res;
}

static PyObject *NfsContext_unlink(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:unlink", &path))
        return NULL;
    return nfs_path_op(self, OP_UNLINK, path, NULL, 0);
}

static PyObject *NfsContext_mkdir(NfsContextObject *self, PyObject *args)
{
    const char *path;
    int mode = 0750;
    if (!PyArg_ParseTuple(args, "s|i:mkdir", &path, &mode))
        return NULL;
    return nfs_path_op(self, OP_MKDIR, path, NULL, mode);
}

static PyObject *NfsContext_rmdir(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:rmdir", &path))
        return NULL;
    return nfs_path_op(self, OP_RMDIR, path, NULL, 0);
}

static PyObject *NfsContext_rename(NfsContextObject *self, PyObject *args)
{
    const char *a, *b;
    if (!PyArg_ParseTuple(args, "ss:rename", &a, &b))
        return NULL;
    return nfs_path_op(self, OP_RENAME, a, b, 0);
}

/* stat(path) -> (size, mode, is_dir) */
static PyObject *NfsContext_stat(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:stat", &path))
        return NULL;
    struct nfs_stat_64 st;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = nfs_stat64(self->nfs, path, &st);
    Py_END_ALLOW_THREADS
    PyObject *res = rc < 0 ? nfs_raise(self, rc, "stat", path)
                           : Py_BuildValue("(KKOdK)", (unsigned long long)st.nfs_size,
                                           (unsigned long long)st.nfs_mode,
                                           (st.nfs_mode & S_IFMT) == S_IFDIR ? Py_True : Py_False,
                                           (double)st.nfs_mtime + st.nfs_mtime_nsec / 1e9,
                                           (unsigned long long)st.nfs_used);
    PyThread_release_lock(self->lock);
    return res;
}

/* statvfs(path) -> (frsize, blocks, bfree, bavail) */
static PyObject *NfsContext_statvfs(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:statvfs", &path))
        return NULL;
    struct nfs_statvfs_64 st;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = nfs_statvfs64(self->nfs, path, &st);
    Py_END_ALLOW_THREADS
    PyObject *res = rc < 0 ? nfs_raise(self, rc, "statvfs", path)
                           : Py_BuildValue("(KKKK)", (unsigned long long)st.f_frsize,
                                           (unsigned long long)st.f_blocks, (unsigned long long)st.f_bfree,
                                           (unsigned long long)st.f_bavail);
    PyThread_release_lock(self->lock);
    return res;
}

/* listdir(path) -> [(name, is_dir, size)], without "." and "..". */
static PyObject *NfsContext_listdir(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:listdir", &path))
        return NULL;
    struct nfsdir *dir = NULL;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = nfs_opendir(self->nfs, path, &dir);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        nfs_raise(self, rc, "listdir", path);
        PyThread_release_lock(self->lock);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    struct nfsdirent *e;
    while (out && (e = nfs_readdir(self->nfs, dir)) != NULL) {
        if (strcmp(e->name, ".") == 0 || strcmp(e->name, "..") == 0)
            continue;
        PyObject *item = Py_BuildValue("(sOK)", e->name, (e->mode & S_IFMT) == S_IFDIR ? Py_True : Py_False,
                                       (unsigned long long)e->size);
        if (!item || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    nfs_closedir(self->nfs, dir);
    PyThread_release_lock(self->lock);
    return out;
}

static PyMethodDef NfsContext_methods[] = {
    {"open", (PyCFunction)NfsContext_open, METH_VARARGS,
     "open(path, flags, mode=0o640) -> NfsFile (flags: os.O_*; O_CREAT creates)."},
    {"unlink", (PyCFunction)NfsContext_unlink, METH_VARARGS, "Remove a file."},
    {"mkdir", (PyCFunction)NfsContext_mkdir, METH_VARARGS, "mkdir(path, mode=0o750)."},
    {"rmdir", (PyCFunction)NfsContext_rmdir, METH_VARARGS, "Remove an empty directory."},
    {"rename", (PyCFunction)NfsContext_rename, METH_VARARGS, "rename(old, new), atomic on the server."},
    {"stat", (PyCFunction)NfsContext_stat, METH_VARARGS, "stat(path) -> (size, mode, is_dir, mtime, used bytes)."},
    {"statvfs", (PyCFunction)NfsContext_statvfs, METH_VARARGS,
     "statvfs(path) -> (frsize, blocks, bfree, bavail)."},
    {"listdir", (PyCFunction)NfsContext_listdir, METH_VARARGS, "listdir(path) -> [(name, is_dir, size)]."},
    {"close", (PyCFunction)NfsContext_close, METH_NOARGS, "Unmount and disconnect (idempotent)."},
    {NULL},
};

static PyTypeObject NfsContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.NfsContext",
    .tp_basicsize = sizeof(NfsContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NfsContext(server, export, nfs_port=0, mount_port=0, timeout_ms=30000, uid=-1, gid=-1): "
              "an NFSv3 mount through libnfs (ports 0: ask the portmapper).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NfsContext_init,
    .tp_dealloc = (destructor)NfsContext_dealloc,
    .tp_methods = NfsContext_methods,
};

static void nfs_file_close(NfsFileObject *self)
{
    if (self->fh && self->ctx) {
        nfs_lock(self->ctx);
        if (self->ctx->nfs) {
            struct nfs_context *nfs = self->ctx->nfs;
            struct nfsfh *fh = self->fh;
            Py_BEGIN_ALLOW_THREADS
            nfs_close(nfs, fh);
            Py_END_ALLOW_THREADS
        }
        PyThread_release_lock(self->ctx->lock);
    }
    self->fh = NULL;
}

static void NfsFile_dealloc(NfsFileObject *self)
{
    nfs_file_close(self);
    Py_XDECREF(self->ctx);
    PyObject_Free(self);
}

static int file_ready(NfsFileObject *self)
{
    if (!self->fh) {
        PyErr_SetString(PyExc_ValueError, "NFS file is closed");
        return -1;
    }
    return check_open(self->ctx);
}

/* pwrite(data, offset): writes all of data (any buffer, not copied). */
static PyObject *NfsFile_pwrite(NfsFileObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "y*K:pwrite", &data, &offset))
        return NULL;
    nfs_lock(self->ctx);
    PyObject *res = NULL;
    if (file_ready(self) == 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_nfs_pwrite_all(self->ctx->nfs, self->fh, offset, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
        res = rc < 0 ? nfs_raise(self->ctx, rc, "pwrite", "") : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->ctx->lock);
    PyBuffer_Release(&data);
    return res;
}

/* preadinto(buffer, offset) -> bytes read (short only at end of file). */
static PyObject *NfsFile_preadinto(NfsFileObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "w*K:preadinto", &buf, &offset))
        return NULL;
    nfs_lock(self->ctx);
    PyObject *res = NULL;
    if (file_ready(self) == 0) {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = bf_nfs_pread_full(self->ctx->nfs, self->fh, offset, buf.buf, (size_t)buf.len);
        Py_END_ALLOW_THREADS
        res = n < 0 ? nfs_raise(self->ctx, (int)n, "pread", "") : PyLong_FromSsize_t(n);
    }
    PyThread_release_lock(self->ctx->lock);
    PyBuffer_Release(&buf);
    return res;
}

static PyObject *NfsFile_fsync(NfsFileObject *self, PyObject *unused)
{
    nfs_lock(self->ctx);
    PyObject *res = NULL;
    if (file_ready(self) == 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = nfs_fsync(self->ctx->nfs, self->fh);
        Py_END_ALLOW_THREADS
        res = rc < 0 ? nfs_raise(self->ctx, rc, "fsync", "") : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->ctx->lock);
    return res;
}

static PyObject *NfsFile_close(NfsFileObject *self, PyObject *unused)
{
    nfs_file_close(self);
    Py_RETURN_NONE;
}

static PyMethodDef NfsFile_methods[] = {
    {"pwrite", (PyCFunction)NfsFile_pwrite, METH_VARARGS, "pwrite(data, offset): write all of data."},
    {"preadinto", (PyCFunction)NfsFile_preadinto, METH_VARARGS,
     "preadinto(buffer, offset) -> count (short only at end of file)."},
    {"fsync", (PyCFunction)NfsFile_fsync, METH_NOARGS, "Commit written data to stable storage."},
    {"close", (PyCFunction)NfsFile_close, METH_NOARGS, "Close the file (idempotent)."},
    {NULL},
};

static PyTypeObject NfsFileType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.NfsFile",
    .tp_basicsize = sizeof(NfsFileObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open file on an NfsContext.",
    .tp_dealloc = (destructor)NfsFile_dealloc,
    .tp_methods = NfsFile_methods,
};

/* ---- iSCSI (libiscsi): IscsiLun and iscsi_discover ----
 * One IscsiLun is one logged-in session to one LUN. Calls take the
 * object's lock with the GIL released (libiscsi contexts are not
 * thread-safe). Errors: ConnectionError (cannot reach or log in),
 * PermissionError (CHAP refused), OSError(EIO) for a failed SCSI command. */
typedef struct {
    PyObject_HEAD
    struct iscsi_context *iscsi;
    PyThread_type_lock lock;
    int lun;
    uint32_t block_size;
    uint64_t num_blocks;
} IscsiLunObject;

static void iscsi_lock(IscsiLunObject *o)
{
    if (!PyThread_acquire_lock(o->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(o->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static PyObject *iscsi_fail(enum bf_iscsi_fail fail, const char *err)
{
    if (fail == BF_ISCSI_AUTH)
        PyErr_SetString(PyExc_PermissionError, err);
    else if (fail == BF_ISCSI_CONNECT)
        PyErr_SetString(PyExc_ConnectionError, err);
    else
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(is)", EIO, err));
    return NULL;
}

static int IscsiLun_init(IscsiLunObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"initiator", "portal", "target", "lun", "user", "secret", "timeout", "probe", NULL};
    const char *initiator, *portal, *target, *user = "", *secret = "";
    int lun = 0, timeout = 30, probe = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sss|issip:IscsiLun", kwlist, &initiator, &portal, &target, &lun,
                                     &user, &secret, &timeout, &probe))
        return -1;
    if (self->iscsi) {
        PyErr_SetString(PyExc_ValueError, "IscsiLun is already connected");
        return -1;
    }
    if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    char err[512] = "";
    enum bf_iscsi_fail fail;
    uint32_t bs = 0;
    uint64_t nb = 0;
    struct iscsi_context *iscsi;
    Py_BEGIN_ALLOW_THREADS
    iscsi = bf_iscsi_login(initiator, portal, target, lun, probe, user, secret, timeout, &bs, &nb, &fail, err,
                           sizeof(err));
    Py_END_ALLOW_THREADS
    if (!iscsi) {
        iscsi_fail(fail, err);
        return -1;
    }
    self->iscsi = iscsi;
    self->lun = lun;
    self->block_size = bs;
    self->num_blocks = nb;
    return 0;
}

static void iscsi_close(IscsiLunObject *self)
{
    if (self->iscsi) {
        struct iscsi_context *iscsi = self->iscsi;
        self->iscsi = NULL;
        Py_BEGIN_ALLOW_THREADS
        bf_iscsi_close(iscsi);
        Py_END_ALLOW_THREADS
    }
}

static void IscsiLun_dealloc(IscsiLunObject *self)
{
    iscsi_close(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int iscsi_ready(IscsiLunObject *self)
{
    if (!self->iscsi) {
        PyErr_SetString(PyExc_ValueError, "iSCSI session is closed");
        return -1;
    }
    return 0;
}

static int check_aligned(IscsiLunObject *self, unsigned long long offset, Py_ssize_t len)
{
    if (self->block_size == 0) {
        PyErr_SetString(PyExc_ValueError, "a probe session has no LUN to read or write");
        return -1;
    }
    if (offset % self->block_size || (size_t)len % self->block_size) {
        PyErr_Format(PyExc_ValueError, "offset and length must be multiples of the %u-byte block size",
                     self->block_size);
        return -1;
    }
    if (offset + (unsigned long long)len > self->num_blocks * (unsigned long long)self->block_size) {
        PyErr_SetString(PyExc_ValueError, "range is past the end of the LUN");
        return -1;
    }
    return 0;
}

/* readinto(buffer, offset): fill buffer from the LUN, no copy. */
static PyObject *IscsiLun_readinto(IscsiLunObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "w*K:readinto", &buf, &offset))
        return NULL;
    PyObject *res = NULL;
    iscsi_lock(self);
    if (iscsi_ready(self) == 0 && check_aligned(self, offset, buf.len) == 0) {
        char err[512] = "";
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_iscsi_read(self->iscsi, self->lun, self->block_size, offset, buf.buf, (size_t)buf.len, err,
                           sizeof(err));
        Py_END_ALLOW_THREADS
        res = rc ? iscsi_fail(BF_ISCSI_SCSI, err) : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->lock);
    PyBuffer_Release(&buf);
    return res;
}

/* write(data, offset): write data to the LUN, no copy. */
static PyObject *IscsiLun_write(IscsiLunObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "y*K:write", &buf, &offset))
        return NULL;
    PyObject *res = NULL;
    iscsi_lock(self);
    if (iscsi_ready(self) == 0 && check_aligned(self, offset, buf.len) == 0) {
        char err[512] = "";
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_iscsi_write(self->iscsi, self->lun, self->block_size, offset, buf.buf, (size_t)buf.len, err,
                            sizeof(err));
        Py_END_ALLOW_THREADS
        res = rc ? iscsi_fail(BF_ISCSI_SCSI, err) : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->lock);
    PyBuffer_Release(&buf);
    return res;
}

static PyObject *IscsiLun_flush(IscsiLunObject *self, PyObject *unused)
{
    PyObject *res = NULL;
    iscsi_lock(self);
    if (iscsi_ready(self) == 0) {
        char err[512] = "";
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_iscsi_flush(self->iscsi, self->lun, err, sizeof(err));
        Py_END_ALLOW_THREADS
        res = rc ? iscsi_fail(BF_ISCSI_SCSI, err) : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->lock);
    return res;
}

/* report_luns() -> [(lun, size_bytes)] of this session's target. */
static PyObject *IscsiLun_report_luns(IscsiLunObject *self, PyObject *unused)
{
    PyObject *res = NULL;
    iscsi_lock(self);
    if (iscsi_ready(self) == 0) {
        char err[512] = "";
        int luns[256];
        uint32_t bs[256];
        uint64_t nb[256];
        int n, bad = 0;
        Py_BEGIN_ALLOW_THREADS
        n = bf_iscsi_report_luns(self->iscsi, luns, 256, err, sizeof(err));
        for (int i = 0; i < n; i++) /* a LUN without capacity (the controller LUN 0) reports size 0 */
            if (bf_iscsi_capacity(self->iscsi, luns[i], &bs[i], &nb[i], err, sizeof(err)) != 0)
                bs[i] = 0, nb[i] = 0;
        Py_END_ALLOW_THREADS
        if (n < 0 || bad) {
            iscsi_fail(BF_ISCSI_SCSI, err);
        } else {
            res = PyList_New(n);
            for (int i = 0; res && i < n; i++)
                PyList_SET_ITEM(res, i, Py_BuildValue("(iK)", luns[i], (unsigned long long)(bs[i] * nb[i])));
        }
    }
    PyThread_release_lock(self->lock);
    return res;
}

static PyObject *IscsiLun_close(IscsiLunObject *self, PyObject *unused)
{
    iscsi_lock(self);
    iscsi_close(self);
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *IscsiLun_get_size(IscsiLunObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->num_blocks * (unsigned long long)self->block_size);
}

static PyObject *IscsiLun_get_block_size(IscsiLunObject *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->block_size);
}

static PyMethodDef IscsiLun_methods[] = {
    {"readinto", (PyCFunction)IscsiLun_readinto, METH_VARARGS, "readinto(buffer, offset): aligned read."},
    {"write", (PyCFunction)IscsiLun_write, METH_VARARGS, "write(data, offset): aligned write."},
    {"flush", (PyCFunction)IscsiLun_flush, METH_NOARGS, "SYNCHRONIZE CACHE(16)."},
    {"report_luns", (PyCFunction)IscsiLun_report_luns, METH_NOARGS,
     "report_luns() -> [(lun, size_bytes)] of the target."},
    {"close", (PyCFunction)IscsiLun_close, METH_NOARGS, "Log out (idempotent)."},
    {NULL},
};

static PyGetSetDef IscsiLun_getset[] = {
    {"size", (getter)IscsiLun_get_size, NULL, "LUN size in bytes.", NULL},
    {"block_size", (getter)IscsiLun_get_block_size, NULL, "Logical block size.", NULL},
    {NULL},
};

static PyTypeObject IscsiLunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.IscsiLun",
    .tp_basicsize = sizeof(IscsiLunObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "IscsiLun(initiator, portal, target, lun=0, user='', secret='', timeout=30, probe=False): a "
              "logged-in session to one LUN through libiscsi (probe: log in only, for report_luns).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)IscsiLun_init,
    .tp_dealloc = (destructor)IscsiLun_dealloc,
    .tp_methods = IscsiLun_methods,
    .tp_getset = IscsiLun_getset,
};

/* iscsi_discover(initiator, portal, user='', secret='', timeout=30) -> [target names] */
static PyObject *py_iscsi_discover(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"initiator", "portal", "user", "secret", "timeout", NULL};
    const char *initiator, *portal, *user = "", *secret = "";
    int timeout = 30;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|ssi:iscsi_discover", kwlist, &initiator, &portal, &user,
                                     &secret, &timeout))
        return NULL;
    char err[512] = "";
    char *out = PyMem_RawMalloc(65536);
    if (!out)
        return PyErr_NoMemory();
    enum bf_iscsi_fail fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_iscsi_discover(initiator, portal, user, secret, timeout, out, 65536, &fail, err, sizeof(err));
    Py_END_ALLOW_THREADS
    PyObject *res = NULL;
    if (rc != 0) {
        iscsi_fail(fail, err);
    } else {
        PyObject *text = PyUnicode_FromString(out);
        res = text ? PyUnicode_Splitlines(text, 0) : NULL;
        Py_XDECREF(text);
    }
    PyMem_RawFree(out);
    return res;
}

static PyObject *py_zstd_decompress_into(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*:zstd_decompress_into", &src, &dst))
        return NULL;
    size_t n = 0;
    const char *err = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_zstd_decompress(src.buf, (size_t)src.len, dst.buf, (size_t)dst.len, &n, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (rc < 0) {
        PyErr_Format(PyExc_ValueError, "zstd: %s", err);
        return NULL;
    }
    return PyLong_FromSize_t(n);
}

static PyMethodDef module_methods[] = {
    {"digest_size", py_digest_size, METH_VARARGS, "Digest size in bytes of an algorithm."},
    {"block_digests", (PyCFunction)(void (*)(void))py_block_digests, METH_VARARGS | METH_KEYWORDS,
     "block_digests(algo, data, block_size, threads=0) -> (digests, zero_flags)"},
    {"zstd_decompress_into", py_zstd_decompress_into, METH_VARARGS,
     "zstd_decompress_into(src, dst) -> bytes written into dst (ValueError: damaged or too large)"},
    {"is_zero", py_is_zero, METH_VARARGS, "True if every byte of data is zero."},
    {"zero_flags", (PyCFunction)(void (*)(void))py_zero_flags, METH_VARARGS | METH_KEYWORDS,
     "zero_flags(data, block_size, threads=0) -> bytes of 0/1 per block"},
    {"iscsi_discover", (PyCFunction)(void (*)(void))py_iscsi_discover, METH_VARARGS | METH_KEYWORDS,
     "iscsi_discover(initiator, portal, user='', secret='', timeout=30) -> [target IQNs] (SendTargets)"},
    {"diff_digests", (PyCFunction)(void (*)(void))py_diff_digests, METH_VARARGS | METH_KEYWORDS,
     "diff_digests(old, new, digest_size, block_size, length) -> [(start, length)]"},
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "agent._native", "blockferry hot paths (C).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&ImageHashType) < 0 || PyType_Ready(&NfsContextType) < 0 ||
        PyType_Ready(&NfsFileType) < 0 || PyType_Ready(&IscsiLunType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&ImageHashType);
    Py_INCREF(&NfsContextType);
    Py_INCREF(&NfsFileType);
    Py_INCREF(&IscsiLunType);
    if (PyModule_AddObject(m, "ImageHash", (PyObject *)&ImageHashType) < 0 ||
        PyModule_AddObject(m, "NfsContext", (PyObject *)&NfsContextType) < 0 ||
        PyModule_AddObject(m, "NfsFile", (PyObject *)&NfsFileType) < 0 ||
        PyModule_AddObject(m, "IscsiLun", (PyObject *)&IscsiLunType) < 0 ||
        PyModule_AddIntConstant(m, "IMAGE_BLOCK_SIZE", BF_IMAGE_BLOCK_SIZE) < 0 ||
        PyModule_AddStringConstant(m, "IMAGE_DIGEST_FORMAT", "bf-image-sha256-v1") < 0 ||
        PyModule_AddStringConstant(m, "SHA256_ISA", bf_sha256_isa()) < 0 ||
        PyModule_AddStringConstant(m, "XXH3_ISA", bf_xxh3_isa()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
