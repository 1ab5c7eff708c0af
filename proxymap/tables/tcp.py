"""`tcp:host:port`: a client of a tcp_table(5) lookup server.

Mirrors Postfix's dict_tcp: the request is `get KEY` and the reply `200
VALUE` (found), `500 text` (not found) or `400 text` (temporary error),
each one line with %XX quoting of bytes outside printable ASCII (and of
`%` itself); a malformed reply or an unknown status is a temporary error
with Postfix's warning, replies longer than 4096 bytes too. A PATTERN
table, keys folded with FOLD_MUL, read-only. Streams to the server are
pooled per worker (netclient.py) instead of one per table and process.
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError, require_read_only
from proxymap.tables.netclient import endpoint_pool, exchange
from proxymap.tables.texthash import printable

MAX_LINE = 4096


def hex_quote(data: bytes) -> bytes:
    """Postfix's hex_quote(): %XX for `%`, blanks, controls and non-ASCII."""
    return b"".join(bytes([c]) if c != 0x25 and 0x20 < c < 0x7F else b"%%%02X" % c
                    for c in data)


def hex_unquote(data: bytes) -> bytes | None:
    """Postfix's hex_unquote(); None for a bad %XX sequence."""
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x25:
            pair = data[i + 1:i + 3]
            try:
                if len(pair) != 2:
                    return None
                out.append(int(pair, 16))
            except ValueError:
                return None
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def read_line(stream) -> bytes:
    while True:
        end = stream.buf.find(b"\n")
        if end >= 0:
            line = bytes(stream.buf[:end])
            del stream.buf[:end + 1]
            return line
        if len(stream.buf) > MAX_LINE:
            raise ValueError(f"text longer than {MAX_LINE}")
        stream.read_more()


class TcpTable(BackendTable):
    impl_flags = F.PATTERN

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        require_read_only(f"{type_name}:{name}", writable)
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        try:
            self.pool = endpoint_pool(f"tcp {name}", "inet:" + name, size)
        except ValueError as exc:
            raise TableOpenError(f"{type_name}:{name}: {exc}") from None

    def lookup(self, key: bytes) -> bytes | None:
        if self.flags & F.FOLD_MUL:
            key = F.fold_ascii(key)
        try:
            line = exchange(self.pool, b"get " + hex_quote(key) + b"\n", read_line,
                            float(self.timeout or 10))
        except Exception as exc:   # noqa: BLE001 - any failure of the exchange is a RETRY
            raise TableError(f"read TCP map reply from {self.name}:"
                             f" {exc or 'unexpected EOF'}") from None
        value = hex_unquote(line[4:]) if len(line) >= 4 else None
        if not (line[:3].isdigit() and line[3:4].isspace()) or value is None:
            raise TableError(f"read TCP map reply from {self.name}: malformed reply:"
                             f" {printable(line[:100])}")
        if line[:1] == b"2":
            return value
        if line[:1] == b"5":
            return None
        if line[:1] == b"4":
            raise TableError(f"tcp:{self.name}: soft error: {printable(line[:100])}")
        raise TableError(f"read TCP map reply from {self.name}: bad status code:"
                         f" {printable(line[:100])}")

    def close(self) -> None:
        self.pool.close()
