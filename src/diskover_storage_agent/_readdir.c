/* The agent's compiled read loop (optional): one directory, read by fd, in chunks
 * already in their wire form.
 *
 * Linux only (it reads with getdents64: no dup, no fdopendir, four system calls for
 * a small directory: openat by the caller, getdents64 twice, close by the caller).
 *
 * Dir(fd) reads the directory open at fd, from the fd's offset; the fd stays the
 * caller's, and must stay open while the Dir is read.
 *
 * Dir.names(limit, subdirs) -> (count, names, kinds, targets)
 *     Up to `limit` entries without stat, as the fields of a `names` frame: names
 *     joined by NUL bytes, one kind letter per entry, one target letter per symlink
 *     ('-' when it dangles or loops). The names of real directories are appended to
 *     the list `subdirs` (bytes).
 *
 * Dir.items(limit, subdirs) -> (count, items)
 *     The same entries as msgpack-encoded wire entries without stat ([name, kind,
 *     target, nil, nil], target nil unless a symlink that resolves), concatenated.
 *
 * Dir.stat_items(limit, subdirs) -> (count, items, pending)
 *     Up to `limit` entries with lstat, as the msgpack encoding of `count` wire
 *     entries ([name, kind, nil, [13 stat fields], nil], byte for byte as msgspec
 *     encodes them), concatenated. An entry this loop does not decide (a symlink,
 *     whose target stat the caller gives; an entry whose lstat failed; a time that
 *     does not fit 64 bits) ends the call: `pending` is then (name, kind letter from
 *     d_type or ''), the entry that follows the items in directory order, for the
 *     caller to encode. `pending` is None otherwise; `count < limit` then means the
 *     directory is read to its end.
 *
 * Names are the exact bytes the directory holds. The GIL is released while a chunk is read
 * (getdents64 and fstatat); Python objects are built only after.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef __linux__
#error "the compiled read loop is for Linux (getdents64); elsewhere the agent reads in pure Python"
#endif

/* -- a growable byte buffer (no Python API: usable without the GIL) ------------------- */

typedef struct {
    char *data;
    size_t len;
    size_t cap;
} Buf;

static int
buf_grow(Buf *b, size_t extra)
{
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *p = realloc(b->data, cap);
    if (p == NULL)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

#define BUF_RESERVE(b, n) ((b)->cap - (b)->len >= (n) ? 0 : buf_grow((b), (n)))

/* The bytes of a buffer, never NULL (Py_BuildValue makes None of a NULL "y#"). */
#define BUF_DATA(b) ((b)->data != NULL ? (b)->data : "")

static void
buf_free(Buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Where a subdirectory's name lies in a buffer. */
typedef struct {
    size_t offset;
    size_t len;
} Span;

typedef struct {
    Span *items;
    size_t len;
    size_t cap;
} Spans;

static int
spans_add(Spans *s, size_t offset, size_t len)
{
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        Span *p = realloc(s->items, cap * sizeof(Span));
        if (p == NULL)
            return -1;
        s->items = p;
        s->cap = cap;
    }
    s->items[s->len].offset = offset;
    s->items[s->len].len = len;
    s->len++;
    return 0;
}

/* -- msgpack, as msgspec writes it (smallest form of each integer) -------------------- */

static inline void
put_be(char *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

/* At most 9 bytes; the caller has reserved them. */
static inline void
put_uint(Buf *b, uint64_t v)
{
    char *p = b->data + b->len;
    if (v < 128) {
        p[0] = (char)v;
        b->len += 1;
    }
    else if (v < 256) {
        p[0] = (char)0xcc;
        p[1] = (char)v;
        b->len += 2;
    }
    else if (v < 65536) {
        p[0] = (char)0xcd;
        put_be(p + 1, v, 2);
        b->len += 3;
    }
    else if (v <= 0xffffffffULL) {
        p[0] = (char)0xce;
        put_be(p + 1, v, 4);
        b->len += 5;
    }
    else {
        p[0] = (char)0xcf;
        put_be(p + 1, v, 8);
        b->len += 9;
    }
}

static inline void
put_int(Buf *b, int64_t v)
{
    if (v >= 0) {
        put_uint(b, (uint64_t)v);
        return;
    }
    char *p = b->data + b->len;
    if (v >= -32) {
        p[0] = (char)(uint8_t)v;
        b->len += 1;
    }
    else if (v >= -128) {
        p[0] = (char)0xd0;
        p[1] = (char)(uint8_t)v;
        b->len += 2;
    }
    else if (v >= -32768) {
        p[0] = (char)0xd1;
        put_be(p + 1, (uint64_t)v, 2);
        b->len += 3;
    }
    else if (v >= INT32_MIN) {
        p[0] = (char)0xd2;
        put_be(p + 1, (uint64_t)v, 4);
        b->len += 5;
    }
    else {
        p[0] = (char)0xd3;
        put_be(p + 1, (uint64_t)v, 8);
        b->len += 9;
    }
}

/* A bin header; at most 5 bytes, reserved by the caller. */
static inline void
put_bin_header(Buf *b, size_t n)
{
    char *p = b->data + b->len;
    if (n < 256) {
        p[0] = (char)0xc4;
        p[1] = (char)n;
        b->len += 2;
    }
    else if (n < 65536) {
        p[0] = (char)0xc5;
        put_be(p + 1, n, 2);
        b->len += 3;
    }
    else {
        p[0] = (char)0xc6;
        put_be(p + 1, n, 4);
        b->len += 5;
    }
}

/* A time in nanoseconds, as os.stat_result's st_*time_ns; 0 when it does not fit
 * 64 bits (the caller hands such an entry to Python). */
static inline int
time_ns(time_t sec, long nsec, int64_t *out)
{
    const int64_t G = 1000000000;
    if (sec > (INT64_MAX - nsec) / G || sec < INT64_MIN / G + 1)
        return 0;
    *out = (int64_t)sec * G + nsec;
    return 1;
}

/* -- kinds ----------------------------------------------------------------------------- */

static inline char
kind_of_mode(mode_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFDIR: return 'd';
    case S_IFREG: return 'f';
    case S_IFLNK: return 'l';
    case S_IFIFO: return 'p';
    case S_IFSOCK: return 's';
    case S_IFCHR: return 'c';
    case S_IFBLK: return 'b';
    default: return '?';
    }
}

/* The kind d_type gives, or 0 when it gives none. */
static inline char
kind_of_dtype(unsigned char d_type)
{
    switch (d_type) {
    case DT_DIR: return 'd';
    case DT_REG: return 'f';
    case DT_LNK: return 'l';
    case DT_FIFO: return 'p';
    case DT_SOCK: return 's';
    case DT_CHR: return 'c';
    case DT_BLK: return 'b';
    default: return 0;
    }
}

static inline int
is_dot(const char *name)
{
    return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

/* -- the Dir type ---------------------------------------------------------------------- */

/* What getdents64 fills its buffer with. */
struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Bytes read from the directory per getdents64 (as glibc's readdir). */
#define DIRBUF 32768

typedef struct {
    PyObject_HEAD
    int fd;      /* the caller's fd; -1 once closed */
    int busy;    /* a call is reading (with the GIL released) */
    int eof;
    char *dbuf;  /* getdents64's buffer, and the entries left in it */
    size_t dpos;
    size_t dlen;
    Buf out;     /* names, or encoded items */
    Buf kinds;
    Buf targets;
    Spans subdirs;
} DirObject;

/* The next entry of the directory, or NULL: at its end (*err = 0), or when
 * getdents64 failed (*err = its errno). Without the GIL. */
static struct linux_dirent64 *
next_entry(DirObject *self, int *err)
{
    while (self->dpos >= self->dlen) {
        if (self->eof) {
            *err = 0;
            return NULL;
        }
        long n = syscall(SYS_getdents64, self->fd, self->dbuf, DIRBUF);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            /* A directory removed while open says ENOENT: its end, as glibc's readdir says. */
            *err = n < 0 && errno != ENOENT ? errno : 0;
            self->eof = 1;
            return NULL;
        }
        self->dpos = 0;
        self->dlen = (size_t)n;
    }
    struct linux_dirent64 *de = (struct linux_dirent64 *)(self->dbuf + self->dpos);
    self->dpos += de->d_reclen;
    return de;
}

static void
dir_release(DirObject *self)
{
    self->fd = -1;
    free(self->dbuf);
    self->dbuf = NULL;
    self->dpos = self->dlen = 0;
    buf_free(&self->out);
    buf_free(&self->kinds);
    buf_free(&self->targets);
    free(self->subdirs.items);
    self->subdirs.items = NULL;
    self->subdirs.len = self->subdirs.cap = 0;
}

static int
Dir_init(DirObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:Dir", kwlist, &fd))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Dir is being read");
        return -1;
    }
    dir_release(self);
    if (fd < 0) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->dbuf = malloc(DIRBUF);
    if (self->dbuf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->fd = fd;
    self->eof = 0;
    return 0;
}

static void
Dir_dealloc(DirObject *self)
{
    dir_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Checks and marks the object busy; -1 with an exception set when it cannot be read. */
static int
dir_enter(DirObject *self, Py_ssize_t limit, PyObject *subdirs)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Dir is being read by another thread");
        return -1;
    }
    if (self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "Dir is closed");
        return -1;
    }
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return -1;
    }
    if (!PyList_Check(subdirs)) {
        PyErr_SetString(PyExc_TypeError, "subdirs must be a list");
        return -1;
    }
    self->busy = 1;
    self->out.len = self->kinds.len = self->targets.len = 0;
    self->subdirs.len = 0;
    return 0;
}

/* Appends the subdirectory names recorded in self->subdirs (spans of self->out). */
static int
add_subdirs(DirObject *self, PyObject *subdirs)
{
    for (size_t i = 0; i < self->subdirs.len; i++) {
        Span s = self->subdirs.items[i];
        PyObject *name = PyBytes_FromStringAndSize(self->out.data + s.offset, (Py_ssize_t)s.len);
        if (name == NULL)
            return -1;
        int rc = PyList_Append(subdirs, name);
        Py_DECREF(name);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Why a read stopped: 0 (limit or end), an errno (getdents64 failed), or -1 (out of memory). */
static PyObject *
read_failed(int err)
{
    if (err < 0)
        return PyErr_NoMemory();
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* The kind of an entry without its stat, and for a symlink what it points to ('-' when it
 * dangles or loops), in *target; as os.DirEntry's is_dir, is_file and is_symlink, and
 * os.stat, tell them. Without the GIL. */
static inline char
entry_kind(DirObject *self, struct linux_dirent64 *de, char *target)
{
    struct stat st;
    const char *name = de->d_name;
    char kind = kind_of_dtype(de->d_type);
    if (kind == 0)  /* d_type unknown: lstat it (an entry gone since readdir counts as a file) */
        kind = fstatat(self->fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 ? kind_of_mode(st.st_mode) : 'f';
    if (kind == 'l')
        *target = fstatat(self->fd, name, &st, 0) == 0 ? kind_of_mode(st.st_mode) : '-';
    return kind;
}

static PyObject *
Dir_names(DirObject *self, PyObject *args)
{
    Py_ssize_t limit;
    PyObject *subdirs;
    if (!PyArg_ParseTuple(args, "nO:names", &limit, &subdirs))
        return NULL;
    if (dir_enter(self, limit, subdirs) < 0)
        return NULL;

    Py_ssize_t count = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (count < limit) {
        struct linux_dirent64 *de = next_entry(self, &err);
        if (de == NULL)
            break;
        const char *name = de->d_name;
        if (is_dot(name))
            continue;
        size_t len = strlen(name);
        char target = 0;
        char kind = entry_kind(self, de, &target);
        if (BUF_RESERVE(&self->out, len + 1) < 0 || BUF_RESERVE(&self->kinds, 1) < 0
                || BUF_RESERVE(&self->targets, 1) < 0) {
            err = -1;
            break;
        }
        if (count > 0)
            self->out.data[self->out.len++] = '\0';
        if (kind == 'd' && spans_add(&self->subdirs, self->out.len, len) < 0) {
            err = -1;
            break;
        }
        memcpy(self->out.data + self->out.len, name, len);
        self->out.len += len;
        self->kinds.data[self->kinds.len++] = kind;
        if (kind == 'l')
            self->targets.data[self->targets.len++] = target;
        count++;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (err != 0)
        return read_failed(err);
    if (add_subdirs(self, subdirs) < 0)
        return NULL;
    return Py_BuildValue("ny#s#s#", count, BUF_DATA(&self->out), (Py_ssize_t)self->out.len,
                         BUF_DATA(&self->kinds), (Py_ssize_t)self->kinds.len,
                         BUF_DATA(&self->targets), (Py_ssize_t)self->targets.len);
}

static PyObject *
Dir_items(DirObject *self, PyObject *args)
{
    Py_ssize_t limit;
    PyObject *subdirs;
    if (!PyArg_ParseTuple(args, "nO:items", &limit, &subdirs))
        return NULL;
    if (dir_enter(self, limit, subdirs) < 0)
        return NULL;

    Py_ssize_t count = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (count < limit) {
        struct linux_dirent64 *de = next_entry(self, &err);
        if (de == NULL)
            break;
        const char *name = de->d_name;
        if (is_dot(name))
            continue;
        size_t len = strlen(name);
        char target = '-';
        char kind = entry_kind(self, de, &target);
        /* [name, kind, target, nil, nil]: array, bin header, kind, target, two nils */
        Buf *b = &self->out;
        if (BUF_RESERVE(b, len + 12) < 0) {
            err = -1;
            break;
        }
        b->data[b->len++] = (char)0x95;
        put_bin_header(b, len);
        if (kind == 'd' && spans_add(&self->subdirs, b->len, len) < 0) {
            err = -1;
            break;
        }
        memcpy(b->data + b->len, name, len);
        b->len += len;
        b->data[b->len++] = (char)0xa1;
        b->data[b->len++] = kind;
        if (target == '-') {  /* not a symlink, or one that dangles or loops */
            b->data[b->len++] = (char)0xc0;
        }
        else {
            b->data[b->len++] = (char)0xa1;
            b->data[b->len++] = target;
        }
        b->data[b->len++] = (char)0xc0;
        b->data[b->len++] = (char)0xc0;
        count++;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (err != 0)
        return read_failed(err);
    if (add_subdirs(self, subdirs) < 0)
        return NULL;
    return Py_BuildValue("ny#", count, BUF_DATA(&self->out), (Py_ssize_t)self->out.len);
}

/* Largest encoded item besides its name: array, bin header, kind, nil target,
 * array of 13 integers (9 bytes each at most), nil target stat. */
#define ITEM_MAX (1 + 5 + 2 + 1 + 1 + 13 * 9 + 1)

static PyObject *
Dir_stat_items(DirObject *self, PyObject *args)
{
    Py_ssize_t limit;
    PyObject *subdirs;
    if (!PyArg_ParseTuple(args, "nO:stat_items", &limit, &subdirs))
        return NULL;
    if (dir_enter(self, limit, subdirs) < 0)
        return NULL;

    Py_ssize_t count = 0;
    int err = 0;
    int pending = 0;
    char hint = 0;
    /* The pending entry's name goes in self->kinds (unused in this mode). */
    Py_BEGIN_ALLOW_THREADS
    struct stat st;
    while (count < limit) {
        struct linux_dirent64 *de = next_entry(self, &err);
        if (de == NULL)
            break;
        const char *name = de->d_name;
        if (is_dot(name))
            continue;
        size_t len = strlen(name);
        int64_t at, mt, ct;
        if (fstatat(self->fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || S_ISLNK(st.st_mode)
                || !time_ns(st.st_atim.tv_sec, st.st_atim.tv_nsec, &at)
                || !time_ns(st.st_mtim.tv_sec, st.st_mtim.tv_nsec, &mt)
                || !time_ns(st.st_ctim.tv_sec, st.st_ctim.tv_nsec, &ct)) {
            if (BUF_RESERVE(&self->kinds, len) < 0) {
                err = -1;
                break;
            }
            memcpy(self->kinds.data, name, len);
            self->kinds.len = len;
            hint = kind_of_dtype(de->d_type);
            pending = 1;
            break;
        }
        if (BUF_RESERVE(&self->out, len + ITEM_MAX) < 0) {
            err = -1;
            break;
        }
        char kind = kind_of_mode(st.st_mode);
        Buf *b = &self->out;
        b->data[b->len++] = (char)0x95;  /* [name, kind, target, stat, target_stat] */
        put_bin_header(b, len);
        if (kind == 'd' && spans_add(&self->subdirs, b->len, len) < 0) {
            err = -1;
            break;
        }
        memcpy(b->data + b->len, name, len);
        b->len += len;
        b->data[b->len++] = (char)0xa1;
        b->data[b->len++] = kind;
        b->data[b->len++] = (char)0xc0;  /* target: nil (not a symlink) */
        b->data[b->len++] = (char)0x9d;  /* 13 fields, STAT_FIELDS order */
        put_uint(b, (uint64_t)st.st_mode);
        put_uint(b, (uint64_t)st.st_ino);
        put_uint(b, (uint64_t)st.st_dev);
        put_uint(b, (uint64_t)st.st_nlink);
        /* os.stat gives -1 for the "no user/group" id, as CPython's _PyLong_FromUid */
        if (st.st_uid == (uid_t)-1)
            put_int(b, -1);
        else
            put_uint(b, (uint64_t)st.st_uid);
        if (st.st_gid == (gid_t)-1)
            put_int(b, -1);
        else
            put_uint(b, (uint64_t)st.st_gid);
        put_int(b, (int64_t)st.st_size);
        put_int(b, at);
        put_int(b, mt);
        put_int(b, ct);
        put_int(b, (int64_t)st.st_blocks);
        put_int(b, (int64_t)st.st_blksize);
        put_uint(b, (uint64_t)st.st_rdev);
        b->data[b->len++] = (char)0xc0;  /* target_stat: nil */
        count++;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (err != 0)
        return read_failed(err);
    if (add_subdirs(self, subdirs) < 0)
        return NULL;
    if (!pending)
        return Py_BuildValue("ny#O", count, BUF_DATA(&self->out), (Py_ssize_t)self->out.len, Py_None);
    char hint_s[2] = {hint, '\0'};
    return Py_BuildValue("ny#(y#s)", count, BUF_DATA(&self->out), (Py_ssize_t)self->out.len,
                         BUF_DATA(&self->kinds), (Py_ssize_t)self->kinds.len, hint_s);
}

static PyObject *
Dir_close(DirObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Dir is being read by another thread");
        return NULL;
    }
    dir_release(self);
    Py_RETURN_NONE;
}

static PyObject *
Dir_enter(DirObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
Dir_exit(DirObject *self, PyObject *Py_UNUSED(args))
{
    return Dir_close(self, NULL);
}

static PyMethodDef Dir_methods[] = {
    {"names", (PyCFunction)Dir_names, METH_VARARGS,
     "names(limit, subdirs) -> (count, names, kinds, targets): the fields of a names frame."},
    {"items", (PyCFunction)Dir_items, METH_VARARGS,
     "items(limit, subdirs) -> (count, items): msgpack-encoded wire entries without stat."},
    {"stat_items", (PyCFunction)Dir_stat_items, METH_VARARGS,
     "stat_items(limit, subdirs) -> (count, items, pending): msgpack-encoded wire entries with lstat."},
    {"close", (PyCFunction)Dir_close, METH_NOARGS, "Free the buffers (idempotent); the fd stays open."},
    {"__enter__", (PyCFunction)Dir_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Dir_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DirType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "diskover_storage_agent._readdir.Dir",
    .tp_doc = PyDoc_STR("Dir(fd): the directory open at fd (which stays the caller's), read in chunks in wire form."),
    .tp_basicsize = sizeof(DirObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Dir_init,
    .tp_dealloc = (destructor)Dir_dealloc,
    .tp_methods = Dir_methods,
};

static struct PyModuleDef readdir_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "diskover_storage_agent._readdir",
    .m_doc = "The agent's compiled read loop (optional; see listing.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__readdir(void)
{
    if (PyType_Ready(&DirType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&readdir_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DirType);
    if (PyModule_AddObject(m, "Dir", (PyObject *)&DirType) < 0) {
        Py_DECREF(&DirType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
