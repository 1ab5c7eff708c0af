"""The interface every lookup-table type implements, and its errors.

It plays the part of Postfix's DICT structure: one object per open table
instance, shared by every client of a worker process, with one flags word
(`self.flags`) that the dispatcher refreshes with each request's bits before
calling an operation, exactly as proxymap(8) does with dict->flags.
"""

from __future__ import annotations

import os
import time

from proxymap import dictflags as F
from proxymap.protocol import CONFIG, RETRY


class TableError(Exception):
    """A table operation failed; `status` is RETRY (temporary) or CONFIG."""

    def __init__(self, reason: str, status: int = RETRY):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TableOpenError(Exception):
    """The table cannot be opened; the dispatcher installs a surrogate."""


def require_read_only(spec: str, writable: bool) -> None:
    """Refuse to open a table of a read-only type for writing, in the words
    of Postfix's dict_open: TableOpenError."""
    if writable:
        raise TableOpenError(f"{spec} map requires O_RDONLY access mode")


class Unsupported(TableError):
    """The table type does not implement this operation (answered CONFIG)."""

    def __init__(self, table: str, operation: str):
        super().__init__(f"table {table}: operation {operation} is not supported", CONFIG)


class Table:
    """Base class: a read-only table with no sequence support.

    Subclasses set `impl_flags` (FIXED or PATTERN, plus MULTI_WRITER) and
    override what they support. `lookup` returns the value or None,
    `update`/`delete` return True when done and False for "not done / not
    found", `sequence(first)` returns (key, value) or None at the end.
    Failures raise TableError. Keys and values are bytes without NUL.
    """

    impl_flags = F.FIXED
    #: file whose change on disk means the instance must be reopened
    path: str | None = None
    #: set by the dispatcher: the registry key, the flags the instance was
    #: opened with and its flags word right after the open
    regkey = None
    open_flags = fresh_flags = 0
    #: operations may wait on something outside this process (a server, a
    #: socket): the dispatcher runs them in a lane of threads (offload.py)
    blocking = False
    #: lookups are a function of the key, the flags word and the file alone
    #: (no server, no clock, no other files): the dispatcher may keep recent
    #: answers (proxymap/answercache.py) while the file has not changed
    answers_cacheable = False
    #: set by the dispatcher: the instance's answer cache (or None), the
    #: inotify watch of `path` (filewatch.Watch, or None: stat path) and its
    #: generation when this instance last knew the file
    answers = None
    watch = None
    watch_gen = 0
    #: lookups are NulKeyTable.lookup over one storage call, `direct_get`
    #: (stored key -> stored value or None, raising on a failure): the
    #: dispatcher's hot path may read through it (Dispatcher._direct_read)
    direct_reads = False
    direct_get = None

    @classmethod
    def member_specs(cls, name: str) -> list[str]:
        """The `type:name` of the tables an instance named `name` opens
        inside itself (a composite's members); none for most types. Bad
        syntax gives none here: opening reports it."""
        return []

    def __init__(self, type_name: str, name: str, flags: int, writable: bool, params):
        self.type_name = type_name
        self.name = name
        self.flags = (flags & ~F.IMPL_MASK) | self.impl_flags
        self.writable = writable
        self.params = params
        self._stamp = None

    @property
    def spec(self) -> str:
        return f"{self.type_name}:{self.name}"

    def fold(self, key: bytes) -> bytes:
        """Apply FOLD_FIX (fixed tables) or FOLD_MUL (pattern tables)."""
        if self.flags & (F.FOLD_FIX if self.impl_flags & F.FIXED else F.FOLD_MUL):
            return F.fold_ascii(key)
        return key

    def lookup(self, key: bytes) -> bytes | None:
        raise Unsupported(self.spec, "lookup")

    def update(self, key: bytes, value: bytes) -> bool:
        raise Unsupported(self.spec, "update")

    def delete(self, key: bytes) -> bool:
        raise Unsupported(self.spec, "delete")

    # Walks. A walk's state is a position the caller keeps (the dispatcher
    # keeps one per connection and table), never the table: a table can be
    # reopened in the middle of a walk, for freshness or after a write, and
    # the walk goes on from its position in the new instance. `walk(START)`
    # gives the first record, `walk(pos)` the one after `pos`; each answer is
    # (new position, key, value), or None at the end; `walk(END)` answers
    # None (or the table's error). A walk never returns a record twice and
    # never skips one present for the whole walk.

    #: NEXT before any FIRST starts a walk (Berkeley DB, LMDB) rather than
    #: answering "no more" (Postfix's in-memory tables)
    next_before_first_starts = False
    #: Postfix lists this type only for 3.11+ clients (cdb)
    sequence_since_311 = False

    def walk(self, position) -> tuple[object, bytes, bytes] | None:
        raise Unsupported(self.spec, "sequence")

    def sequence(self, first: bool) -> tuple[bytes, bytes] | None:
        """One first/next cursor kept by the instance itself, on top of
        walk(): what a Postfix 3.7 dictionary offers its local users."""
        if self.sequence_since_311:
            raise Unsupported(self.spec, "sequence")
        if first:
            position = START
        else:
            position = getattr(self, "_own_walk", START if self.next_before_first_starts else END)
        record = self.walk(position)
        if record is None:
            self._own_walk = END
            return None
        self._own_walk, key, value = record
        return key, value

    def close(self) -> None:
        pass

    # Change detection: file-based tables record the file's identity at open
    # and the dispatcher reopens the instance when it differs. Normally the
    # dispatcher attaches an inotify watch (proxymap/filewatch.py): then a
    # change is a notification counted since the instance knew the file, no
    # system call. Without one (a network filesystem, no inotify) the file
    # is stat()ed: file times are coarse (a few milliseconds), so a stamp
    # taken while the file was still being written may equal the stamp
    # after a later write. Such an "unsettled" stamp counts as changed until
    # a settled one is taken (Postfix applies the same caution to files
    # modified in the last second); only this stat path needs that caution.
    def remember_file(self, path: str, own_write: bool = False) -> None:
        """Record path's identity; own_write: we just wrote it ourselves,
        so the stamp is current by definition (and so are the notifications
        our write raised)."""
        self.path = path
        self._stamp = file_stamp(path)
        self._settled = own_write or stamp_is_settled(self._stamp)
        if self.watch is not None:
            if own_write:
                self.watch.drain()
            self._take_watch_gen()

    def note_own_write(self) -> None:
        """We just wrote the watched file ourselves (under the write lock):
        the notifications that write raised are counted in and the instance
        knows the file as it is now. The stamp is left as it was: with a
        watch, changed() does not look at it (modified() may then also
        count our own writes, for its log line)."""
        watch = self.watch
        watch.watcher.drain()
        if self.watch_gen != watch.gen:
            self._take_watch_gen()

    def _take_watch_gen(self) -> None:
        watch = self.watch
        if self.watch_gen != watch.gen and self.answers is not None:
            # a change this instance takes in itself (a writer's or a
            # walk's re-read under the lock): its cached answers go too,
            # the dispatcher will not see that notification again
            self.answers.invalidate()
        self.watch_gen = watch.gen

    def note_changes(self) -> None:
        """Count the notifications queued so far (a writer does this under
        its exclusive lock, before deciding whether to re-read the file)."""
        if self.watch is not None:
            self.watch.watcher.drain()

    def changed(self) -> bool:
        watch = self.watch
        if watch is not None:
            return watch.gen != self.watch_gen
        if self.path is None:
            return False
        return not self._settled or file_stamp(self.path) != self._stamp

    def modified(self) -> bool:
        """The file differs from the one opened (a change worth a log line;
        changed() is also true while an unchanged stamp is unsettled)."""
        return self.path is not None and file_stamp(self.path) != self._stamp


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: walk positions: before the first record, after the last
START, END = _Mark("START"), _Mark("END")


def snapshot_walk(position, keys, fetch):
    """A walk over a table without a stable order (hash buckets, cdb, memory
    tables): FIRST takes the list of stored keys (`keys()`), each step
    fetches the current value of the next key still present (`fetch(key)`,
    None when gone). The position is (keys, index of the next key)."""
    if position is END:
        return None
    if position is START:
        position = (tuple(keys()), 0)
    stored, index = position
    while index < len(stored):
        key = stored[index]
        index += 1
        value = fetch(key)
        if value is not None:
            return (stored, index), key, value
    return None


#: a file modified longer ago than this has a trustworthy modification time
SETTLE_NS = 50_000_000


def file_stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def stamp_is_settled(stamp) -> bool:
    return stamp is None or time.time_ns() - stamp[2] > SETTLE_NS
