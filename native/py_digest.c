/* Python glue for the digest kernels: block digests, zero flags, digest
 * diffs and the streaming image digest (ImageHash). */
#include "pyglue.h"

#include <string.h>

#include "diff.h"
#include "digest.h"
#include "imagehash.h"
#include "zero.h"

static int parse_algo(const char *name)
{
    if (strcmp(name, "sha256") == 0)
        return BF_ALGO_SHA256;
    if (strcmp(name, "xxh3-128") == 0)
        return BF_ALGO_XXH3_128;
    PyErr_Format(PyExc_ValueError, "algo: unknown digest algorithm '%s' (use 'sha256' or 'xxh3-128')", name);
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

PyDoc_STRVAR(digest_size_doc, "digest_size(algo) -> int\n\nDigest size in bytes of algo ('sha256': 32, 'xxh3-128': "
                              "16).\nRaises ValueError for an unknown algorithm.");

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

PyDoc_STRVAR(block_digests_doc,
             "block_digests(algo, data, block_size, threads=0) -> (digests, zero_flags)\n\n"
             "Digest every block_size block of data (the last may be shorter) with algo, on up to\n"
             "threads threads (0: all CPUs). digests is the concatenation of the block digests,\n"
             "zero_flags one byte per block, 1 for an all-zero block (its digest is the cached one).");

static PyObject *py_block_digests(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"algo", "data", "block_size", "threads", NULL};
    const char *name;
    Py_buffer data;
    Py_ssize_t block_size;
    unsigned int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sy*n|I:block_digests", kwlist, &name, &data, &block_size, &threads))
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

PyDoc_STRVAR(is_zero_doc, "is_zero(data) -> bool\n\nTrue if every byte of data (any buffer) is zero.");

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

PyDoc_STRVAR(zero_flags_doc, "zero_flags(data, block_size, threads=0) -> bytes\n\nOne byte per block_size block of "
                             "data: 1 if the block is all zeros, else 0.");

static PyObject *py_zero_flags(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "block_size", "threads", NULL};
    Py_buffer data;
    Py_ssize_t block_size;
    unsigned int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*n|I:zero_flags", kwlist, &data, &block_size, &threads))
        return NULL;
    PyObject *flags = NULL;
    if (check_block_size(block_size) < 0)
        goto out;
    size_t n = data.len ? ((size_t)data.len + (size_t)block_size - 1) / (size_t)block_size : 0;
    flags = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!flags)
        goto out;
    Py_BEGIN_ALLOW_THREADS
    bf_zero_flags(data.buf, (size_t)data.len, (size_t)block_size, threads, (uint8_t *)PyBytes_AS_STRING(flags));
    Py_END_ALLOW_THREADS
out:
    PyBuffer_Release(&data);
    return flags;
}

PyDoc_STRVAR(diff_digests_doc,
             "diff_digests(old, new, digest_size, block_size, length) -> [(start, length)]\n\n"
             "Compare two digest lists of one image (new covers length bytes; blocks past the end of\n"
             "old count as changed) and return the changed byte ranges, adjacent ones merged.\n"
             "Raises ValueError if the lists do not match digest_size, block_size and length.");

static PyObject *py_diff_digests(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"old", "new", "digest_size", "block_size", "length", NULL};
    Py_buffer old, new;
    Py_ssize_t dsize, block_size;
    unsigned long long length;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*nnK:diff_digests", kwlist, &old, &new, &dsize, &block_size,
                                     &length))
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
        PyErr_Format(PyExc_ValueError, "length: %llu bytes is not %zu blocks of %zd bytes", length, n_new, block_size);
        goto out;
    }
    size_t count, total;
    Py_BEGIN_ALLOW_THREADS
    count = bf_diff_digests(old.buf, n_old, new.buf, n_new, (size_t)dsize, (uint64_t)block_size, length, NULL, 0);
    Py_END_ALLOW_THREADS
    ext = PyMem_RawMalloc((count ? count : 1) * sizeof(*ext));
    if (!ext) {
        PyErr_NoMemory();
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    total = bf_diff_digests(old.buf, n_old, new.buf, n_new, (size_t)dsize, (uint64_t)block_size, length, ext, count);
    Py_END_ALLOW_THREADS(void)
    total;
    result = PyList_New((Py_ssize_t)count);
    if (!result)
        goto out;
    for (size_t i = 0; i < count; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)ext[i].start, (unsigned long long)ext[i].length);
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

PyDoc_STRVAR(ImageHash_update_doc, "update(data)\n\nAdd content bytes (any buffer, any length).\nRaises RuntimeError "
                                   "after digest() or while another thread is in a call.");

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

PyDoc_STRVAR(ImageHash_zero_doc, "zero(length)\n\nAdd length zero bytes without any data (holes, known-zero ranges).");

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

PyDoc_STRVAR(ImageHash_digest_doc,
             "digest() -> bytes\n\nFinish and return the 32-byte image digest; calling it again returns the same.");

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
    {"update", (PyCFunction)ImageHash_update, METH_VARARGS, ImageHash_update_doc},
    {"zero", (PyCFunction)ImageHash_zero, METH_VARARGS, ImageHash_zero_doc},
    {"digest", (PyCFunction)ImageHash_digest, METH_NOARGS, ImageHash_digest_doc},
    {NULL},
};

static PyGetSetDef ImageHash_getset[] = {
    {"length", (getter)ImageHash_get_length, NULL, "Content length added so far.", NULL},
    {NULL},
};

PyDoc_STRVAR(ImageHash_doc, "ImageHash(threads=0)\n\n"
                            "The streaming image digest, format bf-image-sha256-v1 (docs/native.md): content is added\n"
                            "in pieces of any size with update() and zero(), and digest() finishes it.");

static PyTypeObject ImageHashType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._native.ImageHash",
    .tp_basicsize = sizeof(ImageHashObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = ImageHash_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ImageHash_init,
    .tp_dealloc = (destructor)ImageHash_dealloc,
    .tp_methods = ImageHash_methods,
    .tp_getset = ImageHash_getset,
};

static PyMethodDef digest_methods[] = {
    {"digest_size", py_digest_size, METH_VARARGS, digest_size_doc},
    {"block_digests", (PyCFunction)(void (*)(void))py_block_digests, METH_VARARGS | METH_KEYWORDS, block_digests_doc},
    {"is_zero", py_is_zero, METH_VARARGS, is_zero_doc},
    {"zero_flags", (PyCFunction)(void (*)(void))py_zero_flags, METH_VARARGS | METH_KEYWORDS, zero_flags_doc},
    {"diff_digests", (PyCFunction)(void (*)(void))py_diff_digests, METH_VARARGS | METH_KEYWORDS, diff_digests_doc},
    {NULL},
};

int bf_py_digest_add(PyObject *m)
{
    if (PyModule_AddFunctions(m, digest_methods) < 0 || bf_py_add_type(m, &ImageHashType, "ImageHash") < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "IMAGE_BLOCK_SIZE", BF_IMAGE_BLOCK_SIZE) < 0 ||
        PyModule_AddStringConstant(m, "IMAGE_DIGEST_FORMAT", "bf-image-sha256-v1") < 0 ||
        PyModule_AddStringConstant(m, "SHA256_ISA", bf_sha256_isa()) < 0 ||
        PyModule_AddStringConstant(m, "XXH3_ISA", bf_xxh3_isa()) < 0)
        return -1;
    return 0;
}
