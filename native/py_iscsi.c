/* Python glue for iscsiio.c: IscsiLun (one logged-in session to one LUN)
 * and iscsi_discover. Calls take the object's lock with the GIL released
 * (libiscsi contexts are not thread-safe). Errors: ConnectionError (cannot
 * reach or log in), PermissionError (CHAP refused), OSError(EIO) for a
 * failed SCSI command. Secrets go to iscsiio.c only, never into messages. */
#include "pyglue.h"

#include <errno.h>

#include "iscsiio.h"

typedef struct {
    PyObject_HEAD
    struct iscsi_context *iscsi;
    PyThread_type_lock lock;
    int lun;
    uint32_t block_size;
    uint64_t num_blocks;
} IscsiLunObject;

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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sss|issip:IscsiLun", kwlist, &initiator, &portal, &target, &lun, &user,
                                     &secret, &timeout, &probe))
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
    iscsi =
        bf_iscsi_login(initiator, portal, target, lun, probe, user, secret, timeout, &bs, &nb, &fail, err, sizeof(err));
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

/* One SCSI command on the session: lock, check, call with the GIL released,
 * unlock. buf is NULL for a flush and is released here otherwise. */
enum scsi_op { SCSI_READ, SCSI_WRITE, SCSI_FLUSH };

static PyObject *iscsi_io(IscsiLunObject *self, enum scsi_op op, Py_buffer *buf, unsigned long long offset)
{
    PyObject *res = NULL;
    bf_py_lock(self->lock);
    if (iscsi_ready(self) == 0 && (!buf || check_aligned(self, offset, buf->len) == 0)) {
        char err[512] = "";
        int rc;
        Py_BEGIN_ALLOW_THREADS
        switch (op) {
        case SCSI_READ:
            rc = bf_iscsi_read(self->iscsi, self->lun, self->block_size, offset, buf->buf, (size_t)buf->len, err,
                               sizeof(err));
            break;
        case SCSI_WRITE:
            rc = bf_iscsi_write(self->iscsi, self->lun, self->block_size, offset, buf->buf, (size_t)buf->len, err,
                                sizeof(err));
            break;
        default:
            rc = bf_iscsi_flush(self->iscsi, self->lun, err, sizeof(err));
            break;
        }
        Py_END_ALLOW_THREADS
        res = rc ? iscsi_fail(BF_ISCSI_SCSI, err) : (Py_INCREF(Py_None), Py_None);
    }
    PyThread_release_lock(self->lock);
    if (buf)
        PyBuffer_Release(buf);
    return res;
}

PyDoc_STRVAR(IscsiLun_readinto_doc, "readinto(buffer, offset)\n\n"
                                    "Fill the writable buffer from the LUN at offset, without a copy. offset and\n"
                                    "len(buffer) must be multiples of block_size and inside the LUN (ValueError).");

static PyObject *IscsiLun_readinto(IscsiLunObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "w*K:readinto", &buf, &offset))
        return NULL;
    return iscsi_io(self, SCSI_READ, &buf, offset);
}

PyDoc_STRVAR(IscsiLun_write_doc, "write(data, offset)\n\n"
                                 "Write data (any buffer, not copied) to the LUN at offset; the same alignment\n"
                                 "rules as readinto.");

static PyObject *IscsiLun_write(IscsiLunObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "y*K:write", &buf, &offset))
        return NULL;
    return iscsi_io(self, SCSI_WRITE, &buf, offset);
}

PyDoc_STRVAR(IscsiLun_flush_doc, "flush()\n\nSYNCHRONIZE CACHE(16) over the whole LUN.");

static PyObject *IscsiLun_flush(IscsiLunObject *self, PyObject *unused)
{
    return iscsi_io(self, SCSI_FLUSH, NULL, 0);
}

PyDoc_STRVAR(IscsiLun_report_luns_doc, "report_luns() -> [(lun, size_bytes)]\n\n"
                                       "The LUNs of this session's target (REPORT LUNS); a LUN without a capacity,\n"
                                       "such as the controller LUN 0, reports size 0.");

static PyObject *IscsiLun_report_luns(IscsiLunObject *self, PyObject *unused)
{
    PyObject *res = NULL;
    bf_py_lock(self->lock);
    if (iscsi_ready(self) == 0) {
        char err[512] = "";
        int luns[256];
        uint32_t bs[256];
        uint64_t nb[256];
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = bf_iscsi_report_luns(self->iscsi, luns, 256, err, sizeof(err));
        for (int i = 0; i < n; i++)
            if (bf_iscsi_capacity(self->iscsi, luns[i], &bs[i], &nb[i], err, sizeof(err)) != 0)
                bs[i] = 0, nb[i] = 0;
        Py_END_ALLOW_THREADS
        if (n < 0) {
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

PyDoc_STRVAR(IscsiLun_close_doc, "close()\n\nLog out. Idempotent.");

static PyObject *IscsiLun_close(IscsiLunObject *self, PyObject *unused)
{
    bf_py_lock(self->lock);
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
    {"readinto", (PyCFunction)IscsiLun_readinto, METH_VARARGS, IscsiLun_readinto_doc},
    {"write", (PyCFunction)IscsiLun_write, METH_VARARGS, IscsiLun_write_doc},
    {"flush", (PyCFunction)IscsiLun_flush, METH_NOARGS, IscsiLun_flush_doc},
    {"report_luns", (PyCFunction)IscsiLun_report_luns, METH_NOARGS, IscsiLun_report_luns_doc},
    {"close", (PyCFunction)IscsiLun_close, METH_NOARGS, IscsiLun_close_doc},
    {NULL},
};

static PyGetSetDef IscsiLun_getset[] = {
    {"size", (getter)IscsiLun_get_size, NULL, "LUN size in bytes.", NULL},
    {"block_size", (getter)IscsiLun_get_block_size, NULL, "Logical block size in bytes.", NULL},
    {NULL},
};

PyDoc_STRVAR(IscsiLun_doc, "IscsiLun(initiator, portal, target, lun=0, user='', secret='', timeout=30, probe=False)\n\n"
                           "A logged-in session to one LUN through libiscsi, in user space. portal is\n"
                           "'host:port'; user and secret enable CHAP; probe logs in only, for report_luns.\n"
                           "Raises ConnectionError or PermissionError (CHAP refused).");

static PyTypeObject IscsiLunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.IscsiLun",
    .tp_basicsize = sizeof(IscsiLunObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = IscsiLun_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)IscsiLun_init,
    .tp_dealloc = (destructor)IscsiLun_dealloc,
    .tp_methods = IscsiLun_methods,
    .tp_getset = IscsiLun_getset,
};

PyDoc_STRVAR(iscsi_discover_doc, "iscsi_discover(initiator, portal, user='', secret='', timeout=30) -> [str]\n\n"
                                 "The target IQNs a portal offers (SendTargets discovery).\n"
                                 "Raises ConnectionError or PermissionError (CHAP refused).");

static PyObject *py_iscsi_discover(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"initiator", "portal", "user", "secret", "timeout", NULL};
    const char *initiator, *portal, *user = "", *secret = "";
    int timeout = 30;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|ssi:iscsi_discover", kwlist, &initiator, &portal, &user, &secret,
                                     &timeout))
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

static PyMethodDef iscsi_methods[] = {
    {"iscsi_discover", (PyCFunction)(void (*)(void))py_iscsi_discover, METH_VARARGS | METH_KEYWORDS,
     iscsi_discover_doc},
    {NULL},
};

int bf_py_iscsi_add(PyObject *m)
{
    if (PyModule_AddFunctions(m, iscsi_methods) < 0 || bf_py_add_type(m, &IscsiLunType, "IscsiLun") < 0)
        return -1;
    return 0;
}
