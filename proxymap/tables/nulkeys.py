"""The trailing-NUL convention of Postfix's file-based tables.

Postfix may store a key and its value either with one trailing NUL byte
(TRY1NULL) or without (TRY0NULL). A table opened without either bit accepts
both: a lookup probes `key\\0` first, then `key`, and the first hit decides
the convention for the rest of the instance's life. A writer that is still
undecided picks the platform default (Linux: with NUL, except cdb which
postmap writes without). Values come back cut at the first NUL.

The helpers are pure functions on the flags word; `NulKeyTable` builds
lookup/update/delete of the four file types (hash, btree, lmdb, cdb) on
them and keeps the narrowed flags in `self.flags`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.protocol import CONFIG
from proxymap.tables import filelock
from proxymap.tables.base import Table, TableError
from proxymap.tables.filelock import TableLock

NUL_BITS = F.TRY0NULL | F.TRY1NULL


def open_flags(flags: int) -> int:
    """Flags for a table being opened for reading: with no TRY bit given,
    both conventions are enabled."""
    if not flags & NUL_BITS:
        flags |= NUL_BITS
    return flags


def probes(flags: int, key: bytes) -> list[tuple[int, bytes]]:
    """The stored forms to try for `key`, in order, each with the TRY bit
    that a hit on it confirms."""
    out = []
    if flags & F.TRY1NULL:
        out.append((F.TRY1NULL, key + b"\0"))
    if flags & F.TRY0NULL:
        out.append((F.TRY0NULL, key))
    return out


def narrow(flags: int, hit: int) -> int:
    """After a hit on the form `hit` (TRY0NULL or TRY1NULL), keep only that
    convention."""
    return (flags & ~NUL_BITS) | hit


def write_bit(flags: int, default: int = F.TRY1NULL) -> int:
    """The convention a write uses: the decided one, or `default` when the
    flags still allow both (or neither)."""
    bits = flags & NUL_BITS
    if bits == F.TRY1NULL or bits == F.TRY0NULL:
        return bits
    return default


def encode(bit: int, data: bytes) -> bytes:
    """Key or value in the stored form of convention `bit`."""
    return data + b"\0" if bit == F.TRY1NULL else data


def cut_value(stored: bytes) -> bytes:
    """A stored value as returned to callers: up to its first NUL."""
    end = stored.find(b"\0")
    return stored if end < 0 else stored[:end]


def decode_key(stored: bytes) -> bytes:
    """A stored key as returned by sequence: up to its first NUL."""
    return cut_value(stored)


# --- duplicates -----------------------------------------------------------

def duplicate_message(label: str, key: bytes) -> str:
    """Postfix's wording for a refused duplicate insert."""
    return f'{label}: duplicate entry: "{key.decode("utf-8", "replace")}"'


def prepare_records(entries: Iterable[tuple[bytes, bytes]], flags: int, default_bit: int,
                    warn: Callable[[str], None], label: str) -> dict[bytes, bytes]:
    """Turn source entries into the records a freshly built table holds:
    keys folded under FOLD_FIX, key and value in the NUL convention chosen
    by `flags` (or `default_bit`), duplicates resolved by DUP_REPLACE
    (last wins), DUP_IGNORE (first wins), DUP_WARN (first wins, warn) or
    else refused with TableError, as postmap's bulk load does."""
    bit = write_bit(flags, default_bit)
    fold = bool(flags & F.FOLD_FIX)
    records: dict[bytes, bytes] = {}
    for key, value in entries:
        if fold:
            key = F.fold_ascii(key)
        stored = encode(bit, key)
        if stored in records and not flags & F.DUP_REPLACE:
            if flags & F.DUP_IGNORE:
                continue
            if flags & F.DUP_WARN:
                warn(duplicate_message(label, key))
                continue
            raise TableError(duplicate_message(label, key))
        records[stored] = encode(bit, value)
    return records


# --- the shared table logic ----------------------------------------------

NEW, REPLACED, REFUSED = "new", "replaced", "refused"


class NulKeyTable(Table):
    """Lookup, update and delete for a file table of exact-match keys that
    follows the NUL convention, on top of four storage hooks:

    * `_get(stored_key)` -> stored value or None
    * `_put(stored_key, stored_value, replace)` -> NEW / REPLACED / REFUSED
    * `_remove(stored_key)` -> True when a record was removed
    * `_commit()` -> make the last change durable (sync)

    Subclasses set `self.lock` (a filelock.TableLock) and `self.label` (the
    name Postfix uses in duplicate warnings), and translate their storage
    library's exceptions into TableError inside the hooks.
    """

    #: convention used by an undecided writer (Linux default: with NUL)
    default_write = F.TRY1NULL
    lock: TableLock | None = None
    label = ""
    #: changes can be grouped under one lock and one sync (group_begin)
    groups_writes = True
    #: while a group is open: [lock taken, changes made, failed]
    _group: list | None = None

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        self.flags = open_flags(self.flags)

    def _access(self, op: str):
        if self.lock is None:
            return contextlib.nullcontext()
        return self.lock.access(op, self.flags)

    def lookup(self, key: bytes) -> bytes | None:
        flags = self.flags
        if flags & F.FOLD_FIX:   # every NUL-convention table is FIXED
            key = F.fold_ascii(key)
        lock = self.lock
        locked = lock is not None and lock.needed(flags)
        if locked:
            lock.acquire(filelock.SHARED)
        try:
            if flags & F.TRY1NULL:
                value = self._get(key + b"\0")
                if value is not None:
                    if flags & F.TRY0NULL:
                        self.flags = narrow(flags, F.TRY1NULL)
                    return cut_value(value)
            if flags & F.TRY0NULL:
                value = self._get(key)
                if value is not None:
                    if flags & F.TRY1NULL:
                        self.flags = narrow(flags, F.TRY0NULL)
                    return cut_value(value)
        finally:
            if locked:
                lock.release()
        return None

    def _require_writable(self, operation: str) -> None:
        if not self.writable:
            raise TableError(f"table {self.spec}: {operation} on a table opened read-only",
                             CONFIG)

    # Group commit: proxywrite applies the changes that are ready in one
    # loop pass under one exclusive lock and makes them durable with one
    # sync (group_end); no change is answered before that sync. Postfix
    # locks and syncs each change on its own; the file goes through the
    # same states, only fewer syncs mark them durable.

    def group_begin(self) -> None:
        """Open a group: the exclusive lock when the current flags call for
        one (raises LockBusy while another process holds it), and the
        file re-read if another writer changed it."""
        self._require_writable("update")
        locked = self._exclusive()
        try:
            self._refresh()
        except BaseException:
            self._unlock(locked)
            raise
        self._group = [locked, False, False]

    def group_accepts(self) -> bool:
        """Whether a change under the current flags may join the open group
        (it locks the same way)."""
        needed = self.lock is not None and self.lock.needed(self.flags)
        return self._group is not None and not self._group[2] and self._group[0] == needed

    @property
    def group_failed(self) -> bool:
        return self._group is not None and self._group[2]

    def group_end(self) -> bool:
        """Close the group: one sync for all its changes, then the lock is
        released. True when every change of the group is durable; False
        when a change or the sync failed (then none of them counts: the
        file is read afresh, as after any failed change)."""
        locked, dirty, failed = self._group
        self._group = None
        try:
            if failed:
                return False
            if dirty:
                try:
                    self._commit()
                except TableError as exc:
                    maillog.warning(exc.reason)
                    self._abandon()
                    return False
                self._remember_own_write()
            return True
        finally:
            if locked:
                self.lock.release()

    def _grouped(self, operation, *args):
        """operation(*args) (a _put or _remove) inside the open group: a
        failure fails the whole group (its earlier changes are dropped
        with the cache)."""
        try:
            return operation(*args)
        except TableError:
            self._group[2] = True
            self._abandon()
            raise

    def update(self, key: bytes, value: bytes) -> bool:
        if not self.writable:
            self._require_writable("update")
        flags = self.flags
        if flags & F.FOLD_FIX:   # every NUL-convention table is FIXED (Table.fold)
            key = F.fold_ascii(key)
        bit = write_bit(flags, self.default_write)
        self.flags = narrow(flags, bit)
        if self._group is not None:
            self._need_space(len(key) + len(value) + 2)
            outcome = self._grouped(self._put, encode(bit, key), encode(bit, value),
                                    bool(self.flags & F.DUP_REPLACE))
            if outcome != REFUSED:
                self._group[1] = True
        else:
            outcome = self._update_now(key, value, bit)
        if outcome == REFUSED:
            if self.flags & F.DUP_WARN and not self.flags & F.DUP_IGNORE:
                maillog.warning(duplicate_message(self.label, key))
            return False
        return True

    def _exclusive(self) -> bool:
        """Take the exclusive lock when the flags call for one (TableError,
        LockBusy included, when it cannot be had); whether it was taken.
        The write paths pair it with _unlock instead of a context manager,
        as lookup does with the shared lock: they run once per change."""
        lock = self.lock
        if lock is not None and lock.needed(self.flags):
            lock.acquire(filelock.EXCLUSIVE)
            return True
        return False

    def _unlock(self, locked: bool) -> None:
        if locked:
            self.lock.release()

    def _update_now(self, key: bytes, value: bytes, bit: int) -> str:
        # _exclusive, encode and _unlock inline: this runs once per change
        lock = self.lock
        locked = lock is not None and lock.needed(self.flags)
        if locked:
            lock.acquire(filelock.EXCLUSIVE)
        try:
            self._refresh()
            self._need_space(len(key) + len(value) + 2)
            if bit == F.TRY1NULL:
                key, value = key + b"\0", value + b"\0"
            try:
                outcome = self._put(key, value, bool(self.flags & F.DUP_REPLACE))
                if outcome != REFUSED:
                    self._commit()
            except TableError:
                self._abandon()
                raise
            if outcome != REFUSED:
                self._remember_own_write()
        finally:
            if locked:
                lock.release()
        return outcome

    def delete(self, key: bytes) -> bool:
        if not self.writable:
            self._require_writable("delete")
        if self.flags & F.FOLD_FIX:   # as in update
            key = F.fold_ascii(key)
        if self._group is not None:
            self._need_space(len(key) + 1)
            for bit, stored in probes(self.flags, key):
                if self._grouped(self._remove, stored):
                    self._group[1] = True
                    self.flags = narrow(self.flags, bit)
                    return True
            return False
        lock = self.lock     # _exclusive and _unlock inline, as in _update_now
        locked = lock is not None and lock.needed(self.flags)
        if locked:
            lock.acquire(filelock.EXCLUSIVE)
        try:
            self._refresh()
            self._need_space(len(key) + 1)
            for bit, stored in probes(self.flags, key):
                try:
                    removed = self._remove(stored)
                    if removed:
                        self._commit()
                except TableError:
                    self._abandon()
                    raise
                if removed:
                    self.flags = narrow(self.flags, bit)
                    self._remember_own_write()
                    return True
        finally:
            if locked:
                lock.release()
        return False

    def _remember_own_write(self) -> None:
        """Note our change as the file's current state, still under the
        write lock.

        With an inotify watch, only the notifications our write raised are
        counted in (Table.note_own_write): no stamp is needed, and none is
        taken. That matters for speed, not only for the two system calls:
        on kernels with multigrain file times (Linux 6.13+), reading a
        file's mtime right after a write makes the next write store a
        fine-grained time, which dirties the inode on every change and
        made each fdatasync after it about 70 us slower here (see
        docs/performance.md, "Durable updates: where the time went").

        On the stat path the stamp is taken. File times are coarse: another
        writer taking the lock next could leave the very same mtime (and
        size), and we would keep a stale cache. So our write's mtime is set
        1ns back, a value no later write can produce. If that is not
        permitted (a file we do not own), the stamp is still taken as our
        own: treating it as unsettled would reopen the table, and lose its
        sequence cursor, after every update."""
        watch = self.watch
        if watch is not None:     # note_own_write(), inline
            watch.watcher.drain()
            if self.watch_gen != watch.gen:
                self._take_watch_gen()
            return
        try:
            st = os.stat(self.path)
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns - 1))
        except OSError:
            pass
        self.remember_file(self.path, own_write=True)

    # storage hooks
    def _need_space(self, nbytes: int) -> None:
        """Called under the exclusive lock before a change of about `nbytes`
        bytes: raise TableError when the change could not be written whole."""

    def _abandon(self) -> None:
        """A change failed half-way: forget whatever of it is not on disk
        yet, so that a later write cannot store an update answered RETRY."""

    def _refresh(self) -> None:
        """Called under the exclusive lock before a change: a table with a
        private cache re-reads the file if another writer changed it."""

    def _get(self, stored_key: bytes) -> bytes | None:
        raise NotImplementedError

    def _put(self, stored_key: bytes, stored_value: bytes, replace: bool) -> str:
        raise NotImplementedError

    def _remove(self, stored_key: bytes) -> bool:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def storage_errors(path: str, action: str, library_error: type[Exception],
                   describe: Callable[[Exception], str] = str):
    """Turn the storage library's exceptions (and OSError) into TableError
    naming the file: `<action> database <path>: <reason>`."""
    try:
        yield
    except library_error as exc:
        raise TableError(f"{action} database {path}: {describe(exc)}") from None
    except OSError as exc:
        raise TableError(f"{action} database {path}: {exc.strerror or exc}") from None


#: free space a change must leave on the table's filesystem, beyond twice
#: its own size: the pages a split or an overflow chain may add
SPACE_MARGIN = 128 * 1024


def require_space(path: str, nbytes: int, directory: str | None = None) -> None:
    """Refuse (TableError, so RETRY) a change of `nbytes` bytes to the file
    at `path` when its filesystem has less free space than the change may
    need. Berkeley DB without an environment has no log to undo a write cut
    short: a page it could not add leaves the others pointing at nothing
    (db_verify: bad prev_pgno, unterminated leaf chain), so we do not start
    a write that may not fit. Space counts as the unprivileged user sees it
    (f_bavail), the one proxywrite runs as. `directory`: path's directory,
    where the caller knows it (`os.path.dirname(path) or "."`)."""
    try:
        st = os.statvfs(directory or os.path.dirname(path) or ".")
    except OSError:
        return      # the write itself will tell
    free = st.f_bavail * st.f_frsize
    if free < 2 * nbytes + SPACE_MARGIN:
        raise TableError(f"write database {path}: No space left on device"
                         f" ({free} bytes free, {2 * nbytes + SPACE_MARGIN} needed)")


def param_int(params, name: str, default: int) -> int:
    """An integer main.cf parameter from `params`, or Postfix's default when
    it is missing or not a number."""
    try:
        value = int(str(params.get(name, default)).strip())
    except (TypeError, ValueError, AttributeError):
        return default
    return value if value > 0 else default
