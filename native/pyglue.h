/* The Python glue's shared declarations. module.c creates agent._native and
 * calls one add function per glue file (py_*.c); each adds its functions,
 * types and constants to the module. Only module.c and the py_*.c files
 * include Python.h; the kernels and the library layers (nfsio.c, iscsiio.c,
 * zstdio.c) are plain C. */
#ifndef BF_PYGLUE_H
#define BF_PYGLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

int bf_py_digest_add(PyObject *m); /* digests, zero flags, diff, ImageHash */
int bf_py_zstd_add(PyObject *m);   /* zstd_decompress_into */
int bf_py_nfs_add(PyObject *m);    /* NfsContext, NfsFile */
int bf_py_iscsi_add(PyObject *m);  /* IscsiLun, iscsi_discover */

/* Ready a static type and add it to m under name; 0 or -1. */
int bf_py_add_type(PyObject *m, PyTypeObject *type, const char *name);

/* Take an object's call lock; the GIL is released only while waiting. */
void bf_py_lock(PyThread_type_lock lock);

#endif
