/* Python glue for nfsio.c: NfsContext (one mounted NFSv3 connection) and
 * NfsFile (an open file on it). libnfs 4 contexts are not thread-safe, so
 * every call takes the context's lock, with the GIL released while it waits
 * and while the call runs. No libnfs call is made here: nfsio.c wraps them. */
#include "pyglue.h"

#include <errno.h>
#include <string.h>

#include "nfsio.h"

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

/* Raise OSError(-rc, "<what> <path>: <server's message>"); call with the lock
 * held. OSError(errno, ...) picks the subclass (FileNotFoundError...). */
static PyObject *nfs_raise(NfsContextObject *c, int rc, const char *what, const char *path)
{
    const char *msg = bf_nfs_error(c->nfs);
    int err = rc < 0 ? -rc : EIO;
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, "");
    if (!exc)
        return NULL;
    PyObject *text = PyUnicode_FromFormat("%s %s: %s", what, path ? path : "", *msg ? msg : strerror(err));
    if (text) {
        PyObject_SetAttrString(exc, "strerror", text);
        Py_DECREF(text);
    }
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *none_or_raise(NfsContextObject *c, int rc, const char *what, const char *path)
{
    if (rc < 0)
        return nfs_raise(c, rc, what, path);
    Py_RETURN_NONE;
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
    bf_py_lock(c->lock);
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|iiiii:NfsContext", kwlist, &server, &export, &nfs_port, &mount_port,
                                     &timeout_ms, &uid, &gid))
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
        bf_nfs_disconnect(nfs);
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

PyDoc_STRVAR(NfsContext_close_doc, "close()\n\nUnmount and disconnect; files still open on the context are closed "
                                   "with it. Idempotent.");

static PyObject *NfsContext_close(NfsContextObject *self, PyObject *unused)
{
    bf_py_lock(self->lock);
    nfs_context_close(self);
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(NfsContext_open_doc, "open(path, flags, mode=0o640) -> NfsFile\n\n"
                                  "Open path with os.O_* flags; O_CREAT creates the file with mode.\n"
                                  "Raises OSError (FileNotFoundError, PermissionError...) naming the path.");

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
    rc = bf_nfs_open(self->nfs, path, flags, mode, &fh);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        nfs_raise(self, rc, "open", path);
        PyThread_release_lock(self->lock);
        return NULL;
    }
    PyThread_release_lock(self->lock);
    NfsFileObject *f = PyObject_New(NfsFileObject, &NfsFileType);
    if (!f) {
        bf_py_lock(self->lock);
        if (self->nfs)
            bf_nfs_close(self->nfs, fh);
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
    case OP_UNLINK:
        rc = bf_nfs_unlink(self->nfs, a);
        break;
    case OP_MKDIR:
        rc = bf_nfs_mkdir(self->nfs, a, mode);
        break;
    case OP_RMDIR:
        rc = bf_nfs_rmdir(self->nfs, a);
        break;
    default:
        rc = bf_nfs_rename(self->nfs, a, b);
        break;
    }
    Py_END_ALLOW_THREADS
    PyObject *res = none_or_raise(self, rc, names[op], a);
    PyThread_release_lock(self->lock);
    return res;
}

PyDoc_STRVAR(NfsContext_unlink_doc, "unlink(path)\n\nRemove a file.");

static PyObject *NfsContext_unlink(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:unlink", &path))
        return NULL;
    return nfs_path_op(self, OP_UNLINK, path, NULL, 0);
}

PyDoc_STRVAR(NfsContext_mkdir_doc, "mkdir(path, mode=0o750)\n\nCreate a directory.");

static PyObject *NfsContext_mkdir(NfsContextObject *self, PyObject *args)
{
    const char *path;
    int mode = 0750;
    if (!PyArg_ParseTuple(args, "s|i:mkdir", &path, &mode))
        return NULL;
    return nfs_path_op(self, OP_MKDIR, path, NULL, mode);
}

PyDoc_STRVAR(NfsContext_rmdir_doc, "rmdir(path)\n\nRemove an empty directory.");

static PyObject *NfsContext_rmdir(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:rmdir", &path))
        return NULL;
    return nfs_path_op(self, OP_RMDIR, path, NULL, 0);
}

PyDoc_STRVAR(NfsContext_rename_doc, "rename(old, new)\n\nRename, atomically on the server (replaces new).");

static PyObject *NfsContext_rename(NfsContextObject *self, PyObject *args)
{
    const char *a, *b;
    if (!PyArg_ParseTuple(args, "ss:rename", &a, &b))
        return NULL;
    return nfs_path_op(self, OP_RENAME, a, b, 0);
}

PyDoc_STRVAR(NfsContext_stat_doc, "stat(path) -> (size, mode, is_dir, mtime, used)\n\n"
                                  "mtime in seconds since the epoch; used: bytes allocated on the server.");

static PyObject *NfsContext_stat(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:stat", &path))
        return NULL;
    struct bf_nfs_stat st;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_nfs_stat(self->nfs, path, &st);
    Py_END_ALLOW_THREADS
    PyObject *res = rc < 0 ? nfs_raise(self, rc, "stat", path)
                           : Py_BuildValue("(KKOdK)", (unsigned long long)st.size, (unsigned long long)st.mode,
                                           st.is_dir ? Py_True : Py_False, st.mtime, (unsigned long long)st.used);
    PyThread_release_lock(self->lock);
    return res;
}

PyDoc_STRVAR(NfsContext_statvfs_doc, "statvfs(path) -> (frsize, blocks, bfree, bavail)\n\n"
                                     "The file system's capacity, as os.statvfs names it.");

static PyObject *NfsContext_statvfs(NfsContextObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:statvfs", &path))
        return NULL;
    struct bf_nfs_statvfs st;
    int rc;
    if (nfs_enter(self) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = bf_nfs_statvfs(self->nfs, path, &st);
    Py_END_ALLOW_THREADS
    PyObject *res = rc < 0 ? nfs_raise(self, rc, "statvfs", path)
                           : Py_BuildValue("(KKKK)", (unsigned long long)st.frsize, (unsigned long long)st.blocks,
                                           (unsigned long long)st.bfree, (unsigned long long)st.bavail);
    PyThread_release_lock(self->lock);
    return res;
}

PyDoc_STRVAR(NfsContext_listdir_doc, "listdir(path) -> [(name, is_dir, size)]\n\n"
                                     "The directory's entries without '.' and '..'.");

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
    rc = bf_nfs_opendir(self->nfs, path, &dir);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        nfs_raise(self, rc, "listdir", path);
        PyThread_release_lock(self->lock);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    struct bf_nfs_dirent e;
    while (out && bf_nfs_readdir(self->nfs, dir, &e)) {
        PyObject *item = Py_BuildValue("(sOK)", e.name, e.is_dir ? Py_True : Py_False, (unsigned long long)e.size);
        if (!item || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    bf_nfs_closedir(self->nfs, dir);
    PyThread_release_lock(self->lock);
    return out;
}

static PyMethodDef NfsContext_methods[] = {
    {"open", (PyCFunction)NfsContext_open, METH_VARARGS, NfsContext_open_doc},
    {"unlink", (PyCFunction)NfsContext_unlink, METH_VARARGS, NfsContext_unlink_doc},
    {"mkdir", (PyCFunction)NfsContext_mkdir, METH_VARARGS, NfsContext_mkdir_doc},
    {"rmdir", (PyCFunction)NfsContext_rmdir, METH_VARARGS, NfsContext_rmdir_doc},
    {"rename", (PyCFunction)NfsContext_rename, METH_VARARGS, NfsContext_rename_doc},
    {"stat", (PyCFunction)NfsContext_stat, METH_VARARGS, NfsContext_stat_doc},
    {"statvfs", (PyCFunction)NfsContext_statvfs, METH_VARARGS, NfsContext_statvfs_doc},
    {"listdir", (PyCFunction)NfsContext_listdir, METH_VARARGS, NfsContext_listdir_doc},
    {"close", (PyCFunction)NfsContext_close, METH_NOARGS, NfsContext_close_doc},
    {NULL},
};

PyDoc_STRVAR(NfsContext_doc,
             "NfsContext(server, export, nfs_port=0, mount_port=0, timeout_ms=30000, uid=-1, gid=-1)\n\n"
             "An NFSv3 mount through libnfs, in user space. Ports of 0 ask the portmapper; every\n"
             "call fails after timeout_ms instead of hanging. Raises ConnectionError when the\n"
             "server cannot be reached or the export cannot be mounted.");

static PyTypeObject NfsContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.NfsContext",
    .tp_basicsize = sizeof(NfsContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = NfsContext_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NfsContext_init,
    .tp_dealloc = (destructor)NfsContext_dealloc,
    .tp_methods = NfsContext_methods,
};

static void nfs_file_close(NfsFileObject *self)
{
    if (self->fh && self->ctx) {
        bf_py_lock(self->ctx->lock);
        if (self->ctx->nfs) {
            struct nfs_context *nfs = self->ctx->nfs;
            struct nfsfh *fh = self->fh;
            Py_BEGIN_ALLOW_THREADS
            bf_nfs_close(nfs, fh);
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

PyDoc_STRVAR(NfsFile_pwrite_doc, "pwrite(data, offset)\n\n"
                                 "Write all of data (any buffer, not copied) at offset, in calls of at most the\n"
                                 "server's write size.");

static PyObject *NfsFile_pwrite(NfsFileObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "y*K:pwrite", &data, &offset))
        return NULL;
    bf_py_lock(self->ctx->lock);
    PyObject *res = NULL;
    if (file_ready(self) == 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_nfs_pwrite_all(self->ctx->nfs, self->fh, offset, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
        res = none_or_raise(self->ctx, rc, "pwrite", "");
    }
    PyThread_release_lock(self->ctx->lock);
    PyBuffer_Release(&data);
    return res;
}

PyDoc_STRVAR(NfsFile_preadinto_doc, "preadinto(buffer, offset) -> int\n\n"
                                    "Fill the writable buffer from offset; the count read, short only at end of file.");

static PyObject *NfsFile_preadinto(NfsFileObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "w*K:preadinto", &buf, &offset))
        return NULL;
    bf_py_lock(self->ctx->lock);
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

PyDoc_STRVAR(NfsFile_fsync_doc, "fsync()\n\nCommit the written data to stable storage on the server.");

static PyObject *NfsFile_fsync(NfsFileObject *self, PyObject *unused)
{
    bf_py_lock(self->ctx->lock);
    PyObject *res = NULL;
    if (file_ready(self) == 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = bf_nfs_fsync(self->ctx->nfs, self->fh);
        Py_END_ALLOW_THREADS
        res = none_or_raise(self->ctx, rc, "fsync", "");
    }
    PyThread_release_lock(self->ctx->lock);
    return res;
}

PyDoc_STRVAR(NfsFile_close_doc, "close()\n\nClose the file. Idempotent.");

static PyObject *NfsFile_close(NfsFileObject *self, PyObject *unused)
{
    nfs_file_close(self);
    Py_RETURN_NONE;
}

static PyMethodDef NfsFile_methods[] = {
    {"pwrite", (PyCFunction)NfsFile_pwrite, METH_VARARGS, NfsFile_pwrite_doc},
    {"preadinto", (PyCFunction)NfsFile_preadinto, METH_VARARGS, NfsFile_preadinto_doc},
    {"fsync", (PyCFunction)NfsFile_fsync, METH_NOARGS, NfsFile_fsync_doc},
    {"close", (PyCFunction)NfsFile_close, METH_NOARGS, NfsFile_close_doc},
    {NULL},
};

PyDoc_STRVAR(NfsFile_doc, "An open file on an NfsContext (from NfsContext.open); it keeps its context alive.");

static PyTypeObject NfsFileType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.NfsFile",
    .tp_basicsize = sizeof(NfsFileObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = NfsFile_doc,
    .tp_dealloc = (destructor)NfsFile_dealloc,
    .tp_methods = NfsFile_methods,
};

int bf_py_nfs_add(PyObject *m)
{
    if (bf_py_add_type(m, &NfsContextType, "NfsContext") < 0 || bf_py_add_type(m, &NfsFileType, "NfsFile") < 0)
        return -1;
    return 0;
}
