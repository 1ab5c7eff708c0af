"""systemd readiness notification (sd_notify(3)) without libsystemd.

Postfix itself has no systemd integration (Debian wraps it in a forking
unit); our master runs as `Type=notify` instead, so it tells systemd when
it is READY, RELOADING (with MONOTONIC_USEC, as systemd >= 253 wants) and
STOPPING. Nothing is sent when $NOTIFY_SOCKET is unset; errors are ignored,
as libsystemd does.
"""

from __future__ import annotations

import os
import socket
import time


def socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a connectable address: `@name` is the abstract
    namespace (a leading NUL byte), an absolute path is a file socket."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1") as one datagram; True when sent."""
    address = socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
