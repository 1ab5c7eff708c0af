"""File locks of the kinds Postfix takes on its lookup-table files.

Postfix's myflock() offers two styles with one interface: `flock(2)` (the
"internal" lock Linux builds use on `.db` and `.cdb` files) and POSIX
`fcntl(2)` record locks (what the lmdb client uses on `.lmdb` files, because
LMDB itself runs with its lock file disabled). Each takes shared, exclusive
or no lock, blocking or not. `held()` wraps one table operation in a lock.

Mind the fcntl pitfall: POSIX locks belong to the process, and closing *any*
descriptor of the file drops them all, so fcntl locks only exclude other
processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl

FLOCK = "flock"
FCNTL = "fcntl"

UNLOCK = "unlock"
SHARED = "shared"
EXCLUSIVE = "exclusive"

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


@contextlib.contextmanager
def held(fd: int | None, style: str, op: str):
    """Hold lock `op` on `fd` for the body (no-op when fd is None)."""
    if fd is None:
        yield
        return
    lock(fd, style, op)
    try:
        yield
    finally:
        lock(fd, style, UNLOCK)
