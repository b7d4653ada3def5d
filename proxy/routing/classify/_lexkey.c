/*
 * C twin of the hot line of proxy.routing.classify.lex.cache_key:  _B_LIT.sub(b"?", raw).
 *
 * Every statement the proxy relays goes through cache_key, and that regex pass was
 * ~0.5 us of the ~4 us of Python per statement.  literal_key() does the same pass
 * in one loop, and returns None (the caller then runs the regex path) whenever the
 * text holds something that path treats specially: a comment or backtick marker
 * outside literals ('#', '`', slash-star, '--'), or a quote that is never closed.
 *
 * Contract, checked by tests/test_lexkey.py on random texts: when the result is
 * not None it equals _B_LIT.sub(b"?", raw) byte for byte.  The number rules follow
 * _NUM_BODY in lex.py, including the order in which the regex backtracks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* [\w$\x80-\xff] for a bytes pattern (ASCII \w) */
static inline int
is_word(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || c == '_' || c == '$' || c >= 0x80;
}

static inline int
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static inline int
is_hex(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* End of the quoted string starting at s[i] (its quote), or -1 when it is never closed.
 * Backslash escapes any byte; a doubled quote continues the string (the regex tries
 * that before closing, and only backtracks when the string would stay open). */
static Py_ssize_t
string_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t i)
{
    unsigned char q = s[i];
    Py_ssize_t j = i + 1;
    while (j < n) {
        unsigned char c = s[j];
        if (c == '\\') {
            if (j + 1 >= n)
                return -1;
            j += 2;
        } else if (c == q) {
            if (j + 1 < n && s[j + 1] == q)
                j += 2;
            else
                return j + 1;
        } else {
            j++;
        }
    }
    return -1;
}

/* End of the number literal starting at s[i] (a digit or '.'), or -1 when _NUM_BODY does
 * not match there. */
static Py_ssize_t
number_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t i)
{
    Py_ssize_t ends[4], j, k;
    int count = 0;

    /* not glued to an identifier, variable or qualified name: t1, @v1, t.5 keep digits */
    if (i > 0 && (is_word(s[i - 1]) || s[i - 1] == '@' || s[i - 1] == '.'))
        return -1;
    j = i + 1;
    while (j < n && is_digit(s[j]))
        j++;
    if (is_digit(s[i])) {
        /* candidate ends in the regex's order: hex, binary, fraction, digits alone */
        if (j < n && (s[j] == 'x' || s[j] == 'X')) {
            for (k = j + 1; k < n && is_hex(s[k]); k++)
                ;
            if (k > j + 1)
                ends[count++] = k;
        }
        if (j < n && (s[j] == 'b' || s[j] == 'B')) {
            for (k = j + 1; k < n && (s[k] == '0' || s[k] == '1'); k++)
                ;
            if (k > j + 1)
                ends[count++] = k;
        }
        if (j < n && s[j] == '.') {
            for (k = j + 1; k < n && is_digit(s[k]); k++)
                ;
            ends[count++] = k;
        }
        ends[count++] = j;
    } else {
        if (j == i + 1)
            return -1; /* '.' needs digits */
        ends[count++] = j;
    }
    for (int c = 0; c < count; c++) {
        Py_ssize_t e = ends[c];
        if (e < n && (s[e] == 'e' || s[e] == 'E')) { /* exponent, tried before none */
            Py_ssize_t m = e + 1;
            if (m < n && (s[m] == '-' || s[m] == '+'))
                m++;
            k = m;
            while (k < n && is_digit(s[k]))
                k++;
            if (k > m && (k >= n || !is_word(s[k])))
                return k;
        }
        if (e >= n || !is_word(s[e]))
            return e;
    }
    return -1;
}

static PyObject *
literal_key(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg))
        Py_RETURN_NONE; /* bytearray, memoryview: the regex path takes them */
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n); /* literals only ever shrink */
    if (out == NULL)
        return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t i = 0, w = 0;
    while (i < n) {
        unsigned char c = s[i];
        Py_ssize_t e;
        switch (c) {
        case '\'':
        case '"':
            e = string_end(s, n, i);
            if (e < 0)
                goto fallback;
            o[w++] = '?';
            i = e;
            continue;
        case '0': case '1': case '2': case '3': case '4':
        case '5': case '6': case '7': case '8': case '9':
        case '.':
            e = number_end(s, n, i);
            if (e >= 0) {
                o[w++] = '?';
                i = e;
                continue;
            }
            break;
        case '#':
        case '`':
            goto fallback;
        case '/':
            if (i + 1 < n && s[i + 1] == '*')
                goto fallback;
            break;
        case '-':
            if (i + 1 < n && s[i + 1] == '-')
                goto fallback;
            break;
        }
        o[w++] = c;
        i++;
    }
    if (w != n && _PyBytes_Resize(&out, w) < 0)
        return NULL;
    return out;
fallback:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"literal_key", literal_key, METH_O,
     "literal_key(raw) -> bytes | None: _B_LIT.sub(b'?', raw), or None when raw is not bytes or "
     "has comment/backtick markers outside literals or an unclosed quote."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lexkeymodule = {
    PyModuleDef_HEAD_INIT, "_lexkey", "C fast path of lex.cache_key", -1, methods,
};

PyMODINIT_FUNC
PyInit__lexkey(void)
{
    return PyModule_Create(&lexkeymodule);
}
