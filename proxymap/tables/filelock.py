"""File locks of the kinds Postfix takes on its lookup-table files.

Postfix's myflock() offers two styles with one interface: `flock(2)` (the
"internal" lock Linux builds use on `.db` and `.cdb` files) and POSIX
`fcntl(2)` record locks (what the lmdb client uses on `.lmdb` files, because
LMDB itself runs with its lock file disabled). Each takes shared, exclusive
or no lock, blocking or not. `TableLock` applies Postfix's per-table policy
(LOCK around each operation, OPEN_LOCK for the table's life).

Mind the fcntl pitfall: POSIX locks belong to the process, and closing *any*
descriptor of the file drops them all, so fcntl locks only exclude other
processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

from proxymap import dictflags as F
from proxymap.tables.base import TableError, TableOpenError

FLOCK = "flock"
FCNTL = "fcntl"

UNLOCK = "unlock"
SHARED = "shared"
EXCLUSIVE = "exclusive"

#: Longest wait for a per-operation lock. Postfix blocks without limit; a
#: worker serves many clients from one loop, so we wait a bounded time and
#: then answer RETRY (e.g. while proxywrite holds a cache's OPEN_LOCK).
LOCK_WAIT_LIMIT = 1.0

#: How long a lock call itself may sleep for a busy lock before it gives
#: up. The worker's event loop sets 0: a busy lock then raises LockBusy at
#: once and the loop retries the request later, serving the other clients
#: meanwhile (proxymap/server.py); command-line tools keep the sleep.
wait_limit = LOCK_WAIT_LIMIT

#: (device, inode) -> number of instances in this process holding the
#: file's OPEN_LOCK
_lifetime_locks: dict[tuple[int, int], int] = {}

_FLOCK_OPS = {UNLOCK: fcntl.LOCK_UN, SHARED: fcntl.LOCK_SH, EXCLUSIVE: fcntl.LOCK_EX}


def lock(fd: int, style: str, op: str, wait: bool = True) -> bool:
    """Set lock `op` on `fd` in `style`. Returns False when `wait` is false
    and another holder makes the lock unavailable; raises OSError on other
    failures."""
    code = _FLOCK_OPS[op]
    if not wait and op != UNLOCK:
        code |= fcntl.LOCK_NB
    try:
        if style == FLOCK:
            fcntl.flock(fd, code)
        elif style == FCNTL:
            # lockf() maps onto fcntl(F_SETLK[W]) over the whole file.
            fcntl.lockf(fd, code, 0, 0, 0)
        else:
            raise ValueError(f"unknown lock style {style!r}")
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def lifetime_locks() -> dict[tuple[int, int], int]:
    """The (device, inode) -> holders map of the OPEN_LOCKs this process
    holds (TableLock.needed consults it), for the compiled hot path."""
    return _lifetime_locks


def try_flock_shared(fd: int) -> bool:
    """A shared flock(2) on `fd` without waiting: False when another holder
    has it exclusively, or the call failed (no exception), for the
    dispatcher's hot path (which leaves both cases to the whole path)."""
    try:
        return lock(fd, FLOCK, SHARED, wait=False)
    except OSError:
        return False


def try_unlock(fd: int) -> bool:
    """flock(2) LOCK_UN on `fd`: False when the call failed (no exception)."""
    try:
        return lock(fd, FLOCK, UNLOCK)
    except OSError:
        return False


def open_for_rebuild(path: str, style: str) -> int:
    """Open (or create, mode 0644 less the umask) a table file that is about
    to be rebuilt and take its exclusive lock, waiting for readers to let
    go, as postmap does. Returns the descriptor; raises TableOpenError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise TableOpenError(f"open database {path}: {exc.strerror}") from None
    try:
        lock(fd, style, EXCLUSIVE)
    except OSError as exc:
        os.close(fd)
        raise TableOpenError(f"lock database {path}: {exc.strerror}") from None
    return fd


class LockBusy(TableError):
    """A lock another process holds; temporary (RETRY) once the wait is over."""


class TableLock:
    """The locking policy of one open table, on descriptor `fd`.

    OPEN_LOCK takes an exclusive non-blocking lock at open, kept until
    close; operations then need no further locking (re-locking the same
    flock descriptor would convert, then drop, the lifetime lock). Tables
    that allow several writers (lmdb) turn OPEN_LOCK into per-operation
    locking instead, independent of the request's LOCK bit. Otherwise
    `access()` locks only when the request carries LOCK.
    """

    def __init__(self, fd: int, style: str, spec: str, flags: int, multi_writer: bool):
        self.fd = fd
        self.style = style
        self.spec = spec
        self.always = False
        self.open_locked = False
        st = os.fstat(fd)
        self.file_id = (st.st_dev, st.st_ino)
        if flags & F.OPEN_LOCK:
            if multi_writer:
                self.always = True
            elif not lock(fd, style, EXCLUSIVE, wait=False):
                raise TableOpenError(f"{spec}: unable to get exclusive lock: "
                                     "Resource temporarily unavailable")
            else:
                self.open_locked = True
                _lifetime_locks[self.file_id] = _lifetime_locks.get(self.file_id, 0) + 1

    @classmethod
    def open_file(cls, path: str, writable: bool, style: str, spec: str, flags: int,
                  multi_writer: bool) -> "TableLock":
        """Open a table's file (created, mode 0600, when writable) and apply
        the lock policy to it. Raises TableOpenError with Postfix's wording."""
        mode = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        try:
            fd = os.open(path, mode | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TableOpenError(f"open database {path}: {exc.strerror}") from None
        try:
            return cls(fd, style, spec, flags, multi_writer)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the descriptor (dropping its locks)."""
        if self.open_locked:
            self.open_locked = False
            left = _lifetime_locks.pop(self.file_id, 1) - 1
            if left > 0:
                _lifetime_locks[self.file_id] = left
        os.close(self.fd)

    @contextlib.contextmanager
    def access(self, op: str, flags: int):
        """Context manager around one operation under `flags`; a failing
        lock call becomes TableError (a temporary error for the client)."""
        if not self.needed(flags):
            yield
            return
        self._call(op)
        try:
            yield
        finally:
            self._call(UNLOCK)

    # The same as access(), in two calls, for hot paths.
    def needed(self, flags: int) -> bool:
        # A file this process holds under OPEN_LOCK (verify's cache, say) is
        # ours alone: other instances of it in this process need no lock, and
        # taking one through another descriptor would wait on ourselves.
        return (not self.open_locked and bool(self.always or flags & F.LOCK)
                and self.file_id not in _lifetime_locks)

    # flock(2) first, directly: a lock that is free (the usual case) costs
    # one call; a busy one, another style or a failure takes _call's way
    def acquire(self, op: str) -> None:
        if self.style == FLOCK:
            try:
                fcntl.flock(self.fd, _FLOCK_OPS[op] | fcntl.LOCK_NB)
                return
            except OSError:
                pass
        self._call(op)

    def release(self) -> None:
        if self.style == FLOCK:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                return
            except OSError:
                pass
        self._call(UNLOCK)

    def _call(self, op: str) -> None:
        try:
            if op == UNLOCK or lock(self.fd, self.style, op, wait=False):
                if op == UNLOCK:
                    lock(self.fd, self.style, op)
                return
            deadline = time.monotonic() + wait_limit
            pause = 0.001
            while time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                if lock(self.fd, self.style, op, wait=False):
                    return
        except OSError as exc:
            raise TableError(f"{self.spec}: {op} lock: {exc.strerror or exc}") from None
        raise LockBusy(f"{self.spec}: {op} lock: table is locked by another process"
                       f" (waited {LOCK_WAIT_LIMIT:g}s)")
