"""`lmdb:` tables: one LMDB file `name.lmdb`, as Postfix 3.7's dict_lmdb keeps it.

Postfix opens the file as a single-file environment with LMDB's own lock
table disabled and protects access with fcntl(2) locks on the `.lmdb` file
(shared for lookups and sequence steps, exclusive for writes) when LOCK is
requested; OPEN_LOCK is turned into that per-operation locking because the
table allows several writers (MULTI_WRITER). The map starts at
`lmdb_map_size` and doubles whenever a write finds it full. Keys and values
follow the NUL convention of hash tables (written with NUL on Linux).

Sequence keeps no transaction open between steps: it remembers the last
key returned and resumes after it, so records deleted or added between steps
cannot disturb it. NEXT before FIRST starts at the first record; after the
end NEXT keeps answering "end" until the next FIRST.
"""

from __future__ import annotations

import os

import lmdb as _lmdb

from proxymap import dictflags as F
from proxymap.tables import filelock, nulkeys
from proxymap.tables.base import END, START, TableOpenError, file_stamp
from proxymap.tables.filelock import TableLock
from proxymap.tables.nulkeys import NEW, REFUSED, REPLACED

DEFAULT_MAP_SIZE = 16777216


def _lmdb_errors(path: str, action: str):
    return nulkeys.storage_errors(path, action, _lmdb.Error)


def _open_env(path: str, writable: bool, map_size: int):
    # The file exists already (the caller created it), so no mode is needed.
    return _lmdb.open(path, subdir=False, lock=False, readonly=not writable,
                      create=writable, map_size=map_size, max_dbs=0)


class _SharedEnv:
    """One LMDB environment per file and process (LMDB forbids opening the
    same file twice in a process), shared by every table instance on it,
    with the map size it has grown to."""

    def __init__(self, key, env, writable: bool, map_size: int):
        self.key = key
        self.env = env
        self.writable = writable
        self.map_size = map_size
        self.users = 0

    def grow(self) -> None:
        """The map is full: double it."""
        self.map_size *= 2
        self.env.set_mapsize(self.map_size)

    def adopt(self) -> None:
        """Another process grew the map: take over the size in the file."""
        self.env.set_mapsize(0)
        self.map_size = self.env.info()["map_size"]


# (st_dev, st_ino) of the file -> its environment in this process
_ENVS: dict[tuple[int, int], _SharedEnv] = {}


def _acquire_env(fd: int, path: str, writable: bool, map_size: int) -> _SharedEnv:
    """The environment of the file open on `fd` (`path`); raises lmdb.Error."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    shared = _ENVS.get(key)
    if shared is not None and writable and not shared.writable:
        raise TableOpenError(f"open database {path}: already open read-only in this process")
    if shared is None:
        shared = _SharedEnv(key, _open_env(path, writable, map_size), writable, map_size)
        _ENVS[key] = shared
    shared.users += 1
    return shared


def _release_env(shared: _SharedEnv) -> None:
    shared.users -= 1
    if shared.users == 0:
        del _ENVS[shared.key]
        shared.env.close()


def _with_growth(shared: _SharedEnv, action):
    """Run `action()` (one write transaction), growing the map and trying
    again while LMDB reports it full or resized by another process."""
    while True:
        try:
            return action()
        except _lmdb.MapFullError:
            shared.grow()
        except _lmdb.MapResizedError:
            shared.adopt()


class LmdbTable(nulkeys.NulKeyTable):
    impl_flags = F.FIXED | F.MULTI_WRITER

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        path = name + ".lmdb"
        self.label = self.spec
        self._shared: _SharedEnv | None = None
        self.lock = TableLock.open_file(path, writable, filelock.FCNTL, self.spec, self.flags,
                                        True)
        try:
            with self.lock.access(filelock.SHARED, self.flags):
                self._shared = _acquire_env(
                    self.lock.fd, path, writable,
                    nulkeys.param_int(params, "lmdb_map_size", DEFAULT_MAP_SIZE))
        except BaseException as exc:
            self.lock.close()
            self.lock = None
            if isinstance(exc, _lmdb.Error):
                raise TableOpenError(f"open database {path}: {exc}") from None
            raise
        self.remember_file(path)

    def changed(self) -> bool:
        """Only a removed or replaced file counts: other writers are
        expected on a MULTI_WRITER table (Postfix checks lmdb the same way)."""
        now = file_stamp(self.path)
        return now is None or self._stamp is None or now[:2] != self._stamp[:2]

    @property
    def _env(self):
        return self._shared.env

    def _read(self, action):
        """Run `action(txn)` in a read transaction."""
        with _lmdb_errors(self.path, "read"):
            try:
                with self._env.begin() as txn:
                    return action(txn)
            except _lmdb.MapResizedError:
                self._shared.adopt()
                with self._env.begin() as txn:
                    return action(txn)

    # storage hooks
    def _get(self, stored_key):
        return self._read(lambda txn: txn.get(stored_key))

    def _put(self, stored_key, stored_value, replace):
        def put():
            with self._env.begin(write=True) as txn:
                existed = txn.get(stored_key) is not None
                if existed and not replace:
                    return REFUSED
                txn.put(stored_key, stored_value)
                return REPLACED if existed else NEW

        with _lmdb_errors(self.path, "write"):
            return _with_growth(self._shared, put)

    def _remove(self, stored_key):
        def remove():
            with self._env.begin(write=True) as txn:
                return txn.delete(stored_key)

        with _lmdb_errors(self.path, "write"):
            return _with_growth(self._shared, remove)

    def _commit(self):
        with _lmdb_errors(self.path, "sync"):
            self._env.sync(True)

    next_before_first_starts = True

    def walk(self, position):
        """Byte-wise key order: the position is the last stored key returned."""
        if position is END:
            return None

        def step(txn):
            cursor = txn.cursor()
            if position is START:
                found = cursor.first()
            else:
                found = cursor.set_range(position)
                if found and cursor.key() == position:
                    found = cursor.next()
            return (cursor.key(), cursor.value()) if found else None

        with self._access(filelock.SHARED):
            record = self._read(step)
        if record is None:
            return None
        return record[0], nulkeys.decode_key(record[0]), nulkeys.cut_value(record[1])

    def close(self) -> None:
        try:
            if self._shared is not None:
                _release_env(self._shared)
        finally:
            self._shared = None
            if self.lock is not None:
                self.lock.close()
                self.lock = None

    @classmethod
    def build(cls, type_name, name, entries, flags, params, warn) -> int:
        """Rebuild `name.lmdb` from `entries` (emptied in place under an
        exclusive fcntl lock, one write transaction); returns the number of
        records stored."""
        path = name + ".lmdb"
        label = f"{type_name}:{name}"
        fd = filelock.open_for_rebuild(path, filelock.FCNTL)
        try:
            records = nulkeys.prepare_records(entries, flags, F.TRY1NULL, warn, label)
            try:
                shared = _acquire_env(
                    fd, path, True, nulkeys.param_int(params, "lmdb_map_size", DEFAULT_MAP_SIZE))
            except _lmdb.Error as exc:
                raise TableOpenError(f"open database {path}: {exc}") from None
            env = shared.env

            def load():
                with env.begin(write=True) as txn:
                    txn.drop(env.open_db(txn=txn), delete=False)
                    for key, value in records.items():
                        txn.put(key, value)

            try:
                with _lmdb_errors(path, "write"):
                    _with_growth(shared, load)
                    env.sync(True)
            finally:
                # Closing LMDB's descriptor drops this process's fcntl
                # locks on the file; that is fine, the load is complete.
                _release_env(shared)
        finally:
            os.close(fd)
        return len(records)
