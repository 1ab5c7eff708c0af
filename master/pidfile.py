"""The master's pid file and lock, in Postfix's format.

Like Postfix's `pid/master.pid`, our lock file lives under
`$queue_directory/pid/`, is held with an exclusive non-blocking flock()
for the master's whole life and contains the PID right-aligned in 32
columns plus a newline (written in place). It is named after our program,
`proxymap-master.pid`, so it never collides with a real Postfix master on
the same queue directory. The file is never removed: the *lock* means
"running", not the file's presence.
"""

from __future__ import annotations

import errno
import fcntl
import os

PID_NAME = "proxymap-master.pid"


def pid_path(queue_directory: str) -> str:
    return os.path.join(queue_directory, "pid", PID_NAME)


def format_pid(pid: int) -> bytes:
    return b"%32d\n" % pid


def parse_pid(data: bytes) -> int | None:
    """The PID in the file's first line, or None when it holds none."""
    text = data.split(b"\n", 1)[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def read_pid(path: str) -> int | None:
    """The PID recorded in a pid file (ours or a Postfix master's, which
    use the same format), None when it is missing or holds none. Says
    nothing about whether that process still runs: see running_pid()."""
    try:
        with open(path, "rb") as f:
            return parse_pid(f.read(64))
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (it may belong to another
    user: kill(pid, 0) then fails with EPERM, which still means alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockBusy(Exception):
    """Another process holds the lock."""


def acquire(path: str) -> int:
    """Lock `path` and write our PID into it; returns the (close-on-exec)
    descriptor, which must stay open. Raises LockBusy or OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockBusy(path) from None
        raise
    os.pwrite(fd, format_pid(os.getpid()), 0)
    return fd


def running_pid(path: str) -> int | None:
    """The PID of the master holding the lock on `path`, None if nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return parse_pid(os.pread(fd, 64, 0)) or -1
        return None
    finally:
        os.close(fd)
