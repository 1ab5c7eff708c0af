"""Living with the descriptor limit: raise it as Postfix does, and when it is
reached, close the clients that cannot be served at once.

Postfix's event loop raises the soft RLIMIT_NOFILE to the hard limit at
start (open_limit(INT_MAX) in util/events.c); `raise_open_limit()` does the
same for our master and workers. When accept() still fails for want of a
descriptor, a connection would stay in the listen queue, never greeted nor
closed, and the listener would stay readable (a busy loop logging a warning
per turn). `AcceptGuard` keeps one spare descriptor: on EMFILE/ENFILE it
gives the spare up, accepts the waiting connection, closes it (the client
sees end-of-file at once and may retry elsewhere) and takes the spare back;
the limit is logged once per episode, not once per client.
"""

from __future__ import annotations

import errno
import os
import resource
import socket

from typing import Callable

OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def raise_open_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class AcceptGuard:
    """accept() for a non-blocking listener that copes with the limit."""

    def __init__(self, who: str, warn: Callable[[str], None]):
        self.who = who
        self.warn = warn      # where the limit is reported (maillog.warning)
        self.spare: int | None = None
        self.at_limit = False
        self.refused = 0      # clients closed for want of a descriptor
        self._reserve()

    def _reserve(self) -> None:
        if self.spare is None:
            try:
                self.spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.spare = None

    def accept(self, listener: socket.socket) -> int | None:
        """The next client's descriptor (blocking, close-on-exec), or None
        when none is waiting. Clients met at the descriptor limit are closed
        on the way. Other errors raise OSError.

        A descriptor, not a socket object: our master only passes it on to
        a worker, and the socket object that socket.accept() builds (and
        the enum look-ups it does for family and type) is most of what an
        accept costs in Python. `_accept` is the C method socket.accept()
        itself calls (accept4 with SOCK_CLOEXEC)."""
        while True:
            try:
                client, _ = listener._accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno not in OUT_OF_FDS:
                    raise
                if not self._shed(listener, exc):
                    return None
                continue
            if self.spare is None:
                self._reserve()
            return client

    def _shed(self, listener: socket.socket, exc: OSError) -> bool:
        """Close one waiting client with the spare descriptor's help; False
        when that did not work either."""
        if not self.at_limit:
            self.at_limit = True    # logged once: a flood must not flood the log
            self.warn(f"{self.who}: {exc.strerror} (descriptor limit {open_limit()}):"
                      f" closing clients that cannot be served")
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
        try:
            client, _ = listener._accept()
        except OSError:
            self._reserve()
            return False
        os.close(client)
        self.refused += 1
        self._reserve()
        return True

    def close(self) -> None:
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
