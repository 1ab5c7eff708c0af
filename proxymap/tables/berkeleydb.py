"""`hash:` and `btree:` tables: Berkeley DB 5.3 files, as Postfix 3.7 uses them.

`hash:/p/name` and `btree:/p/name` live in the single file `/p/name.db`,
readable and writable by the libdb 5.3 that Debian's Postfix links. Like
Postfix's dict_db we open each file on its own (private cache, no shared
environment files), size the cache from `berkeley_db_read_buffer_size`
(`berkeley_db_create_buffer_size` while building), create hash tables for
4096 elements, flock(2) the file for LOCK/OPEN_LOCK, store keys and values
with a trailing NUL unless told otherwise, sync after every change, and
keep one sequence cursor per instance. `build()` is postmap's rebuild:
exclusive lock, truncate in place (same inode), bulk load.

Sequence choice: NEXT before any FIRST starts at the first record (Postfix
3.7 aborts there); after the end every NEXT answers "end" until a FIRST.
"""

from __future__ import annotations

import contextlib
import os

from berkeleydb import db as bdb

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.tables import filelock, nulkeys
from proxymap.tables.base import END, START, TableOpenError, snapshot_walk
from proxymap.tables.filelock import TableLock
from proxymap.tables.nulkeys import NEW, REFUSED, REPLACED

DEFAULT_READ_BUFFER = 131072
DEFAULT_CREATE_BUFFER = 16777216
HASH_NELEM = 4096


def _db_errors(path: str, action: str):
    """Turn any Berkeley DB exception into TableError naming the file."""
    return nulkeys.storage_errors(path, action, bdb.DBError, _reason)


def _reason(exc: bdb.DBError) -> str:
    args = exc.args
    if len(args) >= 2:
        return str(args[1])
    return str(exc)


def _open_db(path: str, dbtype: int, flags: int, cache_size: int):
    """A DB handle for `path`; raises bdb.DBError."""
    handle = bdb.DB()
    try:
        handle.set_cachesize(0, cache_size, 0)
        if dbtype == bdb.DB_HASH:
            handle.set_h_nelem(HASH_NELEM)
        handle.set_get_returns_none(2)  # cursor ends answer None, not raise
        handle.open(path, None, dbtype, flags, 0o644)
    except bdb.DBError:
        handle.close()
        raise
    return handle


class _BerkeleyTable(nulkeys.NulKeyTable):
    impl_flags = F.FIXED
    answers_cacheable = True
    # No group commit: without an environment (no log), libdb writes a
    # change's pages one by one, and a process killed between two of them
    # leaves a file db_verify rejects ("non-empty page in unused hash
    # bucket"). A per-change sync keeps that window to one change; a group
    # widens it to all of them (tests/test_durability.py found a torn file
    # in about one run of six with groups, none without). LMDB commits by
    # switching a meta page and has no such window.
    groups_writes = False
    dbtype = bdb.DB_HASH

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        path = name + ".db"
        self.label = path
        #: where require_space looks (the path's directory, computed once)
        self._directory = os.path.dirname(path) or "."
        self._db = None
        #: (stored key, value before the change or None) of each change
        #: since the last sync: what _abandon restores
        self._undo = []
        #: an undone change is in the cache, its sync failed
        self._unsynced = False
        self.lock = TableLock.open_file(path, writable, filelock.FLOCK, self.spec, self.flags,
                                        False)
        try:
            cache = nulkeys.param_int(params, "berkeley_db_read_buffer_size",
                                      DEFAULT_READ_BUFFER)
            db_flags = bdb.DB_CREATE if writable else bdb.DB_RDONLY
            self._open_args = (path, self.dbtype, db_flags, cache)
            with self.lock.access(filelock.SHARED, self.flags):
                self._db = _open_db(*self._open_args)
        except BaseException as exc:
            self.lock.close()
            self.lock = None
            if isinstance(exc, bdb.DBError):
                raise TableOpenError(f"open database {path}: {_reason(exc)}") from None
            raise
        self.remember_file(path)

    # storage hooks
    def _need_space(self, nbytes):
        if self._unsynced:
            self._sync_pending()
        nulkeys.require_space(self.path, nbytes, self._directory)

    def _abandon(self):
        # A change failed, most often its sync (a full disk, an I/O error).
        # libdb may have written some of its pages already: a fresh reader
        # would see a torn file, or the change answered RETRY. Without an
        # environment there is no log to roll back from, so the change is
        # undone in the cache, where all its pages still are (each key
        # gets its old value back, or goes), and synced again: the file
        # then holds the old records and verifies.
        undo, self._undo = self._undo, []
        if self._db is None:
            return
        try:
            for stored_key, old_value in reversed(undo):
                if old_value is None:
                    with contextlib.suppress(bdb.DBNotFoundError):
                        self._db.delete(stored_key)
                else:
                    self._db.put(stored_key, old_value)
            self._db.sync()
        except (bdb.DBError, OSError) as exc:
            # The undo cannot reach the file either (the disk is still
            # full): keep this handle, whose cache holds the undone state,
            # and sync again before the next change and at close. Until
            # then the file may show part of the failed change.
            self._unsynced = True
            maillog.warning(f"sync database {self.path}: {_reason(exc)}: the file may hold"
                            " part of a failed change until a later sync succeeds")
            return
        self._unsynced = False
        self._reopen_quietly()

    def _reopen_quietly(self):
        """A new handle on the file; when that fails, changed() says so and
        the dispatcher reopens the table."""
        old, self._db = self._db, None
        with contextlib.suppress(bdb.DBError):
            old.close()
        try:
            self._db = _open_db(*self._open_args)
        except bdb.DBError:
            self.watch_gen = -1

    def _sync_pending(self):
        """Under the exclusive lock, before a change: write back an undone
        change whose sync failed (TableError while that still fails)."""
        if self._unsynced:
            with _db_errors(self.path, "sync"):
                self._db.sync()
            self._unsynced = False

    def changed(self) -> bool:
        # while an undo waits for its sync, the cache is right and the file
        # may not be: a new handle would read the torn file
        return self._db is None or (not self._unsynced and super().changed())

    def _refresh(self):
        # libdb caches pages privately: after another writer (postmap -i,
        # postmap -d) changed the file, writing through the old handle
        # would put stale pages back and lose that writer's changes, and
        # reading through it mixes old pages with new ones. We hold a lock
        # here (exclusive to write, shared to walk), so a new handle sees a
        # quiet file.
        # Under OPEN_LOCK nobody else could write since we opened it.
        watch = self.watch
        if watch is not None:       # note_changes() and not changed(), inline:
            watch.watcher.drain()   # the usual case, in the fewest steps
            if watch.gen == self.watch_gen and self._db is not None:
                return
        if (self.lock is not None and self.lock.open_locked or self._unsynced
                or not self.changed()):
            return
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(bdb.DBError):
                old.close()
        with _db_errors(self.path, "reopen"):
            self._db = _open_db(*self._open_args)
        self.remember_file(self.path)

    direct_reads = True

    @property
    def direct_get(self):
        """The handle's own get (None while there is no handle): what
        _get calls, without the translation of its errors."""
        db = self._db
        return None if db is None else db.get

    def _get(self, stored_key):
        try:   # the hot path: no context manager here
            return self._db.get(stored_key)
        except (bdb.DBError, OSError):
            with _db_errors(self.path, "read"):
                raise

    # The write hooks run once per change: the library's errors are turned
    # into TableError only when one is raised (no context manager per call).
    def _put(self, stored_key, stored_value, replace):
        try:
            if not replace:
                self._undo.append((stored_key, None))
                try:
                    self._db.put(stored_key, stored_value, flags=bdb.DB_NOOVERWRITE)
                except bdb.DBKeyExistError:
                    self._undo.pop()
                    return REFUSED
                return NEW
            old_value = self._db.get(stored_key)
            self._undo.append((stored_key, old_value))
            self._db.put(stored_key, stored_value)
            return NEW if old_value is None else REPLACED
        except (bdb.DBError, OSError):
            with _db_errors(self.path, "write"):
                raise

    def _remove(self, stored_key):
        try:
            old_value = self._db.get(stored_key)
            if old_value is None:
                return False
            self._undo.append((stored_key, old_value))
            self._db.delete(stored_key)
            return True
        except (bdb.DBError, OSError):
            with _db_errors(self.path, "write"):
                raise

    def _commit(self):
        try:
            self._db.sync()
        except (bdb.DBError, OSError):
            with _db_errors(self.path, "sync"):
                raise
        self._undo = []

    next_before_first_starts = True

    def walk(self, position):
        if position is END:
            return None
        with self._access(filelock.SHARED), _db_errors(self.path, "read"):
            # A writer may have finished between the dispatcher's change
            # check and this lock: a step reads many pages, and a mix of
            # pages cached before that write and pages read after it can
            # list a key twice or skip one. The file is quiet now.
            self._refresh()
            record = self._walk_step(position)
        if record is None:
            return None
        position, key, value = record
        return position, nulkeys.decode_key(key), nulkeys.cut_value(value)

    def _walk_step(self, position):
        """(position, stored key, stored value) after `position`, or None."""
        raise NotImplementedError

    def close(self) -> None:
        try:
            if self._db is not None:
                self._db.close()
        except bdb.DBError:
            pass
        finally:
            self._db = None
            if self.lock is not None:
                self.lock.close()
                self.lock = None

    @classmethod
    def build(cls, type_name, name, entries, flags, params, warn) -> int:
        """Rebuild `name.db` from `entries` the way postmap does; returns the
        number of records stored. Open failures raise TableOpenError, write
        failures and refused duplicates TableError."""
        path = name + ".db"
        fd = filelock.open_for_rebuild(path, filelock.FLOCK)
        try:
            records = nulkeys.prepare_records(entries, flags, F.TRY1NULL, warn, path)
            cache = nulkeys.param_int(params, "berkeley_db_create_buffer_size",
                                      DEFAULT_CREATE_BUFFER)
            # An empty file is a fresh database for libdb; anything else is
            # truncated in place by libdb so the inode stays the same.
            db_flags = bdb.DB_CREATE if os.fstat(fd).st_size == 0 else bdb.DB_CREATE | bdb.DB_TRUNCATE
            try:
                handle = _open_db(path, cls.dbtype, db_flags, cache)
            except bdb.DBError as exc:
                raise TableOpenError(f"open database {path}: {_reason(exc)}") from None
            try:
                with _db_errors(path, "write"):
                    for key, value in records.items():
                        handle.put(key, value)
                    handle.sync()
            finally:
                handle.close()
        finally:
            os.close(fd)
        return len(records)


class HashTable(_BerkeleyTable):
    """`hash:` — Berkeley DB DB_HASH; sequence order is libdb's bucket order,
    which inserts can reshuffle: a walk lists the keys present at FIRST."""

    dbtype = bdb.DB_HASH

    def _walk_step(self, position):
        return snapshot_walk(position, self._stored_keys, self._db.get)

    def _stored_keys(self):
        cursor = self._db.cursor()
        try:
            keys = []
            record = cursor.first()
            while record is not None:
                keys.append(record[0])
                record = cursor.next()
            return keys
        finally:
            cursor.close()


class BtreeTable(_BerkeleyTable):
    """`btree:` — Berkeley DB DB_BTREE; sequence order is byte-wise by stored
    key, so a walk's position is the last stored key it returned."""

    dbtype = bdb.DB_BTREE

    def _walk_step(self, position):
        cursor = self._db.cursor()
        try:
            if position is START:
                record = cursor.first()
            else:
                record = cursor.set_range(position)
                if record is not None and record[0] == position:
                    record = cursor.next()
        finally:
            cursor.close()
        return None if record is None else (record[0], record[0], record[1])
