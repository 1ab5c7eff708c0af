"""Answering proxymap requests: access control, shared tables, statuses.

This is the request logic of Postfix's proxymap(8) without any I/O: one
`Dispatcher` per worker process keeps every table it opened in a registry
keyed by name and instance flags, shared by all clients and never closed by
a client. It checks the service's allow-list (proxy_read_maps or
proxy_write_maps), refuses writes on the read service, turns open failures
into a surrogate that answers RETRY (and is retried later instead of being
remembered forever), reopens a table whose file changed on disk, and
answers sanely where Postfix 3.7 aborts (unsupported operations -> CONFIG).

Requests in the 3.11 layout get 3.11's answers: the instance is chosen by
`instance_flags`, the request's `flags` word is used as given, every reply
carries the flags word the operation left (0 when no table was found), an
`open` reports the flags of a freshly opened instance whatever earlier
requests did to it, and cdb tables can be listed. Requests in the 3.6-3.10
layout keep 3.7's answers. Sequence walks are kept per connection (the
`walks` mapping the server passes), so that reopening a table, for
freshness or after a write, never restarts or disturbs a walk in progress.

Freshness costs no system call per request where it can: the dispatcher
watches each table file with inotify (proxymap/filewatch.py; the worker
drains the notifications before answering each batch of requests), and a
table without a watch (network filesystem) is stat()ed per request as
Postfix does. Lookups of cacheable tables are answered from a bounded cache
of recent replies (proxymap/answercache.py) while the table has had no
change notification and no write of our own; a miss reads the table, with
Postfix's locks, as before. A 3.6-3.10 lookup spelled like one answered
before takes the hot path (`hot_reply`): the cached answer, or for tables
that read directly (Berkeley DB files) the file read at once under the same
shared lock (`_direct_read`), without decoding, allow-list and registry
steps, which cannot answer otherwise for the same spelling.
Remote tables (those served off the loop) keep answers for a TTL from
main.cf or from their own parameter file (`_answer_cache`), counting hits
and misses per table; `note_pools` puts their lanes' and connection
pools' figures in the counters for `status`.

The write service commits in groups when its worker asks for it
(`begin_batch`/`end_batch` around each loop pass): the updates and
deletes of one table that are ready in a pass are applied under one
exclusive lock and made durable with one sync, and their replies
(`GroupedReply`, an offload.DeferredReply like an offloaded one's) are
known only after that sync: OK/NOKEY when it succeeded, RETRY for every
change of the group when anything failed. Any other operation on the table
closes its group first.

Operations of tables that may block (database clients, plugins) are handed
to the worker's Offloader and answered later (see proxymap/offload.py).

Every answered request is counted in `metrics` (proxymap/metrics.py) under
its table, type and status, with its latency: from `woke_at`
(time.monotonic_ns() when the worker woke up to read it, set by the
worker's loop) to the reply; one clock read per request, plain integer
increments. Offloaded and grouped requests are counted when their reply
is delivered (`count_delivered`).
"""

from __future__ import annotations

import time
from functools import partial
from time import monotonic_ns

from proxymap import dictflags as F
from proxymap.answercache import AnswerCache, CacheStats
from proxymap.conventions import maillog
from proxymap.metrics import (LATENCY_BUCKET, NO_TABLE, REPLY_STATUS_OFFSET, REQUEST_BASE,
                              WorkerMetrics, pool_figures, reply_status)
from proxymap.offload import DeferredReply
from proxymap.protocol import (BAD, CONFIG, DENY, NOKEY, OK, RETRY, SEQ_FIRST, SEQ_NEXT,
                               HOTPATH, BadRequest, Request, encode_reply, parse_request,
                               split_hot_lookup, split_hot_open)
from proxymap.tables import Table, TableError, TableOpenError, filelock, nulkeys, open_table, \
    strip_proxy
from proxymap.tables.base import END, START, Unsupported, file_stamp, stamp_is_settled
from proxymap.tables.filelock import LockBusy
from proxymap.utf8 import is_utf8, utf8_key

LOOKUP_BASE = REQUEST_BASE["lookup"]
OPEN_BASE = REQUEST_BASE["open"]


def configure_hotpath(module) -> None:
    """Give the compiled hot path (proxymap/_hotpath.c) the facts its
    hot_reply needs (its direct reads: _direct_read's), from the modules
    that own them."""
    module.configure(F.RQST_MASK, LOOKUP_BASE, LATENCY_BUCKET)
    module.configure_reads(F.FOLD_FIX, F.TRY0NULL, F.TRY1NULL, F.LOCK, OK, NOKEY,
                           filelock.FLOCK, filelock.lifetime_locks())


if HOTPATH is not None:
    configure_hotpath(HOTPATH)


def _direct_read(table: Table, flags: int, key: bytes) -> tuple[int, bytes] | None:
    """What NulKeyTable.lookup of `key` under `flags` makes of a table that
    reads directly (Table.direct_reads), through its `direct_get`, with the
    shared flock(2) around the read when the flags call for a lock: (the
    flags word after the lookup, the encoded 3.6-3.10 reply, OK or NOKEY).
    None, with nothing changed, wherever the whole path has more to do: no
    handle, a lock busy or not flock-style, a failed read or unlock (the
    whole path then answers with its own locking, waiting, errors)."""
    get = table.direct_get
    if get is None:
        return None
    if flags & F.FOLD_FIX:
        key = F.fold_ascii(key)
    lock = table.lock
    locked = lock is not None and lock.needed(flags)
    if locked:
        if lock.style != filelock.FLOCK or not filelock.try_flock_shared(lock.fd):
            return None
    try:
        value = None
        if flags & F.TRY1NULL:
            value = get(key + b"\0")
            if value is not None and flags & F.TRY0NULL:
                flags = nulkeys.narrow(flags, F.TRY1NULL)
        if value is None and flags & F.TRY0NULL:
            value = get(key)
            if value is not None and flags & F.TRY1NULL:
                flags = nulkeys.narrow(flags, F.TRY0NULL)
    except Exception:
        value = False
    finally:
        unlocked = not locked or filelock.try_unlock(lock.fd)
    if not unlocked or value is False:
        return None
    if value is None:
        return flags, encode_reply("lookup", NOKEY)
    return flags, encode_reply("lookup", OK, value=nulkeys.cut_value(value))


#: (table, flags) spellings kept for the hot path before it starts afresh
HOT_SPELLINGS = 256

#: seconds before a table that failed to open is tried again
OPEN_RETRY_INTERVAL = 1.0

READ_SERVICE, WRITE_SERVICE = "proxymap", "proxywrite"

#: bits the server adds to the flags of a write, as Postfix does
WRITE_FLAGS = {"update": F.SYNC_UPDATE | F.DUP_REPLACE, "delete": F.SYNC_UPDATE}

#: the instance bits that tell shared instances apart. Postfix keys on all
#: of INST_MASK, but real clients only ever send 0 or OPEN_LOCK there; the
#: other bits (unused ones included) would let one client make us open a
#: listed table once per value, until we run out of descriptors.
INSTANCE_KEY_BITS = F.TRY0NULL | F.TRY1NULL | F.OPEN_LOCK
#: 3.11 clients send their complete open-time flags as `instance_flags`
#: (3.11 shares an instance only between identical words) and the table is
#: opened with them: these further bits change what such an open gives (the
#: server's UTF-8 layer, folding of keys loaded from a source file).
INSTANCE_KEY_BITS_311 = INSTANCE_KEY_BITS | F.UTF8_REQUEST | F.FOLD_FIX | F.FOLD_MUL


def fresh_flags(table: Table, instance_flags: int) -> int:
    """The flags word of an instance freshly opened with `instance_flags`,
    as Postfix 3.11 reports it on `open`: the bits the table's own open
    changed (implementation bits, NUL conventions, UTF8_ACTIVE) as they came
    out of the open of the shared instance, every other bit as requested."""
    changed = table.open_flags ^ table.fresh_flags
    return (instance_flags & ~changed) | (table.fresh_flags & changed)


class SurrogateTable(Table):
    """Stands in for a table that could not be opened: every operation
    answers RETRY with the reason, as Postfix's surrogate dictionary does."""

    impl_flags = F.PATTERN

    def __init__(self, spec: str, flags: int, reason: str):
        type_name, _, name = spec.partition(":")
        super().__init__(type_name, name, flags, False, {})
        self.reason = reason
        self.failed_at = time.monotonic()

    def _fail(self, *args):
        raise TableError(f"{self.spec} is unavailable. {self.reason}")

    lookup = update = delete = _fail

    def walk(self, position):
        self._fail()


class GroupedReply(DeferredReply):
    """The reply of a change in a commit group: `reply` is set once the
    group's sync is done, to `done` when it made the change durable and to
    `failed` when the group failed."""

    __slots__ = ("done", "failed")

    def __init__(self, done: bytes, failed: bytes):
        DeferredReply.__init__(self)
        self.done = done
        self.failed = failed


class HotWrite:
    """What the write lane (Dispatcher._hot_write) knows of one spelling of
    a 3.6-3.10 update or delete: the instance, the flags bits the request
    adds to the instance's word (its RQST_MASK bits and WRITE_FLAGS),
    whether the UTF-8 layer checks keys, and the replies, made once."""

    __slots__ = ("table", "name", "add_flags", "utf8", "done", "not_found", "base")

    def __init__(self, table: Table, req: Request, utf8: bool):
        self.table = table
        self.name = req.name
        self.add_flags = (req.flags & F.RQST_MASK) | WRITE_FLAGS[req.name]
        self.utf8 = utf8
        self.done = encode_reply(req.name, OK)
        self.not_found = encode_reply(req.name, NOKEY)
        self.base = REQUEST_BASE[req.name]


class Dispatcher:
    """Turns decoded requests into encoded replies for one service role."""

    def __init__(self, service: str, allowed: set[str], params, *, smtputf8: bool = True,
                 opener=open_table, offload=None, watcher=None, cache_entries: int = 0,
                 cache_bytes: int = 0, cache_exclude=frozenset(), remote_ttl: float = 0,
                 remote_negative_ttl: float = 0):
        self.service = service
        self.writable = service == WRITE_SERVICE
        self.allowed = allowed
        self.params = params
        self.smtputf8 = smtputf8
        self.opener = opener
        #: runs blocking tables' operations off the loop; None: inline
        self.offload = offload
        self.tables: dict[tuple[str, int], Table] = {}
        self.param_name = "proxy_write_maps" if self.writable else "proxy_read_maps"
        #: walk positions of callers that keep none of their own
        self.walks: dict = {}
        #: inotify watches of table files (filewatch.FileWatcher); None: stat
        self.watcher = watcher
        #: answer caches: per-instance bounds, tables without one, counters
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.cache_exclude = frozenset(cache_exclude)
        self.cache_stats = CacheStats()
        #: remote tables' answers are kept this long (0: not at all)
        self.remote_ttl = remote_ttl
        self.remote_negative_ttl = remote_negative_ttl
        self._answered = False
        # The hot path: (table bytes, flags bytes) of a 3.6-3.10 lookup ->
        # (instance, flags) once a lookup so spelled went through the whole
        # path and into the instance's answer cache. A later lookup spelled
        # the same is answered from that cache without decoding, allow-list
        # and registry steps (which cannot answer differently: same table,
        # same flags, and a key that the full path answered before).
        # An instance that reads directly (Table.direct_reads) is led to
        # from its first lookup on, cache or not: the hot path then reads
        # its file itself (_direct_read), exactly as the whole path would.
        self._hot: dict[tuple[bytes, bytes], tuple[Table, int, bool]] = {}
        #: whether hot_reply can answer anything now (the worker asks it
        #: only then)
        self.hot_spellings = self._hot
        if HOTPATH is not None and not self.writable:
            # the compiled hot_reply, called without a Python frame
            self.hot_reply = partial(HOTPATH.hot_reply, self)
        self._hot_key: tuple[bytes, ...] | None = None
        # Prepared open replies (open_reply): (table bytes, flags bytes) of a
        # 3.6-3.10 open that the whole path answered from a watched
        # instance -> [instance, its flags word, the reply for that word].
        # Every short-lived client (a one-shot postmap -q, an smtpd that
        # exits) opens its table first; the answer is the instance's flags
        # word, the same bytes for each of them while the instance stands.
        self._opens: dict[tuple[bytes, bytes], list] = {}
        self._open_key: tuple[bytes, bytes] | None = None
        self._hot_table: Table | None = None
        # The write lane (the write service's hot path): the attribute names
        # and the request, table and flags bytes of a 3.6-3.10 update or
        # delete -> a HotWrite, once a
        # change so spelled went through the whole path. A later change
        # spelled the same goes straight to the instance's update/delete,
        # without parse_request, allow-list and registry steps (which
        # cannot answer differently for the same spelling). Emptied
        # whenever an instance is closed (_close).
        self._hot_writes: dict[tuple[bytes, ...], HotWrite] = {}
        # commit groups of this loop pass (None: no batch, every change is
        # synced on its own): table -> its GroupedReply list; and replies
        # whose group has ended, for the worker to deliver
        self._groups: dict | None = None
        self._ended: list[GroupedReply] = []
        #: groups closed and changes they carried, in total
        self.groups_committed = 0
        self.grouped_changes = 0

        # the worker clears this for a connection that already had its
        # share of bad-request warnings (it counts and sums up the rest)
        self.log_bad = True
        self._client: object = None
        # proxywrite instances opened with OPEN_LOCK -> the clients that used
        # them: the lock is given back when the last of them has gone
        self.lock_users: dict[tuple[str, int], set] = {}
        #: request counters by table (see the module text)
        self.metrics = WorkerMetrics()
        #: time.monotonic_ns() when the worker woke up to read the requests
        #: it answers
        self.woke_at = monotonic_ns()
        # the counters of the request in progress: its table's (each table
        # instance has its `counters`), else those of NO_TABLE
        self._no_table = self.metrics.table(NO_TABLE)
        self._counters = self._no_table

    # -- the request entry point ------------------------------------------------

    def begin_batch(self) -> None:
        """From now until end_batch(), changes of the write service are
        grouped per table (no effect on the read service)."""
        if self.writable and self._groups is None:
            self._groups = {}

    def end_batch(self) -> list[GroupedReply]:
        """Close every open group (one sync each); the replies now known.
        Grouping stays on until the next begin_batch."""
        groups = self._groups
        if groups:
            for table in list(groups):
                self._end_group(table)
        self._groups = None
        ended, self._ended = self._ended, []
        return ended

    def _end_group(self, table: Table) -> None:
        replies = self._groups.pop(table)
        durable = table.group_end()
        self.groups_committed += 1
        self.grouped_changes += len(replies)
        for reply in replies:
            reply.reply = reply.done if durable else reply.failed
        self._ended.extend(replies)

    def _grouped_change(self, table: Table, req: Request, walks: dict, flags: int):
        """An update or delete inside the table's commit group (opened now
        if need be): a GroupedReply, or the encoded reply of a change that
        failed at once."""
        groups = self._groups
        saved = table.flags
        table.flags = flags         # what the lock decision looks at
        try:
            if table in groups and not table.group_accepts():
                self._end_group(table)
            if table not in groups:
                table.group_begin()     # LockBusy: the request waits
                groups[table] = []
        except TableError as exc:
            if isinstance(exc, LockBusy):
                raise
            maillog.warning(exc.reason)
            return encode_reply(req.name, exc.status, req.layout, flags=table.flags)
        finally:
            table.flags = saved
        self._answered = False
        reply = self._run(table, req, walks, flags)
        if table.group_failed:      # this change failed, and with it the group
            self._end_group(table)
            return reply
        if not self._answered:
            return reply            # refused before touching the file
        grouped = GroupedReply(reply, encode_reply(req.name, RETRY, req.layout,
                                                   flags=table.flags))
        grouped.counted = (self._counters, REQUEST_BASE[req.name], self.woke_at)
        self._counters = None
        groups[table].append(grouped)
        return grouped

    def refresh(self) -> None:
        """Count the change notifications queued so far. The worker calls
        this after reading a batch of requests and before answering them; a
        caller without a loop of its own may call it before each request."""
        if self.watcher is not None:
            self.watcher.drain()

    def handle(self, attrs: list[tuple[bytes, bytes]], walks: dict | None = None,
               may_wait: bool = False, client: object = None):
        """One decoded attribute list in, one encoded reply out, or an
        offload.Pending whose reply comes later. Never raises. `walks` holds
        the sequence positions of the client's connection.

        With `may_wait`, a table lock that another process holds gives None
        instead (ask again later); without, RETRY. `client` names the
        connection, for instances that hold a lock while someone uses them."""
        self._hot_key = None
        if self.writable:
            if 4 <= len(attrs) <= 5:
                reply = self._hot_write(attrs)
                if reply is not None:
                    return reply
        elif len(attrs) == 4:
            (n0, v0), (n1, v1), (n2, v2), (n3, v3) = attrs
            if v0 == b"lookup" and n0 == b"request" and n1 == b"table" and n2 == b"flags" \
                    and n3 == b"key":
                spelling = (v1, v2)
                if spelling in self._hot:
                    reply = self._hot_hit(v1, v2, v3)
                    if reply is not None:
                        return reply
                self._hot_key = spelling
        self._open_key = None
        if len(attrs) == 3 and not self.writable:
            (n0, v0), (n1, v1), (n2, v2) = attrs
            if v0 == b"open" and n0 == b"request" and n1 == b"table" and n2 == b"flags":
                self._open_key = (v1, v2)
        try:
            req = parse_request(attrs)
        except BadRequest as exc:
            if self.log_bad:
                maillog.warning(f"{self.service}: bad request: {exc.reason}")
            reply = encode_reply(exc.name, BAD, exc.layout)
            self._count(self._no_table, REQUEST_BASE.get(exc.name, REQUEST_BASE["unknown"]),
                        reply, self.woke_at)
            return reply
        self._client = client
        self._counters = self._no_table
        try:
            reply = self._answer(req, self.walks if walks is None else walks)
        except LockBusy as exc:
            if may_wait:
                return None     # asked again later: counted then
            maillog.warning(exc.reason)
            self._count_under_table(req)
            reply = encode_reply(req.name, RETRY, req.layout)
        except Exception as exc:  # a bug must not cost the client its answer
            reply = self._unexpected(req.name, req.table, exc, self._count_under_table(req),
                                     req.layout)
        counters = self._counters
        if counters is not None:     # None: offloaded, counted when the reply is there
            # inline, in as few steps as can be: this runs for every request
            # (reply[7] is the status digit: REPLY_STATUS_OFFSET)
            elapsed = monotonic_ns() - self.woke_at
            counters.requests[REQUEST_BASE[req.name] + reply[7]] += 1
            counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
            counters.latency_ns += elapsed
        return reply

    @staticmethod
    def _unexpected(name: str, table: str, exc: Exception, counters, layout: int) -> bytes:
        """The RETRY of a request that met a bug (logged, counted under
        `counters`): a bug must not cost the client its answer."""
        maillog.error(f"{name} {table}: unexpected {type(exc).__name__}: {exc}")
        counters.errors += 1
        return encode_reply(name, RETRY, layout)

    def _hot_write(self, attrs: list[tuple[bytes, bytes]]) -> bytes | None:
        """The reply of a 3.6-3.10 update or delete spelled like one that
        the whole path made before (the write lane, see __init__), counted
        as handle() counts; None, with nothing changed, for anything else
        or wherever the whole path has more to do (a change notification
        since, a commit group, a busy lock: it then waits, reopens or
        groups as usual). Else it does what _answer and _operate do for
        such a request: the same flags word, the UTF-8 layer's key check,
        the instance's update or delete, the same reply."""
        # the names are part of the spelling: one dict look-up checks them
        # all (only lists that parse_request took as such are ever noted)
        if len(attrs) == 5:
            (n0, v0), (n1, v1), (n2, v2), (n3, key), (n4, value) = attrs
            spelling = (n0, v0, n1, v1, n2, v2, n3, n4)
        else:
            (n0, v0), (n1, v1), (n2, v2), (n3, key) = attrs
            value = None
            spelling = (n0, v0, n1, v1, n2, v2, n3)
        self._hot_key = spelling    # for _note_hot_write, when the whole path runs
        hot = self._hot_writes.get(spelling)
        if hot is None:
            return None
        table = hot.table
        if table.watch.gen != table.watch_gen or self._groups is not None and table.groups_writes:
            return None
        flags = (table.flags & ~F.RQST_MASK) | hot.add_flags
        saved, table.flags = table.flags, flags
        try:
            if hot.utf8:
                key = utf8_key(key, bool(flags & F.FOLD_FIX and flags & F.FIXED))
            if key is None:     # Postfix's UTF-8 layer: not done
                reply = hot.done
            elif value is None:
                reply = hot.done if table.delete(key) else hot.not_found
            else:
                reply = hot.done if table.update(key, value) else hot.not_found
        except LockBusy:
            table.flags = saved     # the whole path waits for it, as it does
            return None
        except TableError as exc:
            maillog.warning(exc.reason)
            reply = encode_reply(hot.name, exc.status)
        except Exception as exc:
            reply = self._unexpected(hot.name, v1.decode("utf-8", "surrogateescape"), exc,
                                     table.counters, 37)
        finally:
            answers = table.answers
            if answers is not None:     # a write of our own, done or not
                answers.invalidate()
        counters = table.counters       # as handle() counts
        elapsed = monotonic_ns() - self.woke_at
        counters.requests[hot.base + reply[7]] += 1
        counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
        counters.latency_ns += elapsed
        return reply

    def _note_hot_write(self, table: Table, req: Request) -> None:
        """After the whole path made a 3.6-3.10 update or delete of an
        instance (done or not): its spelling leads the write lane to the
        instance, unless the whole path has more to do for it each time
        (an OPEN_LOCK instance notes its clients, a table served off the
        loop, a file without a watch is stat()ed)."""
        if self._hot_key is None or req.layout != 37 or req.flags & F.OPEN_LOCK \
                or table.watch is None or table.blocking or isinstance(table, SurrogateTable):
            return
        if len(self._hot_writes) >= HOT_SPELLINGS:
            self._hot_writes.clear()    # a client trying many spellings
        self._hot_writes[self._hot_key] = HotWrite(table, req, self.smtputf8 and table.utf8_layer)

    def hot_reply(self, data: bytes) -> bytes | None:
        """The reply to `data`, the raw bytes of one request, when they are
        exactly one 3.6-3.10 lookup that the hot path answers (counted as
        handle() counts it); None, with nothing counted or changed, for
        anything else: the caller then decodes `data` and calls handle().
        Its replies are OK or NOKEY (all that the answer cache keeps). A
        read service with the compiled hot path has proxymap._hotpath's
        hot_reply in its place, which behaves the same."""
        parts = split_hot_lookup(data)
        if parts is None:
            return None
        return self._hot_hit(parts[0], parts[1], parts[2])

    def _hot_hit(self, table_name: bytes, flags_text: bytes, key: bytes) -> bytes | None:
        """A 3.6-3.10 lookup of (table, flags) bytes spelled as one that the
        whole path answered before: the reply from the instance's answer
        cache, or else, for an instance that reads directly (`direct`, see
        _note_hot), from its file (kept in the cache, if it has one),
        counted as handle() counts; else None (nothing counted or
        changed)."""
        hot = self._hot.get((table_name, flags_text))
        if hot is None:
            return None
        table, req_flags, direct = hot
        answers, watch = table.answers, table.watch
        if answers is None and not direct or watch.gen != table.watch_gen:
            return None
        flags = (table.flags & ~F.RQST_MASK) | (req_flags & F.RQST_MASK)
        reply = None if answers is None else answers.peek((flags, key))
        if reply is None:
            if not direct or answers is not None and answers.timed:
                return None
            read = _direct_read(table, flags, key)
            if read is None:
                return None
            if answers is not None:     # keyed as the whole path keys it
                answers.put_missed((flags, key), read[1])
            flags, reply = read         # the flags word the lookup left
        table.flags = flags
        counters = table.counters       # as handle() counts
        elapsed = monotonic_ns() - self.woke_at
        counters.requests[LOOKUP_BASE + reply[7]] += 1
        counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
        counters.latency_ns += elapsed
        return reply

    def open_reply(self, data: bytes) -> bytes | None:
        """The reply to `data`, the raw bytes of one request, when they are
        exactly a 3.6-3.10 open spelled like one the whole path answered
        from an instance that still stands unchanged (the registry has it,
        no change notification since): that instance's flags word, as
        find_table and _answer would give it, counted as handle() counts.
        None, with nothing counted or changed, for anything else: the
        caller then decodes `data` and calls handle()."""
        opens = self._opens
        if not opens:
            return None
        spelling = split_hot_open(data)
        if spelling is None:
            return None
        entry = opens.get(spelling)
        if entry is None:
            return None
        table = entry[0]
        if table.watch.gen != table.watch_gen or self.tables.get(table.regkey) is not table:
            del opens[spelling]      # the whole path reopens or retries it
            return None
        if entry[1] != table.flags:  # lookups change the request bits of the word
            entry[1] = table.flags
            entry[2] = encode_reply("open", OK, 37, flags=table.flags)
        reply = entry[2]
        counters = table.counters       # as handle() counts
        elapsed = monotonic_ns() - self.woke_at
        counters.requests[OPEN_BASE + reply[REPLY_STATUS_OFFSET]] += 1
        counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
        counters.latency_ns += elapsed
        return reply

    def _note_open(self, table: Table, reply: bytes) -> None:
        """After the whole path answered a 3.6-3.10 open from watched
        instance `table`: later opens spelled the same get `reply` from
        open_reply while the instance stands."""
        if len(self._opens) >= HOT_SPELLINGS:
            self._opens.clear()     # a client trying many spellings
        self._opens[self._open_key] = [table, table.flags, reply]

    def _note_hot(self, table: Table, req: Request) -> None:
        """After the whole path answered a 3.6-3.10 lookup from the table
        itself: its spelling leads the hot path to the instance. `direct`
        when the hot path may read the file too (direct_reads, and no UTF-8
        layer, whose key check the hot path does not make)."""
        if self._hot_key is None or table.watch is None or req.layout != 37:
            return
        if len(self._hot) >= HOT_SPELLINGS:
            self._hot.clear()   # a client trying many spellings
        self._hot[self._hot_key] = (table, req.flags, table.direct_reads and not (
            self.smtputf8 and table.utf8_layer))

    def _count_under_table(self, req: Request):
        """The counters of the request's table when it is on the
        allow-list (for answers that did not get as far as the table)."""
        spec = strip_proxy(req.table)
        if spec in self.allowed:
            self._counters = self.metrics.table(spec)
        return self._counters

    @staticmethod
    def _count(counters, base: int, reply: bytes, since: int) -> None:
        """One answered request (REQUEST_BASE `base`) and its latency since
        `since` (monotonic_ns) -- the slow path; handle() does it inline."""
        elapsed = monotonic_ns() - since
        counters.requests[base + reply[REPLY_STATUS_OFFSET]] += 1
        counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
        counters.latency_ns += elapsed

    def count_delivered(self, pending: DeferredReply) -> None:
        """Count an offloaded or grouped request whose reply is now known,
        and keep a remote table's found or not-found answer in its cache,
        unless a write of our own was made meanwhile (the answer may predate
        it)."""
        counted = pending.counted
        if counted is not None:
            pending.counted = None
            self._count(counted[0], counted[1], pending.reply, counted[2])
        cache = pending.cache
        if cache is not None:
            pending.cache = None
            answers, ckey, generation = cache
            if ckey is None:                # a write: whatever was read meanwhile goes
                answers.invalidate()
            elif answers.generation == generation:
                status = reply_status(pending.reply)
                if status == OK or status == NOKEY:
                    answers.put(ckey, pending.reply, negative=status == NOKEY)

    def _answer(self, req: Request, walks: dict) -> bytes:
        name = req.name
        if name == "sequence" and req.function not in (SEQ_FIRST, SEQ_NEXT):
            maillog.warning(f"{strip_proxy(req.table)}: unknown sequence function {req.function}")
            return encode_reply(name, BAD, req.layout)
        if name in ("update", "delete") and not self.writable:
            maillog.warning(f"refusing {req.table} {name} request on non-{WRITE_SERVICE} service")
            self._count_under_table(req)
            return encode_reply(name, DENY, req.layout)
        spec = strip_proxy(req.table)
        if ":" not in spec or spec.startswith(":"):
            maillog.warning(f"malformed table name {req.table!r}: need type:name")
            return encode_reply(name, BAD, req.layout)
        if spec not in self.allowed:
            maillog.warning(f'request for unapproved table: "{spec}"')
            maillog.warning(f"to approve this table for {'read-write' if self.writable else 'read-only'}"
                            f" access, list proxy:{spec} in {self.param_name}")
            return encode_reply(name, DENY, req.layout)
        table = self.find_table(spec, req)
        self._counters = table.counters
        if req.layout == 311:
            if name == "open":
                return encode_reply(name, OK, 311, flags=fresh_flags(table, req.instance_flags))
            # 3.11 uses the request's word as it is
            flags = req.flags | WRITE_FLAGS.get(name, 0)
        elif name == "open":
            reply = encode_reply(name, OK, 37, flags=table.flags)
            if self._open_key is not None and table.watch is not None:
                self._note_open(table, reply)
            return reply
        else:
            flags = ((table.flags & ~F.RQST_MASK) | (req.flags & F.RQST_MASK)
                     | WRITE_FLAGS.get(name, 0))
            table.flags = flags
        if table.blocking and self.offload is not None:
            answers = table.answers
            if answers is not None:
                if name == "lookup":
                    reply = answers.get((flags, req.key), None)
                    if reply is not None:
                        table.counters.cache_hits += 1
                        return reply
                    table.counters.cache_misses += 1
                elif name != "sequence":
                    answers.invalidate()    # a write of our own: before and after it
            reply = self.offload.submit(table, flags, lambda: self._operate(table, req, walks),
                                        encode_reply(name, RETRY, req.layout))
            if type(reply) is not bytes:     # a Pending: counted on delivery
                reply.counted = (self._counters, REQUEST_BASE[name], self.woke_at)
                self._counters = None
                if answers is not None and name != "sequence":
                    reply.cache = (answers, (flags, req.key) if name == "lookup" else None,
                                   answers.generation)
            return reply
        answers = table.answers
        groups = self._groups
        if groups is not None:
            if name in ("update", "delete") and getattr(table, "groups_writes", False):
                try:
                    return self._grouped_change(table, req, walks, flags)
                finally:
                    if answers is not None:
                        answers.invalidate()
            if table in groups:     # anything else sees the group's changes durable
                self._end_group(table)
        if name == "update" or name == "delete":     # (on the write service)
            try:        # a write of our own, done or not: what was read may differ
                reply = self._run(table, req, walks, flags)
            finally:
                if answers is not None:
                    answers.invalidate()
            self._note_hot_write(table, req)
            return reply
        if answers is None:
            if name != "lookup" or not table.direct_reads:
                return self._run(table, req, walks, flags)
            self._answered = False
            reply = self._run(table, req, walks, flags)
            if self._answered:
                self._note_hot(table, req)
            return reply
        if name == "lookup":
            # the reply is a function of the flags word, the key and the
            # file, and the file has not changed since the entry was made
            ckey = (flags, req.key)
            reply = answers.get(ckey, None)
            if reply is None:
                self._answered = False
                reply = self._run(table, req, walks, flags)
                if self._answered:
                    answers.put(ckey, reply)
                    self._note_hot(table, req)
            return reply
        return self._run(table, req, walks, flags)     # a sequence step

    def _run(self, table: Table, req: Request, walks: dict, flags: int) -> bytes:
        if req.layout == 37:
            return self._operate(table, req, walks)
        # a 3.11 request's word serves that request only: the instance's own
        # word is left as it was, so no request changes what another sees
        saved = table.flags
        table.flags = flags
        try:
            return self._operate(table, req, walks)
        finally:
            table.flags = saved

    def _operate(self, table: Table, req: Request, walks: dict) -> bytes:
        name, layout = req.name, req.layout
        utf8 = self.smtputf8 and getattr(table, "utf8_layer", False)
        key = req.key
        try:
            if utf8 and name != "sequence":
                key = utf8_key(key, bool(table.flags & F.FOLD_FIX and table.flags & F.FIXED))
                if key is None:  # Postfix's UTF-8 layer: not found / not done
                    self._answered = True
                    return encode_reply(name, NOKEY if name == "lookup" else OK, layout,
                                        flags=table.flags)
            if name == "lookup":
                value = table.lookup(key)
                if value is None:
                    self._answered = True
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                if utf8 and not is_utf8(value):
                    return encode_reply(name, CONFIG, layout, flags=table.flags)
                self._answered = True
                return encode_reply(name, OK, layout, flags=table.flags, value=value)
            if name == "update":
                done = table.update(key, req.value)
                self._answered = True
            elif name == "delete":
                done = table.delete(key)
                self._answered = True
            else:
                record = self._step(table, req, walks)
                if record is None:
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                return encode_reply(name, OK, layout, flags=table.flags,
                                    key=record[0], value=record[1])
            return encode_reply(name, OK if done else NOKEY, layout, flags=table.flags)
        except LockBusy:
            raise
        except TableError as exc:
            maillog.warning(exc.reason)
            return encode_reply(name, exc.status, layout, flags=table.flags)

    @staticmethod
    def _step(table: Table, req: Request, walks: dict) -> tuple[bytes, bytes] | None:
        """One FIRST/NEXT of the caller's walk over `table`."""
        if req.layout == 37 and table.sequence_since_311:
            raise Unsupported(table.spec, "sequence")
        if req.function == SEQ_FIRST:
            position = START
        else:
            position = walks.get(table.regkey,
                                 START if table.next_before_first_starts else END)
        record = table.walk(position)
        if record is None:
            walks[table.regkey] = END
            return None
        walks[table.regkey] = record[0]
        return record[1], record[2]

    # -- the shared table registry ----------------------------------------------

    def find_table(self, spec: str, req: Request) -> Table:
        """The shared instance for (spec, instance flags, layout), opened on
        first use, reopened when its file changed or when a failed open may
        now work."""
        if req.layout == 311:
            inst = req.instance_flags & INSTANCE_KEY_BITS_311
        else:
            inst = req.flags & F.INST_MASK & INSTANCE_KEY_BITS
        regkey = (spec, inst, req.layout)
        table = self.tables.get(regkey)
        if table is not None:
            watch = table.watch
            if watch is not None and watch.gen == table.watch_gen \
                    or self._groups and table in self._groups:
                # no notification since the instance knew its file
                if inst & F.OPEN_LOCK and self.writable:
                    self._note_lock_user(regkey)
                return table
            if isinstance(table, SurrogateTable):
                if time.monotonic() - table.failed_at < OPEN_RETRY_INTERVAL:
                    return table
            elif not table.changed():
                if watch is not None:
                    # notified, yet nothing to reopen for (an lmdb file
                    # written by another process): only answers may differ
                    table.watch_gen = watch.gen
                    if table.answers is not None:
                        table.answers.invalidate()
                if inst & F.OPEN_LOCK and self.writable:
                    self._note_lock_user(regkey)
                return table
            elif table.modified():      # one line per change, not per unsettled reopen
                maillog.info(f"table {spec}: has changed -- reopening")
                self.metrics.table(spec).reopens += 1
            del self.tables[regkey]
            if table.answers is not None:
                table.answers.invalidate()
                table.answers = None    # and no hot path leads to it
            self._close(table)
        # 3.7 opens with the full flags of the first request, 3.11 with the
        # instance flags. OPEN_LOCK holds an exclusive lock for the life of
        # the instance: a reader has no business with it, and a client of the
        # read service could otherwise freeze every writer of a file for good.
        flags = req.instance_flags if req.layout == 311 else req.flags
        if not self.writable:
            flags &= ~F.OPEN_LOCK
        table = self._open(spec, flags, req.layout)
        table.regkey = regkey
        self.tables[regkey] = table
        if inst & F.OPEN_LOCK and self.writable:
            self._note_lock_user(regkey)
        return table

    def _note_lock_user(self, regkey) -> None:
        if self._client is not None:
            self.lock_users.setdefault(regkey, set()).add(self._client)

    def client_gone(self, client: object) -> None:
        """A connection has ended: an OPEN_LOCK instance that no remaining
        client has used is closed, which gives its lock back (Postfix keeps
        it for the life of the process: one client could lock every other
        user of the file out for good)."""
        for regkey, users in list(self.lock_users.items()):
            users.discard(client)
            if not users:
                del self.lock_users[regkey]
                table = self.tables.pop(regkey, None)
                if table is not None:
                    maillog.debug(f"table {regkey[0]}: last OPEN_LOCK user gone -- closing")
                    self._close(table)

    def _open(self, spec: str, flags: int, layout: int = 37) -> Table:
        try:
            table = self.opener(spec, flags, self.writable, self.params)
        except LockBusy:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, TableOpenError) else f"{type(exc).__name__}: {exc}"
            maillog.error(f"open table {spec}: {reason}")
            self.metrics.table(spec).errors += 1
            table = SurrogateTable(spec, flags, str(exc))
            if layout == 311:   # what 3.11's surrogate reports
                table.flags |= F.SURROGATE_311
        # Postfix puts its UTF-8 layer on every instance opened so, surrogates too
        table.utf8_layer = bool(flags & F.UTF8_REQUEST)
        if table.utf8_layer and self.smtputf8:
            table.flags |= F.UTF8_ACTIVE
        table.open_flags, table.fresh_flags = flags, table.flags
        table.counters = self.metrics.table(spec)
        if not isinstance(table, SurrogateTable):
            self._attach_watch(table)
            if spec not in self.cache_exclude:
                table.answers = self._answer_cache(table)
        return table

    def _answer_cache(self, table: Table) -> AnswerCache | None:
        """A new instance's answer cache, or None: file tables get one of
        proxymap_answer_cache_entries; remote ones (served off the loop) one
        of proxymap_remote_cache_ttl, unless the table's own settings
        (`cache_settings`, from its parameter file) say otherwise."""
        if table.answers_cacheable:
            if self.cache_entries <= 0:
                return None
            return AnswerCache(self.cache_entries, self.cache_bytes, stats=self.cache_stats)
        if not (table.blocking and self.offload is not None):
            return None
        own = getattr(table, "cache_settings", None) or {}
        entries = own.get("entries", self.cache_entries)
        ttl = own.get("ttl", self.remote_ttl)
        if entries <= 0 or ttl <= 0:
            return None
        return AnswerCache(entries, self.cache_bytes, ttl=ttl,
                           negative_ttl=own.get("negative_ttl", self.remote_negative_ttl),
                           stats=self.cache_stats)

    def _attach_watch(self, table: Table) -> None:
        """Watch the instance's file. Where the watch is new, a change may
        have landed between the open and the watch: the stamp taken at open
        (and the caution about coarse file times) decides whether the
        instance already counts as changed."""
        if self.watcher is None or table.path is None:
            return
        found = self.watcher.watch(table.path)
        if found is None:
            return      # the stat path
        watch, new = found
        table.watch = watch
        stamp = getattr(table, "_stamp", None)
        if new and (file_stamp(table.path) != stamp or not stamp_is_settled(stamp)):
            table.watch_gen = -1    # reopened at its next request, watched throughout
        else:
            table.watch_gen = watch.gen

    def _close(self, table: Table) -> None:
        self._hot_writes.clear()    # no write lane leads to a closed instance
        if self._groups and table in self._groups:
            self._end_group(table)
        table.answers = None        # no hot path leads to a closed instance
        if table.blocking and self.offload is not None:
            self.offload.retire(table)   # after the operations it still has
            return
        try:
            table.close()
        except Exception as exc:
            maillog.warning(f"close table {table.spec}: {exc}")

    def note_pools(self) -> None:
        """Refresh the pool figures of the tables served off the loop in
        their counters (metrics.POOL_FIELDS), marking those that changed
        for the next report. The worker calls this before each report."""
        if self.offload is None:
            return
        connections: dict[str, list[dict]] = {}
        for table in self.tables.values():
            stats = getattr(table, "connection_stats", None)    # BackendTable's
            if stats is not None:
                connections.setdefault(table.spec, []).extend(stats())
        for spec, lane in self.offload.stats_by_table().items():
            figures = pool_figures(lane, connections.get(spec, []))
            counters = self.metrics.table(spec)
            if figures != counters.pool:
                counters.pool = figures
                counters.changed = True

    def close_all(self) -> None:
        self._ended += self.end_batch()
        for table in self.tables.values():
            self._close(table)
        self.tables.clear()
        if self.offload is not None:
            self.offload.close()
        if self.watcher is not None:
            self.watcher.close()

