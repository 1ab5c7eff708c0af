"""A listening UNIX-domain stream socket, as Postfix's unix_listen() makes one.

Whatever file is at the path is replaced (a stale socket of an earlier
run); the socket is mode 0666, since the directory it lives in guards
access (Postfix's private/ and public/), and optionally handed to an
owner. The master binds its services' sockets here, and a worker started
alone with `--listen` its own.
"""

from __future__ import annotations

import errno
import os
import socket

#: listen(2) backlog unless the caller wants more
BACKLOG = 128


def bind_unix_listener(path: str, backlog: int = BACKLOG,
                       owner: tuple[int, int] | None = None) -> socket.socket:
    """A non-blocking listening socket at `path` (0666, chowned to owner's
    (uid, gid) when given). Raises OSError whose strerror reads
    `bind PATH: reason`."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise OSError(errno.EISDIR, f"bind {path}: Is a directory") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"bind {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
