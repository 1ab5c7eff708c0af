/*
 * proxymap._hotpath: the compiled form of the worker's hot path, optional.
 *
 * Functions, each with exactly the behaviour of pure-Python code that
 * stays the reference (and serves when this module was not built, or when
 * PROXYMAP_PURE_PYTHON is set: proxymap/accelerator.py chooses):
 *
 *   split_hot_lookup(data)   protocol.split_hot_lookup_python
 *   hot_reply(dispatcher, data)
 *                            Dispatcher.hot_reply of a read service, with
 *                            its _hot_hit, AnswerCache.peek and the direct
 *                            read of a table file (dispatch._direct_read:
 *                            the shared flock(2), the Berkeley DB handle's
 *                            get, the NUL conventions, the reply encoding)
 *   read_pass(worker, ...)   server.Worker.run's loop over the ready
 *                            descriptors (recv of an idle connection's
 *                            bytes for the hot lane, Worker._read's)
 *   answer_pass(worker, ...) its loop over the connections read, after the
 *                            notification drain (Worker._answer_fresh:
 *                            hot_reply, the send and the bookkeeping)
 *
 * The two loop functions do the plain cases in C and call the Worker's own
 * methods (_read, _decode, _pump, _close) for everything else, in the
 * order the Python loop would.
 *
 * configure() and configure_reads() receive the facts these need (the
 * request-flag mask and flag bits, the counter layout, the latency buckets,
 * the statuses, the lock style, the process's OPEN_LOCK map) from the
 * Python modules that own them, so that no constant is spelled twice. Postfix's proxymap has no
 * such cache; what is mirrored here is only our own Python code.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <sys/file.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <structmember.h>

static const char HEAD[] = "request\0lookup\0table\0";
#define HEAD_LEN (sizeof(HEAD) - 1)

/* set by configure() */
static PyObject *rqst_mask;         /* int: dictflags.RQST_MASK */
static PyObject *not_rqst_mask;     /* int: ~RQST_MASK */
static Py_ssize_t lookup_base;      /* metrics.REQUEST_BASE["lookup"] */
static PyObject *latency_bucket;    /* tuple: metrics.LATENCY_BUCKET */

/* set by configure_reads() */
static unsigned long long fold_fix, try0null, try1null, lock_bit;
static char ok_digit, nokey_digit;      /* the statuses, one digit each */
static PyObject *flock_style;           /* str: filelock.FLOCK */
static PyObject *lifetime_locks;        /* dict: filelock.lifetime_locks() */

/* interned attribute names */
static PyObject *s_hot, *s_woke_at, *s_answers, *s_watch, *s_gen, *s_watch_gen, *s_flags, *s_timed, *s_entries,
    *s_stats, *s_hits, *s_counters, *s_requests, *s_latency, *s_latency_ns,
    *s_direct_get, *s_lock, *s_open_locked, *s_always, *s_file_id, *s_style, *s_fd,
    *s_put_missed, *s_wait_until, *s_waiting, *s_out, *s_decoder, *s_buf, *s_queue, *s_fresh,
    *s_close, *s_pump, *s_read, *s_decode, *s_open_reply, *s_answered_at, *s_replied, *s_since, *s_stopping,
    *s_events, *s_poll, *s_on_change;

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
    PyObject *old, *new;
    int rc;
    if (item && PyList_CheckExact(obj) && PyLong_CheckExact(name)) {
        /* a list's item at an index within it: the list's own slot */
        Py_ssize_t i = PyLong_AsSsize_t(name);
        if (i >= 0 && i < PyList_GET_SIZE(obj)) {
            if ((new = PyNumber_Add(PyList_GET_ITEM(obj, i), amount)) == NULL)
                return -1;
            old = PyList_GET_ITEM(obj, i);
            PyList_SET_ITEM(obj, i, new);
            Py_DECREF(old);
            return 0;
        }
        if (i == -1 && PyErr_Occurred())
            PyErr_Clear();      /* out of range: as PyObject_GetItem says it */
    }
    old = item ? PyObject_GetItem(obj, name) : PyObject_GetAttr(obj, name);
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

/* The truth of obj.name: 1, 0, -1 (an exception) */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    int truth;
    if (v == NULL)
        return -1;
    truth = PyObject_IsTrue(v);
    Py_DECREF(v);
    return truth;
}

/* TableLock.needed(flags) of `lock` (not None): 1, 0, -1 */
static int
lock_needed(PyObject *lock, unsigned long long flags)
{
    PyObject *file_id;
    int truth;
    if ((truth = attr_true(lock, s_open_locked)) != 0)
        return truth < 0 ? -1 : 0;
    if (!(flags & lock_bit)) {
        if ((truth = attr_true(lock, s_always)) <= 0)
            return truth;
    }
    if ((file_id = PyObject_GetAttr(lock, s_file_id)) == NULL)
        return -1;
    truth = PyDict_Contains(lifetime_locks, file_id);
    Py_DECREF(file_id);
    return truth < 0 ? -1 : !truth;
}

/* get(stored key of [key, key + len), with a NUL when nul): 1 with *value
 * (None or the value) set, 0 when get raised an Exception (cleared), -1 on
 * anything else */
static int
probe(PyObject *get, const char *key, Py_ssize_t len, int nul, PyObject **value)
{
    PyObject *stored = PyBytes_FromStringAndSize(NULL, len + nul);
    if (stored == NULL)
        return -1;
    memcpy(PyBytes_AS_STRING(stored), key, len);
    if (nul)
        PyBytes_AS_STRING(stored)[len] = 0;
    *value = PyObject_CallOneArg(get, stored);
    Py_DECREF(stored);
    if (*value != NULL)
        return 1;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Clear();
    return 0;
}

/*
 * dispatch._direct_read(table, flags, key): 1 with *flags_out (the flags
 * word the lookup left) and *reply_out (the encoded 3.6-3.10 reply) set;
 * 0 where the Python function gives None (nothing changed); -1 with an
 * exception where it would raise.
 */
static int
direct_read(PyObject *table, PyObject *flags_obj, PyObject *key_obj,
            PyObject **flags_out, PyObject **reply_out)
{
    PyObject *get = NULL, *lock = NULL, *value = NULL;
    unsigned long long flags;
    char small[256], *key = small;
    const char *raw;
    Py_ssize_t len, i, vlen;
    int locked = 0, fd = -1, rc = -1, got = 0;

    if ((get = PyObject_GetAttr(table, s_direct_get)) == NULL)
        return -1;
    if (get == Py_None) {
        rc = 0;
        goto out;
    }
    flags = PyLong_AsUnsignedLongLong(flags_obj);
    if (flags == (unsigned long long)-1 && PyErr_Occurred())
        goto out;
    raw = PyBytes_AS_STRING(key_obj);
    len = PyBytes_GET_SIZE(key_obj);
    if (len > (Py_ssize_t)sizeof(small) && (key = PyMem_Malloc(len)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(key, raw, len);
    if (flags & fold_fix)           /* fold_ascii: A-Z only */
        for (i = 0; i < len; i++)
            if (key[i] >= 'A' && key[i] <= 'Z')
                key[i] += 'a' - 'A';
    if ((lock = PyObject_GetAttr(table, s_lock)) == NULL)
        goto out;
    if (lock != Py_None && (locked = lock_needed(lock, flags)) < 0)
        goto out;
    if (locked) {
        PyObject *style, *fd_obj;
        int same;
        if ((style = PyObject_GetAttr(lock, s_style)) == NULL)
            goto out;
        same = PyObject_RichCompareBool(style, flock_style, Py_EQ);
        Py_DECREF(style);
        if (same < 0)
            goto out;
        if ((fd_obj = PyObject_GetAttr(lock, s_fd)) == NULL)
            goto out;
        fd = PyLong_AsLong(fd_obj);
        Py_DECREF(fd_obj);
        if (fd == -1 && PyErr_Occurred())
            goto out;
        if (!same || flock(fd, LOCK_SH | LOCK_NB) != 0) {
            rc = 0;
            goto out;
        }
    }
    /* the probes of NulKeyTable.lookup */
    got = 1;
    if (flags & try1null) {
        if ((got = probe(get, key, len, 1, &value)) == 1 && value != Py_None
                && flags & try0null)
            flags = (flags & ~(try0null | try1null)) | try1null;
    }
    if (got == 1 && (value == NULL || value == Py_None) && flags & try0null) {
        Py_CLEAR(value);
        if ((got = probe(get, key, len, 0, &value)) == 1 && value != Py_None
                && flags & try1null)
            flags = (flags & ~(try0null | try1null)) | try0null;
    }
    if (locked && flock(fd, LOCK_UN) != 0) {
        rc = got < 0 ? -1 : 0;
        goto out;
    }
    if (got <= 0) {
        rc = got;
        goto out;
    }
    {   /* encode_reply("lookup", OK or NOKEY, value=cut_value(value)) */
        const char *v = "", *nul;
        char *r;
        vlen = 0;
        if (value != NULL && value != Py_None) {
            if (!PyBytes_Check(value)) {
                PyErr_SetString(PyExc_TypeError,
                                "a table's direct_get must give bytes or None");
                goto out;
            }
            v = PyBytes_AS_STRING(value);
            vlen = PyBytes_GET_SIZE(value);
            if ((nul = memchr(v, 0, vlen)) != NULL)
                vlen = nul - v;
        }
        if ((*reply_out = PyBytes_FromStringAndSize(NULL, 17 + vlen)) == NULL)
            goto out;
        r = PyBytes_AS_STRING(*reply_out);
        memcpy(r, "status\0?\0value\0", 15);
        r[7] = value != NULL && value != Py_None ? ok_digit : nokey_digit;
        memcpy(r + 15, v, vlen);
        r[15 + vlen] = r[16 + vlen] = 0;
    }
    if ((*flags_out = PyLong_FromUnsignedLongLong(flags)) == NULL) {
        Py_CLEAR(*reply_out);
        goto out;
    }
    rc = 1;
out:
    if (key != small)
        PyMem_Free(key);
    Py_XDECREF(get);
    Py_XDECREF(lock);
    Py_XDECREF(value);
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
    int differ, truth, found, direct;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hot_reply(dispatcher, data)");
        return NULL;
    }
    data = args[1];
    if (rqst_mask == NULL || lifetime_locks == NULL) {
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
    if ((spelling = PyTuple_New(2)) == NULL)
        return NULL;
    for (found = 0; found < 2; found++) {
        if ((tmp = PyBytes_FromStringAndSize(p + off[found], len[found])) == NULL)
            goto done;
        PyTuple_SET_ITEM(spelling, found, tmp);
    }
    entry = PyDict_GetItemWithError(hot, spelling);      /* borrowed */
    if (entry == NULL) {
        if (PyErr_Occurred())
            goto done;
        goto none;
    }
    /* table, req_flags, direct = entry */
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) {
        PyErr_SetString(PyExc_ValueError, "hot map entries are (table, flags, direct) triples");
        goto done;
    }
    Py_INCREF(entry);
    Py_SETREF(spelling, entry);     /* keeps table, req_flags and direct alive */
    table = PyTuple_GET_ITEM(entry, 0);
    req_flags = PyTuple_GET_ITEM(entry, 1);
    if ((direct = PyObject_IsTrue(PyTuple_GET_ITEM(entry, 2))) < 0)
        goto done;
    if ((answers = PyObject_GetAttr(table, s_answers)) == NULL
            || (watch = PyObject_GetAttr(table, s_watch)) == NULL)
        goto done;
    if (answers == Py_None && !direct)
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
    if ((key = PyBytes_FromStringAndSize(p + off[2], len[2])) == NULL)
        goto done;
    if (answers != Py_None) {
        /* AnswerCache.peek((flags, key)) */
        if ((timed = PyObject_GetAttr(answers, s_timed)) == NULL)
            goto done;
        if ((truth = PyObject_IsTrue(timed)) < 0)
            goto done;
        if (truth)
            goto none;
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
        if (reply != NULL && ((stats = PyObject_GetAttr(answers, s_stats)) == NULL
                              || increment(stats, s_hits, one, 0) < 0))
            goto done;
    }
    if (reply == NULL) {
        /* _direct_read, kept in the cache as the whole path keys it */
        PyObject *left = NULL;
        int read;
        if (!direct)
            goto none;
        if ((read = direct_read(table, flags, key, &left, &reply)) < 0)
            goto done;
        if (read == 0)
            goto none;
        if (answers != Py_None) {
            PyObject *r = PyObject_CallMethodObjArgs(answers, s_put_missed, ckey, reply, NULL);
            if (r == NULL) {
                Py_DECREF(left);
                goto done;
            }
            Py_DECREF(r);
        }
        Py_SETREF(flags, left);
    }
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
        if (nbits >= 0 && nbits < PyTuple_GET_SIZE(latency_bucket)) {
            index = Py_NewRef(PyTuple_GET_ITEM(latency_bucket, nbits));
        } else {
            if ((bits = PyLong_FromLongLong(nbits)) == NULL)
                goto done;
            index = PyObject_GetItem(latency_bucket, bits);
            Py_DECREF(bits);
            if (index == NULL)
                goto done;
        }
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

static PyObject *
configure_reads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long bits[4];
    long status[2];
    int i;
    if (nargs != 8 || !PyUnicode_Check(args[6]) || !PyDict_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "configure_reads(fold_fix, try0null, try1null, lock,"
                        " ok, nokey, flock_style: str, lifetime_locks: dict)");
        return NULL;
    }
    for (i = 0; i < 4; i++) {
        bits[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (bits[i] == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    for (i = 0; i < 2; i++) {
        status[i] = PyLong_AsLong(args[4 + i]);
        if (status[i] == -1 && PyErr_Occurred())
            return NULL;
        if (status[i] < 0 || status[i] > 9) {
            PyErr_SetString(PyExc_ValueError, "a status is one digit");
            return NULL;
        }
    }
    fold_fix = bits[0];
    try0null = bits[1];
    try1null = bits[2];
    lock_bit = bits[3];
    ok_digit = (char)('0' + status[0]);
    nokey_digit = (char)('0' + status[1]);
    Py_INCREF(args[6]);
    Py_XSETREF(flock_style, args[6]);
    Py_INCREF(args[7]);
    Py_XSETREF(lifetime_locks, args[7]);
    Py_RETURN_NONE;
}

/*
 * The worker's read-answer-send step (server.Worker.run's pass), for the
 * compiled loop: read_pass is the pass's loop over the ready descriptors,
 * answer_pass the loop over the connections that read after the drain.
 * Each does exactly what the Python loop does: the plain case in C (recv of
 * an idle connection's bytes for the hot lane; hot_reply, send and
 * _answer_fresh's bookkeeping), everything else through the Worker's own
 * methods (_close, _pump, _read, _decode), called in the same order.
 */

static int
call1(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *r = PyObject_CallMethodOneArg(obj, name, arg);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
call2(PyObject *obj, PyObject *name, PyObject *a, PyObject *b)
{
    PyObject *args[3] = {obj, a, b};
    PyObject *r = PyObject_VectorcallMethod(name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* worker._close(conn, "<what>: <strerror(err)>") */
static int
close_for(PyObject *worker, PyObject *conn, const char *what, int err)
{
    PyObject *why = PyUnicode_FromFormat("%s: %s", what, strerror(err));
    int r;
    if (why == NULL)
        return -1;
    r = call2(worker, s_close, conn, why);
    Py_DECREF(why);
    return r;
}

static char read_buffer[65536];

/* The slots of server.Connection that the loop reads and writes, reached
 * by their offsets (as the interpreter's own slot access does) */
enum { C_WAIT_UNTIL, C_WAITING, C_OUT, C_DECODER, C_QUEUE, C_FRESH, C_FD, C_ANSWERED_AT,
       C_REPLIED, C_SINCE, C_EVENTS, C_SLOTS };
static PyTypeObject *slots_of;          /* the type the offsets are of */
static Py_ssize_t slot_offset[C_SLOTS];

static int
learn_slots(PyObject *type)
{
    PyObject *names[C_SLOTS] = {s_wait_until, s_waiting, s_out, s_decoder, s_queue, s_fresh,
                                s_fd, s_answered_at, s_replied, s_since, s_events};
    PyObject *descr;
    int i;
    if ((PyTypeObject *)type == slots_of)
        return 0;
    for (i = 0; i < C_SLOTS; i++) {
        if ((descr = PyObject_GetAttr(type, names[i])) == NULL)
            return -1;
        if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)
                || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_TypeError, "connection_type.%U must be a slot", names[i]);
            return -1;
        }
        slot_offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
    }
    Py_XSETREF(slots_of, (PyTypeObject *)Py_NewRef(type));
    return 0;
}

/* conn's slot (borrowed), or NULL with AttributeError when it is unset */
static PyObject *
slot_get(PyObject *conn, int slot)
{
    PyObject *v = *(PyObject **)((char *)conn + slot_offset[slot]);
    if (v == NULL)
        PyErr_SetString(PyExc_AttributeError, "a connection's slot is unset");
    return v;
}

static void
slot_set(PyObject *conn, int slot, PyObject *value)
{
    PyObject **p = (PyObject **)((char *)conn + slot_offset[slot]);
    Py_XSETREF(*p, Py_NewRef(value));
}

/* the truth of conn's slot: 1, 0, -1 */
static int
slot_true(PyObject *conn, int slot)
{
    PyObject *v = slot_get(conn, slot);
    return v == NULL ? -1 : PyObject_IsTrue(v);
}

/* Worker._read of a connection the hot lane may serve (spellings: the
 * dispatcher's hot map, or None when the lane is off) */
static int
read_one(PyObject *worker, PyObject *conn, int fd, PyObject *readers, PyObject *spellings,
         Py_ssize_t hot_max, Py_ssize_t chunk)
{
    PyObject *decoder, *data;
    Py_ssize_t n;
    int t;

    if (spellings == Py_None || !PyDict_Check(spellings) || PyDict_GET_SIZE(spellings) == 0
            || chunk > (Py_ssize_t)sizeof read_buffer)
        return call1(worker, s_read, conn);
    if ((decoder = slot_get(conn, C_DECODER)) == NULL)
        return -1;
    if ((t = attr_true(decoder, s_buf)) < 0)
        return -1;
    if (t == 0 && (t = slot_true(conn, C_QUEUE)) < 0)
        return -1;
    if (t)
        return call1(worker, s_read, conn);
    for (;;) {
        n = recv(fd, read_buffer, (size_t)chunk, 0);
        if (n >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return close_for(worker, conn, "read", errno);
    }
    if ((data = PyBytes_FromStringAndSize(read_buffer, n)) == NULL)
        return -1;
    if (n == 0 || n > hot_max) {       /* the end, or more than the lane takes */
        t = call2(worker, s_read, conn, data);
        Py_DECREF(data);
        return t;
    }
    slot_set(conn, C_FRESH, data);
    Py_DECREF(data);
    return PyList_Append(readers, conn);
}

/*
 * read_pass(worker, ready, handlers, conns, readers, connection_type,
 *           spellings, hot_max, read_chunk): Worker.run's loop over the
 * ready (fd, events) list; returns the other handlers' [(fd, handler)] in
 * order, or None.
 */
static PyObject *
read_pass(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *worker, *ready, *handlers, *conns, *readers, *conn_type, *spellings;
    PyObject *others = NULL, *item, *handler, *v;
    Py_ssize_t hot_max, chunk, i;
    long fd, events;
    int t;

    if (nargs != 9 || !PyList_Check(args[1]) || !PyDict_Check(args[2]) || !PyDict_Check(args[3])
            || !PyList_Check(args[4]) || !PyType_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "read_pass(worker, ready: list, handlers: dict,"
                        " conns: dict, readers: list, connection_type, spellings, hot_max,"
                        " read_chunk)");
        return NULL;
    }
    worker = args[0]; ready = args[1]; handlers = args[2]; conns = args[3];
    readers = args[4]; conn_type = args[5]; spellings = args[6];
    if ((hot_max = PyLong_AsSsize_t(args[7])) == -1 && PyErr_Occurred())
        return NULL;
    if ((chunk = PyLong_AsSsize_t(args[8])) == -1 && PyErr_Occurred())
        return NULL;
    if (learn_slots(conn_type) < 0)
        return NULL;
    for (i = 0; i < PyList_GET_SIZE(ready); i++) {
        item = PyList_GET_ITEM(ready, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "ready holds (fd, events) pairs");
            goto fail;
        }
        if ((fd = PyLong_AsLong(PyTuple_GET_ITEM(item, 0))) == -1 && PyErr_Occurred())
            goto fail;
        if ((events = PyLong_AsLong(PyTuple_GET_ITEM(item, 1))) == -1 && PyErr_Occurred())
            goto fail;
        handler = PyDict_GetItemWithError(handlers, PyTuple_GET_ITEM(item, 0));
        if (handler == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        Py_INCREF(handler);
        if (Py_TYPE(handler) != (PyTypeObject *)conn_type) {
            if (others == NULL && (others = PyList_New(0)) == NULL)
                goto fail_handler;
            v = PyTuple_Pack(2, PyTuple_GET_ITEM(item, 0), handler);
            if (v == NULL || PyList_Append(others, v) < 0) {
                Py_XDECREF(v);
                goto fail_handler;
            }
            Py_DECREF(v);
            Py_DECREF(handler);
            continue;
        }
        /* a request waiting for a lock or an offloaded reply: a hang-up only */
        if ((v = slot_get(handler, C_WAIT_UNTIL)) == NULL)
            goto fail_handler;
        t = v != Py_None;
        if (!t) {
            if ((t = slot_true(handler, C_WAITING)) < 0)
                goto fail_handler;
            if (t && (t = slot_true(handler, C_OUT)) >= 0)
                t = !t;
            if (t < 0)
                goto fail_handler;
        }
        if (t) {
            if (events & (EPOLLERR | EPOLLHUP) && call1(worker, s_close, handler) < 0)
                goto fail_handler;
            Py_DECREF(handler);
            continue;
        }
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            if ((t = slot_true(handler, C_OUT)) < 0)
                goto fail_handler;
            if (t && call1(worker, s_pump, handler) < 0)
                goto fail_handler;
        }
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
            if ((t = slot_true(handler, C_OUT)) < 0)
                goto fail_handler;
            if (!t) {
                if ((t = PyDict_Contains(conns, PyTuple_GET_ITEM(item, 0))) < 0)
                    goto fail_handler;
                if (t && read_one(worker, handler, (int)fd, readers, spellings, hot_max,
                                  chunk) < 0)
                    goto fail_handler;
            }
        }
        Py_DECREF(handler);
    }
    if (others == NULL)
        Py_RETURN_NONE;
    return others;
fail_handler:
    Py_DECREF(handler);
fail:
    Py_XDECREF(others);
    return NULL;
}

/* the monotonic clock as time.monotonic() reads it */
static PyObject *
monotonic_now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyFloat_FromDouble((double)ts.tv_sec + ts.tv_nsec * 1e-9);
}

/* Worker._answer_fresh of conn, whose fresh bytes were taken: data */
static int
answer_one(PyObject *worker, PyObject *dispatcher, PyObject *conn, int fd, PyObject *data)
{
    PyObject *hargs[2] = {dispatcher, data};
    PyObject *reply, *v, *w, *now = NULL, *out;
    Py_ssize_t n, sent;
    const char *bytes;
    int t, rc = -1;

    if ((reply = hot_reply(NULL, hargs, 2)) == NULL)
        return -1;
    if (reply == Py_None) {          /* a client's first request: often an open */
        Py_DECREF(reply);
        if ((reply = PyObject_CallMethodOneArg(dispatcher, s_open_reply, data)) == NULL)
            return -1;
    }
    if (reply == Py_None) {          /* decoded and answered by _pump */
        PyObject *dargs[3] = {worker, conn, data};
        Py_DECREF(reply);
        v = PyObject_VectorcallMethod(s_decode, dargs, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (v == NULL)
            return -1;
        t = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (t <= 0)
            return t;
        return call1(worker, s_pump, conn);
    }
    if ((v = PyObject_GetAttr(worker, s_requests)) == NULL)
        goto done;
    w = PyNumber_Add(v, one);
    Py_DECREF(v);
    if (w == NULL)
        goto done;
    t = PyObject_SetAttr(worker, s_requests, w);
    Py_DECREF(w);
    if (t < 0)
        goto done;
    bytes = PyBytes_AS_STRING(reply);
    n = PyBytes_GET_SIZE(reply);
    for (;;) {
        sent = send(fd, bytes, (size_t)n, 0);
        if (sent >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            goto done;
    }
    if (sent < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            sent = 0;
        else {
            if (errno == EPIPE || errno == ECONNRESET)
                rc = call2(worker, s_close, conn, Py_None);
            else
                rc = close_for(worker, conn, "write", errno);
            goto done;
        }
    }
    if ((now = monotonic_now()) == NULL)
        goto done;
    slot_set(conn, C_ANSWERED_AT, now);
    if (sent == n) {
        slot_set(conn, C_REPLIED, now);
        slot_set(conn, C_SINCE, Py_None);
        if ((t = attr_true(worker, s_stopping)) < 0)
            goto done;
        if (t) {
            rc = call1(worker, s_close, conn);
            goto done;
        }
    } else {
        /* the rest when the client reads: back-pressure as in _pump */
        if ((out = slot_get(conn, C_OUT)) == NULL)
            goto done;
        v = PyBytes_FromStringAndSize(bytes + sent, n - sent);
        w = v == NULL ? NULL : PyNumber_InPlaceAdd(out, v);
        Py_XDECREF(v);
        if (w == NULL)
            goto done;
        slot_set(conn, C_OUT, w);
        Py_DECREF(w);
        if ((v = PyObject_GetAttr(worker, s_poll)) == NULL)
            goto done;
        w = PyObject_CallMethod(v, "modify", "ii", fd, (int)EPOLLOUT);
        Py_DECREF(v);
        if (w == NULL)
            goto done;
        Py_DECREF(w);
        if ((v = PyLong_FromLong(EPOLLOUT)) == NULL)
            goto done;
        slot_set(conn, C_EVENTS, v);
        Py_DECREF(v);
        slot_set(conn, C_SINCE, now);
    }
    if ((v = PyObject_GetAttr(worker, s_on_change)) == NULL)
        goto done;
    if (v != Py_None) {
        w = PyObject_CallOneArg(v, worker);
        Py_DECREF(v);
        if (w == NULL)
            goto done;
        Py_DECREF(w);
    } else
        Py_DECREF(v);
    rc = 0;
done:
    Py_XDECREF(now);
    Py_DECREF(reply);
    return rc;
}

/*
 * answer_pass(worker, readers, conns, dispatcher): Worker.run's loop over
 * the connections that read in this pass, after the drain: each one still
 * served has its fresh bytes answered (_answer_fresh) or its queue pumped.
 */
static PyObject *
answer_pass(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *worker, *readers, *conns, *dispatcher, *conn, *fdobj, *cur, *data;
    Py_ssize_t i;
    long fd;
    int t;

    if (nargs != 5 || !PyList_Check(args[1]) || !PyDict_Check(args[2])
            || !PyType_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "answer_pass(worker, readers: list, conns: dict,"
                        " dispatcher, connection_type)");
        return NULL;
    }
    if (learn_slots(args[4]) < 0)
        return NULL;
    if (rqst_mask == NULL || lifetime_locks == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxymap._hotpath is not configured");
        return NULL;
    }
    worker = args[0]; readers = args[1]; conns = args[2]; dispatcher = args[3];
    for (i = 0; i < PyList_GET_SIZE(readers); i++) {
        conn = PyList_GET_ITEM(readers, i);
        Py_INCREF(conn);
        if (Py_TYPE(conn) != slots_of) {
            PyErr_SetString(PyExc_TypeError, "readers holds connections");
            goto fail;
        }
        if ((fdobj = slot_get(conn, C_FD)) == NULL)
            goto fail;
        cur = PyDict_GetItemWithError(conns, fdobj);
        fd = cur == conn ? PyLong_AsLong(fdobj) : 0;
        if (cur != conn) {
            if (PyErr_Occurred())
                goto fail;
            Py_DECREF(conn);
            continue;
        }
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        if ((data = slot_get(conn, C_FRESH)) == NULL)
            goto fail;
        if (data == Py_None)
            t = call1(worker, s_pump, conn);
        else if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "a connection's fresh bytes must be bytes");
            goto fail;
        } else {
            Py_INCREF(data);
            slot_set(conn, C_FRESH, Py_None);
            t = answer_one(worker, dispatcher, conn, (int)fd, data);
            Py_DECREF(data);
        }
        if (t < 0)
            goto fail;
        Py_DECREF(conn);
    }
    Py_RETURN_NONE;
fail:
    Py_DECREF(conn);
    return NULL;
}

static PyMethodDef methods[] = {
    {"split_hot_lookup", split_hot_lookup, METH_O,
     "(table, flags, key) of data that is exactly one 3.6-3.10 lookup list, else None."},
    {"hot_reply", (PyCFunction)(void (*)(void))hot_reply, METH_FASTCALL,
     "hot_reply(dispatcher, data): the hot path's reply to data, counted, or None."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(rqst_mask, lookup_base, latency_bucket): the facts hot_reply needs."},
    {"configure_reads", (PyCFunction)(void (*)(void))configure_reads, METH_FASTCALL,
     "configure_reads(fold_fix, try0null, try1null, lock, ok, nokey, flock_style,"
     " lifetime_locks): the facts hot_reply's direct reads need."},
    {"read_pass", (PyCFunction)(void (*)(void))read_pass, METH_FASTCALL,
     "read_pass(worker, ready, handlers, conns, readers, connection_type, spellings, hot_max,"
     " read_chunk): Worker.run's loop over the ready descriptors; the others, or None."},
    {"answer_pass", (PyCFunction)(void (*)(void))answer_pass, METH_FASTCALL,
     "answer_pass(worker, readers, conns, dispatcher, connection_type): Worker.run's answers"
     " after the drain."},
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
    INTERN(s_direct_get, "direct_get");
    INTERN(s_lock, "lock");
    INTERN(s_open_locked, "open_locked");
    INTERN(s_always, "always");
    INTERN(s_file_id, "file_id");
    INTERN(s_style, "style");
    INTERN(s_fd, "fd");
    INTERN(s_put_missed, "put_missed");
    INTERN(s_wait_until, "wait_until");
    INTERN(s_waiting, "waiting");
    INTERN(s_out, "out");
    INTERN(s_decoder, "decoder");
    INTERN(s_buf, "buf");
    INTERN(s_queue, "queue");
    INTERN(s_fresh, "fresh");
    INTERN(s_close, "_close");
    INTERN(s_pump, "_pump");
    INTERN(s_read, "_read");
    INTERN(s_decode, "_decode");
    INTERN(s_open_reply, "open_reply");
    INTERN(s_answered_at, "answered_at");
    INTERN(s_replied, "replied");
    INTERN(s_since, "since");
    INTERN(s_stopping, "stopping");
    INTERN(s_events, "events");
    INTERN(s_poll, "_poll");
    INTERN(s_on_change, "on_change");
#undef INTERN
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
