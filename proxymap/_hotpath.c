/*
 * proxymap._hotpath: the compiled form of the worker's hot path, optional.
 *
 * Two functions, each with exactly the behaviour of a pure-Python one that
 * stays the reference (and serves when this module was not built, or when
 * PROXYMAP_PURE_PYTHON is set: proxymap/accelerator.py chooses):
 *
 *   split_hot_lookup(data)   protocol.split_hot_lookup_python
 *   hot_reply(dispatcher, data)
 *                            Dispatcher.hot_reply of a read service, with
 *                            its _hot_hit and AnswerCache.peek
 *
 * configure() receives the facts these need (the request-flag mask, the
 * counter layout, the latency buckets) from the Python modules that own
 * them, so that no constant is spelled twice. Postfix's proxymap has no
 * such cache; what is mirrored here is only our own Python code.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>

static const char HEAD[] = "request\0lookup\0table\0";
#define HEAD_LEN (sizeof(HEAD) - 1)

/* set by configure() */
static PyObject *rqst_mask;         /* int: dictflags.RQST_MASK */
static PyObject *not_rqst_mask;     /* int: ~RQST_MASK */
static Py_ssize_t lookup_base;      /* metrics.REQUEST_BASE["lookup"] */
static PyObject *latency_bucket;    /* tuple: metrics.LATENCY_BUCKET */

/* interned attribute names */
static PyObject *s_hot, *s_woke_at, *s_answers, *s_watch, *s_gen, *s_watch_gen, *s_flags, *s_timed, *s_entries,
    *s_stats, *s_hits, *s_counters, *s_requests, *s_latency, *s_latency_ns;

/* The value token at q (up to the next NUL, which [q, end) holds): its
 * offset and length into p; the position after its NUL. */
static const char *
value_at(const char *p, const char *q, const char *end, Py_ssize_t *off, Py_ssize_t *len)
{
    const char *z = memchr(q, 0, end - q);
    *off = q - p;
    *len = z - q;
    return z + 1;
}

/* The three values of one complete 3.6-3.10 lookup list, as offsets into
 * data; 0 when data is anything else. */
static int
split(const char *p, Py_ssize_t n, Py_ssize_t off[3], Py_ssize_t len[3])
{
    const char *end = p + n, *q;
    /* ends in two NULs: every memchr below finds one */
    if (n < (Py_ssize_t)HEAD_LEN + 2 || memcmp(p, HEAD, HEAD_LEN) != 0
            || end[-1] != 0 || end[-2] != 0)
        return 0;
    q = value_at(p, p + HEAD_LEN, end, &off[0], &len[0]);        /* table */
    if (end - q < 6 || memcmp(q, "flags\0", 6) != 0)
        return 0;
    q = value_at(p, q + 6, end, &off[1], &len[1]);
    if (end - q < 4 || memcmp(q, "key\0", 4) != 0)
        return 0;
    q = value_at(p, q + 4, end, &off[2], &len[2]);
    /* the key's NUL is the one before the list's closing NUL */
    return q == end - 1;
}

/* split() of a bytes object: 1 (a lookup), 0 (anything else), -1 (not
 * bytes: TypeError, as the Python code's bytes methods raise) */
static int
split_bytes(PyObject *data, const char **p, Py_ssize_t off[3], Py_ssize_t len[3])
{
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "a bytes object is required, not '%.100s'",
                     Py_TYPE(data)->tp_name);
        return -1;
    }
    *p = PyBytes_AS_STRING(data);
    return split(*p, PyBytes_GET_SIZE(data), off, len);
}

static PyObject *
split_hot_lookup(PyObject *module, PyObject *data)
{
    Py_ssize_t off[3], len[3];
    const char *p;
    int found = split_bytes(data, &p, off, len);
    if (found < 0)
        return NULL;
    if (!found)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#y#y#)", p + off[0], len[0], p + off[1], len[1],
                         p + off[2], len[2]);
}

static PyObject *one;      /* the int 1 */

/* obj.name += amount (item: obj[name] += amount), Python's semantics */
static int
increment(PyObject *obj, PyObject *name, PyObject *amount, int item)
{
    PyObject *old = item ? PyObject_GetItem(obj, name) : PyObject_GetAttr(obj, name), *new;
    int rc;
    if (old == NULL)
        return -1;
    new = PyNumber_Add(old, amount);
    Py_DECREF(old);
    if (new == NULL)
        return -1;
    rc = item ? PyObject_SetItem(obj, name, new) : PyObject_SetAttr(obj, name, new);
    Py_DECREF(new);
    return rc;
}

/*
 * hot_reply(dispatcher, data): Dispatcher.hot_reply of a read service (its
 * hot map `_hot`, its `woke_at`): None with nothing changed, or the cached
 * reply, counted. An exception only where the Python code would raise.
 */
static PyObject *
hot_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *hot = NULL, *data, *woke_at = NULL;
    PyObject *spelling = NULL, *entry, *table, *req_flags, *answers = NULL, *watch = NULL;
    PyObject *gen = NULL, *watch_gen = NULL, *table_flags = NULL, *flags = NULL;
    PyObject *key = NULL, *ckey = NULL, *timed = NULL, *entries = NULL, *reply = NULL;
    PyObject *stats = NULL, *counters = NULL, *seq = NULL, *index = NULL, *elapsed = NULL;
    PyObject *result = NULL, *tmp, *tmp2;
    Py_ssize_t off[3], len[3];
    const char *p;
    struct timespec ts;
    int differ, truth, found;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hot_reply(dispatcher, data)");
        return NULL;
    }
    data = args[1];
    if (rqst_mask == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxymap._hotpath is not configured");
        return NULL;
    }
    if ((found = split_bytes(data, &p, off, len)) < 0)
        return NULL;
    if (!found)
        Py_RETURN_NONE;
    if ((hot = PyObject_GetAttr(args[0], s_hot)) == NULL)
        return NULL;
    if (!PyDict_Check(hot)) {
        PyErr_SetString(PyExc_TypeError, "the dispatcher's _hot must be a dict");
        Py_DECREF(hot);
        return NULL;
    }
    if (PyDict_GET_SIZE(hot) == 0) {
        Py_DECREF(hot);
        Py_RETURN_NONE;
    }
    spelling = Py_BuildValue("(y#y#)", p + off[0], len[0], p + off[1], len[1]);
    if (spelling == NULL)
        return NULL;
    entry = PyDict_GetItemWithError(hot, spelling);      /* borrowed */
    if (entry == NULL) {
        if (PyErr_Occurred())
            goto done;
        goto none;
    }
    /* table, req_flags = entry */
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
        PyErr_SetString(PyExc_ValueError, "hot map entries are (table, flags) pairs");
        goto done;
    }
    Py_INCREF(entry);
    Py_SETREF(spelling, entry);     /* keeps table and req_flags alive */
    table = PyTuple_GET_ITEM(entry, 0);
    req_flags = PyTuple_GET_ITEM(entry, 1);
    if ((answers = PyObject_GetAttr(table, s_answers)) == NULL
            || (watch = PyObject_GetAttr(table, s_watch)) == NULL)
        goto done;
    if (answers == Py_None)
        goto none;
    if ((gen = PyObject_GetAttr(watch, s_gen)) == NULL
            || (watch_gen = PyObject_GetAttr(table, s_watch_gen)) == NULL)
        goto done;
    if ((differ = PyObject_RichCompareBool(gen, watch_gen, Py_NE)) < 0)
        goto done;
    if (differ)
        goto none;
    /* flags = (table.flags & ~RQST_MASK) | (req_flags & RQST_MASK) */
    if ((table_flags = PyObject_GetAttr(table, s_flags)) == NULL)
        goto done;
    if ((tmp = PyNumber_And(table_flags, not_rqst_mask)) == NULL)
        goto done;
    if ((tmp2 = PyNumber_And(req_flags, rqst_mask)) == NULL) {
        Py_DECREF(tmp);
        goto done;
    }
    flags = PyNumber_Or(tmp, tmp2);
    Py_DECREF(tmp);
    Py_DECREF(tmp2);
    if (flags == NULL)
        goto done;
    /* AnswerCache.peek((flags, key)) */
    if ((timed = PyObject_GetAttr(answers, s_timed)) == NULL)
        goto done;
    if ((truth = PyObject_IsTrue(timed)) < 0)
        goto done;
    if (truth)
        goto none;
    if ((key = PyBytes_FromStringAndSize(p + off[2], len[2])) == NULL)
        goto done;
    if ((ckey = PyTuple_Pack(2, flags, key)) == NULL)
        goto done;
    if ((entries = PyObject_GetAttr(answers, s_entries)) == NULL)
        goto done;
    if (PyDict_CheckExact(entries)) {
        reply = PyDict_GetItemWithError(entries, ckey);
        if (reply == NULL && PyErr_Occurred())
            goto done;
        Py_XINCREF(reply);
    } else {
        reply = PyObject_CallMethod(entries, "get", "O", ckey);
        if (reply == NULL)
            goto done;
        if (reply == Py_None)
            Py_CLEAR(reply);
    }
    if (reply == NULL || reply == Py_None)
        goto none;
    if ((stats = PyObject_GetAttr(answers, s_stats)) == NULL
            || increment(stats, s_hits, one, 0) < 0)
        goto done;
    /* from here on, as _hot_hit after a hit */
    if (PyObject_SetAttr(table, s_flags, flags) < 0)
        goto done;
    if ((counters = PyObject_GetAttr(table, s_counters)) == NULL)
        goto done;
    if ((woke_at = PyObject_GetAttr(args[0], s_woke_at)) == NULL)
        goto done;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    {
        PyObject *now = PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        if (now == NULL)
            goto done;
        elapsed = PyNumber_Subtract(now, woke_at);
        Py_DECREF(now);
        if (elapsed == NULL)
            goto done;
    }
    /* counters.requests[LOOKUP_BASE + reply[7]] += 1 */
    if (!PyBytes_Check(reply) || PyBytes_GET_SIZE(reply) < 8) {
        PyErr_SetString(PyExc_IndexError, "index out of range");
        goto done;
    }
    if ((seq = PyObject_GetAttr(counters, s_requests)) == NULL)
        goto done;
    if ((index = PyLong_FromSsize_t(lookup_base
                                    + (unsigned char)PyBytes_AS_STRING(reply)[7])) == NULL)
        goto done;
    if (increment(seq, index, one, 1) < 0)
        goto done;
    Py_CLEAR(seq);
    Py_CLEAR(index);
    /* counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1 */
    {
        PyObject *bits;
        int64_t nbits;
        if (!PyLong_Check(elapsed)) {
            PyErr_SetString(PyExc_TypeError, "woke_at must be an int");
            goto done;
        }
        nbits = (int64_t)_PyLong_NumBits(elapsed);
        if (nbits < 0 && PyErr_Occurred())
            goto done;
        if ((bits = PyLong_FromLongLong(nbits)) == NULL)
            goto done;
        index = PyObject_GetItem(latency_bucket, bits);
        Py_DECREF(bits);
        if (index == NULL)
            goto done;
    }
    if ((seq = PyObject_GetAttr(counters, s_latency)) == NULL
            || increment(seq, index, one, 1) < 0)
        goto done;
    /* counters.latency_ns += elapsed */
    if (increment(counters, s_latency_ns, elapsed, 0) < 0)
        goto done;
    result = reply;
    reply = NULL;
    goto done;
none:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(hot);
    Py_XDECREF(woke_at);
    Py_XDECREF(spelling);
    Py_XDECREF(answers);
    Py_XDECREF(watch);
    Py_XDECREF(gen);
    Py_XDECREF(watch_gen);
    Py_XDECREF(table_flags);
    Py_XDECREF(flags);
    Py_XDECREF(timed);
    Py_XDECREF(key);
    Py_XDECREF(ckey);
    Py_XDECREF(entries);
    Py_XDECREF(reply);
    Py_XDECREF(stats);
    Py_XDECREF(counters);
    Py_XDECREF(seq);
    Py_XDECREF(index);
    Py_XDECREF(elapsed);
    return result;
}

static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t base;
    PyObject *inverted;
    if (nargs != 3 || !PyLong_Check(args[0]) || !PyLong_Check(args[1])
            || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(rqst_mask: int, lookup_base: int, latency_bucket: tuple)");
        return NULL;
    }
    base = PyLong_AsSsize_t(args[1]);
    if (base == -1 && PyErr_Occurred())
        return NULL;
    if ((inverted = PyNumber_Invert(args[0])) == NULL)
        return NULL;
    Py_XSETREF(not_rqst_mask, inverted);
    Py_INCREF(args[0]);
    Py_XSETREF(rqst_mask, args[0]);
    Py_INCREF(args[2]);
    Py_XSETREF(latency_bucket, args[2]);
    lookup_base = base;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split_hot_lookup", split_hot_lookup, METH_O,
     "(table, flags, key) of data that is exactly one 3.6-3.10 lookup list, else None."},
    {"hot_reply", (PyCFunction)(void (*)(void))hot_reply, METH_FASTCALL,
     "hot_reply(dispatcher, data): the hot path's reply to data, counted, or None."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(rqst_mask, lookup_base, latency_bucket): the facts hot_reply needs."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "proxymap._hotpath",
    "The compiled hot path of the worker (see proxymap/accelerator.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__hotpath(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_hot, "_hot");
    INTERN(s_woke_at, "woke_at");
    INTERN(s_answers, "answers");
    INTERN(s_watch, "watch");
    INTERN(s_gen, "gen");
    INTERN(s_watch_gen, "watch_gen");
    INTERN(s_flags, "flags");
    INTERN(s_timed, "_timed");
    INTERN(s_entries, "_entries");
    INTERN(s_stats, "stats");
    INTERN(s_hits, "hits");
    INTERN(s_counters, "counters");
    INTERN(s_requests, "requests");
    INTERN(s_latency, "latency");
    INTERN(s_latency_ns, "latency_ns");
#undef INTERN
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
