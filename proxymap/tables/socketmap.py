"""`socketmap:unix:/path:name`, `socketmap:inet:host:port:name`: a client
of a Sendmail-style socketmap server.

Mirrors Postfix's dict_sockmap (socketmap_table(5)): the request is the
netstring `name key`, the reply a netstring `OK value`, `NOTFOUND `,
`TEMP reason`, `TIMEOUT reason` or `PERM reason`; PERM is a configuration
error (CONFIG), the others a temporary one (RETRY), each logged with
Postfix's words; replies over 100000 bytes are an error. The table is a
PATTERN table (no parent-domain lookups), keys are folded with FOLD_MUL,
it is read-only and refused for NO_UNAUTH (security-sensitive) use.
Streams to one server are pooled per worker (netclient.py).
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.protocol import CONFIG, RETRY
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError, require_read_only
from proxymap.tables.netclient import endpoint_pool, exchange
from proxymap.tables.texthash import printable

MAX_REPLY = 100000


def netstring(data: bytes) -> bytes:
    return str(len(data)).encode() + b":" + data + b","


def read_netstring(stream) -> bytes:
    """One netstring from the stream; ValueError when malformed."""
    while True:
        colon = stream.buf.find(b":")
        if colon >= 0:
            break
        if len(stream.buf) > 10:
            raise ValueError("netstring format error")
        stream.read_more()
    digits = bytes(stream.buf[:colon])
    if not digits.isdigit():
        raise ValueError("netstring format error")
    size = int(digits)
    if size > MAX_REPLY:
        raise ValueError("netstring length exceeds limit")
    while len(stream.buf) < colon + 1 + size + 1:
        stream.read_more()
    body = bytes(stream.buf[colon + 1:colon + 1 + size])
    if stream.buf[colon + 1 + size] != ord(","):
        raise ValueError("netstring format error")
    del stream.buf[:colon + 2 + size]
    return body


class SocketmapTable(BackendTable):
    impl_flags = F.PATTERN

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        require_read_only(f"{type_name}:{name}", writable)
        if flags & F.NO_UNAUTH:
            raise TableOpenError(f"{type_name}:{name} map is not allowed for"
                                 f" security-sensitive data")
        endpoint, sep, self.map_name = name.rpartition(":")
        if not sep or not endpoint:
            raise TableOpenError(f"{type_name} requires server:socketmap argument")
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        try:
            self.pool = endpoint_pool(f"socketmap {endpoint}", endpoint, size)
        except ValueError as exc:
            raise TableOpenError(f"{type_name}:{name}: {exc}") from None

    def lookup(self, key: bytes) -> bytes | None:
        if self.flags & F.FOLD_MUL:
            key = F.fold_ascii(key)
        request = netstring(self.map_name.encode("utf-8", "surrogateescape") + b" " + key)
        try:
            reply = exchange(self.pool, request, read_netstring, float(self.timeout or 10))
        except Exception as exc:   # noqa: BLE001 - any failure of the exchange is a RETRY
            reason = str(exc) or "unexpected EOF"
            raise TableError(f"table {self.spec} lookup error: {reason}") from None
        status, _, payload = reply.partition(b" ")
        if status == b"OK":
            return payload
        if status == b"NOTFOUND":
            return None
        error_class = {b"TEMP": "temporary", b"TIMEOUT": "timeout",
                       b"PERM": "permanent"}.get(status, "unknown")
        text = printable(payload.lstrip()[:200])
        message = (f"{self.spec} socketmap server {error_class} error"
                   f"{': ' + text if text else ''}")
        raise TableError(message, CONFIG if status == b"PERM" else RETRY)

    def close(self) -> None:
        self.pool.close()

