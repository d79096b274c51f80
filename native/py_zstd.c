/* Python glue for zstdio.c: decompress into a caller's buffer. */
#include "pyglue.h"

#include "zstdio.h"

PyDoc_STRVAR(zstd_decompress_into_doc,
             "zstd_decompress_into(src, dst) -> int\n\n"
             "Decompress the zstd frame(s) in src straight into the writable buffer dst and return the\n"
             "count written. Raises ValueError for a damaged frame or content larger than dst.");

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

static PyMethodDef zstd_methods[] = {
    {"zstd_decompress_into", py_zstd_decompress_into, METH_VARARGS, zstd_decompress_into_doc},
    {NULL},
};

int bf_py_zstd_add(PyObject *m)
{
    return PyModule_AddFunctions(m, zstd_methods);
}
