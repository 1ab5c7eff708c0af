"""Connections to socketmap and tcp_table servers, for their two tables.

Both of Postfix's clients (dict_sockmap, dict_tcp) talk to one endpoint,
`unix:/path` or `inet:host:port` (tcp: `host:port`), over a stream that is
reused between lookups, and make a broken connection transparent by
reconnecting once (memcache: `max_try` times). Here each endpoint has a bounded pool (connpool.py) of
such streams per worker; `exchange()` sends a request and reads one reply
on a pooled stream, retrying once on a fresh one when a reused stream
turns out to be closed.
"""

from __future__ import annotations

import socket

from proxymap.tables.connpool import Pool

#: seconds for connect, read and write, as Postfix's 100 s (the lane's own
#: timeout answers the client sooner)
IO_TIMEOUT = 100


class Closed(Exception):
    """The server closed the stream (EOF before a complete reply)."""


def parse_endpoint(text: str) -> tuple[int, object]:
    """`unix:/path` or `inet:host:port` / `host:port` -> (family, address)."""
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:]
    name = text[5:] if text.startswith("inet:") else text
    host, sep, port = name.rpartition(":")
    if not sep or not port:
        raise ValueError(f"bad endpoint {text!r}: need host:port")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port) if port.isdigit() else socket.getservbyname(port, "tcp"))


class Stream:
    """One connected socket with a read buffer."""

    def __init__(self, family, address, io_timeout: float = IO_TIMEOUT):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(io_timeout)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()

    def read_more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed()
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def endpoint_pool(name: str, endpoint: str, size: int, idle: float = 60.0,
                  io_timeout: float = IO_TIMEOUT) -> Pool:
    family, address = parse_endpoint(endpoint)
    return Pool(name, lambda: Stream(family, address, io_timeout), Stream.close, size, idle)


def exchange(pool: Pool, request: bytes, read_reply, timeout: float):
    """Send request, return read_reply(stream); one retry on a fresh
    stream when the server closed a reused one."""
    for attempt in (1, 2):
        stream = pool.get(timeout)
        broken = True
        try:
            stream.sock.sendall(request)
            reply = read_reply(stream)
            broken = False
            return reply
        except (Closed, BrokenPipeError, ConnectionResetError):
            if attempt == 2:
                raise
        finally:
            pool.put(stream, broken)
