/* agent._native: creates the module and lets each glue file (py_*.c) add its
 * functions and types. Every kernel call in the glue runs with the GIL
 * released; buffers stay exported (and so pinned) while it runs. */
#include "pyglue.h"

int bf_py_add_type(PyObject *m, PyTypeObject *type, const char *name)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

void bf_py_lock(PyThread_type_lock lock)
{
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

PyDoc_STRVAR(module_doc, "blockferry's hot paths in C: block digests, zero detection, digest diffs, the image digest,\n"
                         "zstd into a caller's buffer, and zero-copy NFS (libnfs) and iSCSI (libiscsi) I/O.\n"
                         "agent/native.py is the only importer and holds the pure-Python reference.");

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent._native",
    .m_doc = module_doc,
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (bf_py_digest_add(m) < 0 || bf_py_zstd_add(m) < 0 || bf_py_nfs_add(m) < 0 || bf_py_iscsi_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
