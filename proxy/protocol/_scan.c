/*
 * C implementation of proxy.protocol.scan.PyScanner (see scan.py for the
 * protocol rationale).  Behaviour must stay identical to the Python version:
 * tests/test_scan.py feeds both the same streams under random chunkings.
 *
 * Design: the state between chunks is a handful of ints plus a 4-byte header
 * stash; rows are skipped with pointer arithmetic and never copied.  Only
 * packets that must be inspected (first packet of a result, EOF/OK/ERR
 * terminators, the prepare OK) are copied into a small inline buffer that
 * grows on the heap only for unusual, large ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* response kinds (public) */
enum { K_RESULT, K_PREPARE, K_FIELD_LIST, K_SIMPLE, K_STATISTICS, K_ROWS, K_CURSOR, K_NKINDS };

/* meaning of the next logical packet (same numbering as scan.py) */
enum {
    S_FIRST, S_COLS, S_COLS_EOF, S_ROWS, S_PREP_FIRST, S_PREP_PARAMS,
    S_PREP_PARAMS_EOF, S_PREP_COLS, S_PREP_COLS_EOF, S_FIELDS, S_SIMPLE,
    S_STAT, S_DONE
};

/* where we are inside the current physical packet */
enum { M_HDR, M_FIRST, M_SKIP, M_COLLECT };

#define PMAX 0xFFFFFFu
#define MORE_RESULTS 0x0008
#define CURSOR_EXISTS 0x0040
#define INLINE_BUF 256
#define KEEP_HEAP_BUF 65536 /* larger heap buffers are freed at start() */

typedef struct {
    PyObject_HEAD
    /* public attributes */
    int status;
    int warnings;  /* of the last OK/EOF read, like status */
    char error;
    char local_infile;
    char deprecate_eof;
    int infile_seq; /* sequence id of the LOCAL INFILE request (the client's file continues from it) */
    Py_ssize_t packets;
    Py_ssize_t rows;  /* rows of the result sets (statistics: rows sent) */
    unsigned int stmt_id;
    int num_params;
    int num_columns;
    PyObject *final;
    /* private state */
    int kind;
    int state;
    int mode;
    int full;      /* current physical packet is 0xFFFFFF long: next one continues it */
    int collect;   /* current logical packet is being buffered */
    int hdr_have;
    unsigned char hdr[4];
    unsigned char seq; /* sequence id of the current packet (general path only: not rows skipped in bulk) */
    uint32_t need; /* bytes left in the current physical payload */
    uint32_t plen; /* physical length of the first packet of the logical packet */
    uint32_t rows_lim;
    uint64_t count; /* definitions left to skip */
    unsigned char *buf;
    Py_ssize_t buf_len;
    Py_ssize_t buf_cap;
    unsigned char ibuf[INLINE_BUF];
} ScannerObject;

static PyObject *empty_bytes;

static const int start_state[K_NKINDS] = {
    S_FIRST, S_PREP_FIRST, S_FIELDS, S_SIMPLE, S_STAT, S_ROWS, S_FIRST
};

static inline uint32_t
le24(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
}

/* Status flags of an OK packet (header, lenenc, lenenc, status u16,
 * warnings u16); its warning count goes to s->warnings. */
static int
ok_status(ScannerObject *s, const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 1;
    s->warnings = 0;
    for (int k = 0; k < 2; k++) {
        if (i >= n)
            return 0;
        unsigned char b = p[i];
        i += b == 0xFC ? 3 : b == 0xFD ? 4 : b == 0xFE ? 9 : 1;
    }
    if (i + 2 > n)
        return 0;
    s->warnings = i + 4 <= n ? (p[i + 2] | (p[i + 3] << 8)) : 0;
    return p[i] | (p[i + 1] << 8);
}

/* Status flags of an EOF packet (0xFE, warnings u16, status u16). */
static inline int
eof_status(ScannerObject *s, const unsigned char *p, Py_ssize_t n)
{
    if (n < 5)
        return 0;
    s->warnings = p[1] | (p[2] << 8);
    return p[3] | (p[4] << 8);
}

static inline int
fe_status(ScannerObject *s, const unsigned char *p, Py_ssize_t n)
{
    if (s->deprecate_eof && n >= 7)
        return ok_status(s, p, n);
    return eof_status(s, p, n);
}

static int
buf_append(ScannerObject *s, const unsigned char *src, Py_ssize_t k)
{
    if (k <= 0)
        return 0;
    if (s->buf_len + k > s->buf_cap) {
        Py_ssize_t cap = s->buf_cap * 2;
        if (cap < s->buf_len + k)
            cap = s->buf_len + k;
        unsigned char *nb;
        if (s->buf == s->ibuf) {
            nb = PyMem_Malloc(cap);
            if (nb != NULL)
                memcpy(nb, s->ibuf, s->buf_len);
        }
        else {
            nb = PyMem_Realloc(s->buf, cap);
        }
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->buf = nb;
        s->buf_cap = cap;
    }
    memcpy(s->buf + s->buf_len, src, k);
    s->buf_len += k;
    return 0;
}

static void
buf_shrink(ScannerObject *s)
{
    if (s->buf != s->ibuf && s->buf_cap > KEEP_HEAP_BUF) {
        PyMem_Free(s->buf);
        s->buf = s->ibuf;
        s->buf_cap = INLINE_BUF;
    }
    s->buf_len = 0;
}

static inline void
classify(ScannerObject *s, int first)
{
    int st = s->state, collect;
    if (st == S_ROWS)
        collect = first == 0xFF || (first == 0xFE && s->plen < s->rows_lim);
    else if (st == S_FIELDS)
        collect = first == 0xFF || (first == 0xFE && s->plen < PMAX);
    else
        collect = st != S_COLS && st != S_PREP_PARAMS && st != S_PREP_COLS;
    s->collect = collect;
    if (collect) {
        s->buf_len = 0;
        s->mode = M_COLLECT;
    }
    else {
        s->mode = M_SKIP;
    }
}

/* The response is complete.  The buffer holds the last OK/EOF/ERR-class
 * packet: only skipped definitions can follow it (deprecate-EOF prepare). */
static int
done(ScannerObject *s)
{
    PyObject *f = PyBytes_FromStringAndSize((const char *)s->buf, s->buf_len);
    if (f == NULL)
        return -1;
    Py_SETREF(s->final, f);
    s->state = S_DONE;
    return 1;
}

static int
prep_columns(ScannerObject *s)
{
    if (s->num_columns) {
        s->count = (uint64_t)s->num_columns;
        s->state = S_PREP_COLS;
        return 0;
    }
    return done(s);
}

/* A logical packet is complete: advance the grammar.
 * 1 = response done, 0 = continue, -1 = Python error. */
static int
end_logical(ScannerObject *s)
{
    int st = s->state;
    int dep = s->deprecate_eof;
    int status;

    if (!s->collect) {
        if (st == S_ROWS) {
            s->rows++;
            return 0;
        }
        if (st == S_COLS || st == S_PREP_PARAMS || st == S_PREP_COLS) {
            if (--s->count > 0)
                return 0;
            if (st == S_COLS) {
                s->state = dep ? S_ROWS : S_COLS_EOF;
                return 0;
            }
            if (st == S_PREP_PARAMS) {
                if (dep)
                    return prep_columns(s);
                s->state = S_PREP_PARAMS_EOF;
                return 0;
            }
            if (dep)
                return done(s);
            s->state = S_PREP_COLS_EOF;
        }
        return 0;
    }

    const unsigned char *p = s->buf;
    Py_ssize_t n = s->buf_len;
    int first = n ? p[0] : -1;

    if (first == 0xFF && st != S_STAT) {
        s->error = 1;
        return done(s);
    }
    switch (st) {
    case S_ROWS:
    case S_FIELDS:
        status = s->status = fe_status(s, p, n);
        if (st == S_ROWS && s->kind != K_ROWS && (status & MORE_RESULTS)) {
            s->state = S_FIRST;
            return 0;
        }
        return done(s);
    case S_FIRST: {
        uint64_t count;
        if (first == 0x00 || first == 0xFE) {
            status = s->status = first == 0 ? ok_status(s, p, n) : fe_status(s, p, n);
            if (status & MORE_RESULTS)
                return 0;
            return done(s);
        }
        if (first == 0xFB) {
            s->local_infile = 1;
            s->infile_seq = s->seq;
            return done(s);
        }
        if (first == -1)
            return done(s);
        if (first == 0xFC || first == 0xFD) {
            /* lenenc integer; a truncated one reads as zero-extended */
            Py_ssize_t w = first == 0xFC ? 2 : 3;
            count = 0;
            for (Py_ssize_t i = 0; i < w && 1 + i < n; i++)
                count |= (uint64_t)p[1 + i] << (8 * i);
        }
        else {
            count = (uint64_t)first;
        }
        if (count) {
            s->count = count;
            s->state = S_COLS;
        }
        else {
            s->state = dep ? S_ROWS : S_COLS_EOF;
        }
        return 0;
    }
    case S_COLS_EOF:
        status = s->status = fe_status(s, p, n);
        /* only an execute that asked for a cursor gets no rows: in any other result
         * CURSOR_EXISTS only says a stored program has a cursor open (a FOR loop) */
        if ((status & CURSOR_EXISTS) && s->kind == K_CURSOR)
            return done(s);
        s->state = S_ROWS;
        return 0;
    case S_PREP_FIRST:
        if (n >= 9) {
            s->stmt_id = (unsigned int)p[1] | ((unsigned int)p[2] << 8) |
                         ((unsigned int)p[3] << 16) | ((unsigned int)p[4] << 24);
            s->num_columns = p[5] | (p[6] << 8);
            s->num_params = p[7] | (p[8] << 8);
        }
        if (s->num_params) {
            s->count = (uint64_t)s->num_params;
            s->state = S_PREP_PARAMS;
            return 0;
        }
        return prep_columns(s);
    case S_PREP_PARAMS_EOF:
        s->status = fe_status(s, p, n);
        return prep_columns(s);
    case S_PREP_COLS_EOF:
        s->status = fe_status(s, p, n);
        return done(s);
    case S_SIMPLE:
        if (first == 0x00)
            s->status = ok_status(s, p, n);
        else if (first == 0xFE)
            s->status = fe_status(s, p, n);
        return done(s);
    default: /* S_STAT */
        s->error = first == 0xFF;
        return done(s);
    }
}

/* Walk a chunk.  Returns -1 (incomplete), -2 (Python error) or the number
 * of bytes that completed the response. */
static Py_ssize_t
scan(ScannerObject *s, const unsigned char *d, Py_ssize_t n)
{
    Py_ssize_t pos = 0;

    if (s->state == S_DONE)
        return 0;
    for (;;) {
        switch (s->mode) {
        case M_HDR: {
            uint32_t plen;
            if (s->hdr_have == 0) {
                int st = s->state;
                if (!s->full && st == S_ROWS) {
                    /* Hot loop: skip whole rows inside this chunk.  Anything
                     * unusual (0xFE/0xFF head, empty or split packet, packet
                     * crossing the chunk end) takes the general path. */
                    const unsigned char *p = d + pos, *e = d + n;
                    Py_ssize_t pk = 0;
                    while (e - p > 4) {
                        uint32_t l = le24(p);
                        if (l == 0 || l == PMAX || p[4] >= 0xFE ||
                            (Py_ssize_t)l > e - p - 4)
                            break;
                        p += 4 + (Py_ssize_t)l;
                        pk++;
                    }
                    pos = p - d;
                    s->packets += pk;
                    s->rows += pk;
                }
                else if (!s->full && (st == S_COLS || st == S_PREP_PARAMS ||
                                      st == S_PREP_COLS)) {
                    /* Definitions: skip all but the last one (whose end
                     * changes state) without per-packet bookkeeping. */
                    const unsigned char *p = d + pos, *e = d + n;
                    uint64_t c = s->count;
                    while (c > 1 && e - p >= 4) {
                        uint32_t l = le24(p);
                        if (l == PMAX || (Py_ssize_t)l > e - p - 4)
                            break;
                        p += 4 + (Py_ssize_t)l;
                        c--;
                    }
                    s->packets += (Py_ssize_t)(s->count - c);
                    s->count = c;
                    pos = p - d;
                }
                if (n - pos < 4) {
                    memcpy(s->hdr, d + pos, (size_t)(n - pos));
                    s->hdr_have = (int)(n - pos);
                    return -1;
                }
                plen = le24(d + pos);
                s->seq = d[pos + 3];
                pos += 4;
            }
            else {
                while (s->hdr_have < 4 && pos < n)
                    s->hdr[s->hdr_have++] = d[pos++];
                if (s->hdr_have < 4)
                    return -1;
                s->hdr_have = 0;
                plen = le24(s->hdr);
                s->seq = s->hdr[3];
            }
            int cont = s->full;
            s->full = plen == PMAX;
            s->need = plen;
            if (cont) {
                s->mode = s->collect ? M_COLLECT : M_SKIP;
            }
            else {
                s->packets++;
                s->plen = plen;
                if (plen)
                    s->mode = M_FIRST;
                else
                    classify(s, -1);
            }
            break;
        }
        case M_FIRST:
            if (pos >= n)
                return -1;
            classify(s, d[pos]);
            break;
        default: { /* M_SKIP, M_COLLECT */
            Py_ssize_t avail = n - pos;
            Py_ssize_t need = (Py_ssize_t)s->need;
            if (avail < need) {
                if (s->mode == M_COLLECT && buf_append(s, d + pos, avail) < 0)
                    return -2;
                s->need = (uint32_t)(need - avail);
                return -1;
            }
            if (s->mode == M_COLLECT && buf_append(s, d + pos, need) < 0)
                return -2;
            pos += need;
            s->need = 0;
            s->mode = M_HDR;
            if (!s->full) {
                int r = end_logical(s);
                if (r)
                    return r < 0 ? -2 : pos;
            }
            break;
        }
        }
    }
}

static void
reset(ScannerObject *s, int kind)
{
    s->kind = kind;
    s->state = start_state[kind];
    s->mode = M_HDR;
    s->full = 0;
    s->collect = 0;
    s->hdr_have = 0;
    s->need = 0;
    s->plen = 0;
    s->count = 0;
    buf_shrink(s);
    s->status = 0;
    s->warnings = 0;
    s->error = 0;
    s->local_infile = 0;
    s->infile_seq = 0;
    s->packets = 0;
    s->rows = 0;
    s->stmt_id = 0;
    s->num_params = 0;
    s->num_columns = 0;
    Py_INCREF(empty_bytes);
    Py_XSETREF(s->final, empty_bytes);
}

static PyObject *
Scanner_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ScannerObject *s = (ScannerObject *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->buf = s->ibuf;
    s->buf_cap = INLINE_BUF;
    s->rows_lim = 9;
    reset(s, K_SIMPLE);
    s->state = S_DONE; /* feed() before start() consumes nothing */
    return (PyObject *)s;
}

static int
Scanner_init(ScannerObject *s, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"deprecate_eof", NULL};
    int dep;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "p:Scanner", kwlist, &dep))
        return -1;
    s->deprecate_eof = (char)dep;
    /* rows end with an EOF (< 9 bytes) or, with deprecate_eof, an OK that
     * is not the head of a >= 16 MiB row */
    s->rows_lim = dep ? PMAX : 9;
    return 0;
}

static void
Scanner_dealloc(ScannerObject *s)
{
    if (s->buf != s->ibuf)
        PyMem_Free(s->buf);
    Py_XDECREF(s->final);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *
Scanner_start(ScannerObject *s, PyObject *arg)
{
    long kind = PyLong_AsLong(arg);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    if (kind < 0 || kind >= K_NKINDS) {
        PyErr_Format(PyExc_ValueError, "unknown response kind %R", arg);
        return NULL;
    }
    reset(s, (int)kind);
    Py_RETURN_NONE;
}

static PyObject *
Scanner_feed(ScannerObject *s, PyObject *arg)
{
    Py_ssize_t r;
    if (PyBytes_CheckExact(arg)) {
        r = scan(s, (const unsigned char *)PyBytes_AS_STRING(arg),
                 PyBytes_GET_SIZE(arg));
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        r = scan(s, (const unsigned char *)view.buf, view.len);
        PyBuffer_Release(&view);
    }
    if (r == -2)
        return NULL;
    return PyLong_FromSsize_t(r);
}

static PyMethodDef Scanner_methods[] = {
    {"start", (PyCFunction)Scanner_start, METH_O,
     "start(kind): begin scanning a new response of the given kind."},
    {"feed", (PyCFunction)Scanner_feed, METH_O,
     "feed(data) -> -1 while incomplete, else bytes of data that belonged "
     "to the response."},
    {NULL, NULL, 0, NULL}
};

static PyMemberDef Scanner_members[] = {
    {"deprecate_eof", T_BOOL, offsetof(ScannerObject, deprecate_eof), READONLY, NULL},
    {"status", T_INT, offsetof(ScannerObject, status), READONLY, NULL},
    {"warnings", T_INT, offsetof(ScannerObject, warnings), READONLY, NULL},
    {"error", T_BOOL, offsetof(ScannerObject, error), READONLY, NULL},
    {"final", T_OBJECT, offsetof(ScannerObject, final), READONLY, NULL},
    {"local_infile", T_BOOL, offsetof(ScannerObject, local_infile), READONLY, NULL},
    {"infile_seq", T_INT, offsetof(ScannerObject, infile_seq), READONLY, NULL},
    {"packets", T_PYSSIZET, offsetof(ScannerObject, packets), READONLY, NULL},
    {"rows", T_PYSSIZET, offsetof(ScannerObject, rows), READONLY, NULL},
    {"stmt_id", T_UINT, offsetof(ScannerObject, stmt_id), READONLY, NULL},
    {"num_params", T_INT, offsetof(ScannerObject, num_params), READONLY, NULL},
    {"num_columns", T_INT, offsetof(ScannerObject, num_columns), READONLY, NULL},
    {NULL}
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy.protocol._scan.Scanner",
    .tp_doc = "Scanner(deprecate_eof): finds the end of MySQL responses.",
    .tp_basicsize = sizeof(ScannerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Scanner_new,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_members = Scanner_members,
};

static struct PyModuleDef scanmodule = {
    PyModuleDef_HEAD_INIT, "_scan",
    "C implementation of proxy.protocol.scan.Scanner.", -1, NULL
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    if (empty_bytes == NULL) {
        empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
        if (empty_bytes == NULL)
            return NULL;
    }
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&scanmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
