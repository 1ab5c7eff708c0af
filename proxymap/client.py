"""A blocking client for the proxymap protocol, as Postfix's dict_proxy uses it.

`ProxyClient` speaks the wire protocol of Postfix 3.6-3.10 over one UNIX
socket (`$queue_directory/private/proxymap` for reads, `.../proxywrite` for
writes): it checks the server greeting, sends one request at a time and
checks that each reply has exactly the attributes the request calls for.
Its methods return tuples that start with the reply status.

Like Postfix's client stream, it notices a connection the server has closed
(or sent stray bytes on) before reusing it, and on a transport failure it
reconnects and resends the same request -- but only a bounded number of
times, then raises ProxyError (Postfix retries forever).

`ProxyTable` adds what Postfix's dict_proxy client does on top of the wire:
`open` with only the instance bits, keeping the server's FIXED / PATTERN /
MULTI_WRITER bits, sending instance bits plus request bits afterwards, and
the client-side UTF-8 layer (`utf8_key`): with smtputf8_enable=yes and a
UTF-8 caller, keys are folded here with full Unicode case folding and the
FOLD bits are cleared on the wire. DENY and BAD raise ProxyRefused, because
every Postfix client treats them as fatal.
"""

from __future__ import annotations

import select
import socket
import time

from proxymap import dictflags as F
from proxymap.tables import strip_proxy  # the same prefix rule on both sides
from proxymap.utf8 import is_utf8, utf8_key
from proxymap.protocol import (BAD, CONFIG, DENY, GREETING, NOKEY, OK, REPLY_37, RETRY,
                               SEQ_FIRST, SEQ_NEXT, STATUS_NAMES, Decoder, ProtocolError,
                               encode, parse_uint)

__all__ = ["ProxyClient", "ProxyError", "ProxyRefused", "ProxyTable", "check_greeting", "read_greeting",
           "OK", "NOKEY", "RETRY", "BAD", "DENY", "CONFIG"]

READ_CHUNK = 65536


class ProxyError(Exception):
    """The service could not be reached or did not answer sensibly."""


class ProxyRefused(Exception):
    """The service answered DENY or BAD: Postfix clients give up on these."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def read_greeting(sock: socket.socket) -> bytes:
    """The first len(GREETING) bytes a server sends on a connected socket,
    fewer when it closes first. Timeouts and errors raise OSError."""
    data = b""
    while len(data) < len(GREETING):
        chunk = sock.recv(len(GREETING) - len(data))
        if not chunk:
            break
        data += chunk
    return data


def check_greeting(path: str, timeout: float) -> str | None:
    """None when `path` accepts a connection and sends the proxymap greeting,
    else the reason."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            data = read_greeting(sock)
    except OSError as exc:
        return f"connect {path}: {exc.strerror or exc}"
    if len(data) < len(GREETING):
        return f"{path}: connection closed before the greeting"
    return None if data == GREETING else f"{path}: unexpected greeting {data!r}"


def _expected_greeting() -> list[tuple[bytes, bytes]]:
    return Decoder().feed(GREETING)[0]


class ProxyClient:
    """One connection to a proxymap/proxywrite service at `path`.

    `timeout` bounds every blocking read and write (Postfix: ipc_timeout).
    `retries` is how many times a request is resent after a transport
    failure, `retry_delay` the pause before each resend after the first
    (the first reconnect is immediate: the server may just have closed an
    idle connection).
    """

    def __init__(self, path: str, *, timeout: float = 3600.0, retries: int = 2,
                 retry_delay: float = 1.0):
        self.path = path
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.sock: socket.socket | None = None
        self.decoder = Decoder()

    # -- connection management -------------------------------------------------

    def connect(self) -> None:
        """Connect and check the greeting; raises ProxyError."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ProxyError(f"connect to {self.path}: {exc.strerror or exc}") from None
        self.sock = sock
        self.decoder = Decoder()
        greeting = self._read_list()
        if greeting != _expected_greeting():
            self.close()
            raise ProxyError(f"{self.path}: unexpected server greeting {greeting!r}")

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self) -> "ProxyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stale(self) -> bool:
        """True when the idle connection is readable: the server closed it
        or sent bytes nobody asked for. Either way it cannot be reused."""
        if self.sock is None:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _read_list(self) -> list[tuple[bytes, bytes]]:
        """Read exactly one attribute list; anything more is an error."""
        lists: list = []
        while not lists:
            try:
                data = self.sock.recv(READ_CHUNK)
            except OSError as exc:
                raise ProxyError(f"read from {self.path}: {exc.strerror or exc}") from None
            if not data:
                raise ProxyError(f"read from {self.path}: unexpected end of input")
            try:
                lists = self.decoder.feed(data)
            except ProtocolError as exc:
                raise ProxyError(f"{self.path}: {exc}") from None
        if len(lists) > 1 or self.decoder.pending:
            raise ProxyError(f"{self.path}: unsolicited data from the server")
        return lists[0]

    def _exchange(self, request: bytes) -> list[tuple[bytes, bytes]]:
        if self._stale():
            self.connect()
        try:
            self.sock.sendall(request)
        except OSError as exc:
            raise ProxyError(f"write to {self.path}: {exc.strerror or exc}") from None
        return self._read_list()

    def call(self, name: str, pairs: list[tuple[str, object]]) -> list[bytes]:
        """Send request `name` with attributes `pairs` and return the reply
        values in the order of the 3.7 reply layout, status first (still as
        bytes). Transport failures are retried, then raise ProxyError."""
        request = encode([("request", name)] + pairs)
        want = [b"status"] + [a.encode() for a in REPLY_37[name]]
        failure: ProxyError | None = None
        for attempt in range(self.retries + 1):
            if attempt > 1:
                time.sleep(self.retry_delay)
            try:
                reply = self._exchange(request)
            except ProxyError as exc:
                failure = exc
                self.close()
                continue
            if [n for n, _ in reply] != want:
                failure = ProxyError(f"{self.path}: malformed {name} reply {reply!r}")
                self.close()
                continue
            return [v for _, v in reply]
        raise failure

    @staticmethod
    def _status(value: bytes) -> int:
        try:
            return parse_uint(value)
        except ValueError:
            raise ProxyError(f"malformed reply status {value!r}") from None

    # -- the five requests -------------------------------------------------------

    def open(self, table: str, flags: int) -> tuple[int, int]:
        """-> (status, flags of the server's instance)."""
        status, rflags = self.call("open", [("table", table), ("flags", flags)])
        try:
            return self._status(status), parse_uint(rflags)
        except ValueError:
            raise ProxyError(f"malformed open reply flags {rflags!r}") from None

    def lookup(self, table: str, flags: int, key: bytes) -> tuple[int, bytes]:
        """-> (status, value); value is b"" unless status is OK."""
        status, value = self.call("lookup", [("table", table), ("flags", flags), ("key", key)])
        return self._status(status), value

    def update(self, table: str, flags: int, key: bytes, value: bytes) -> tuple[int]:
        (status,) = self.call("update", [("table", table), ("flags", flags),
                                         ("key", key), ("value", value)])
        return (self._status(status),)

    def delete(self, table: str, flags: int, key: bytes) -> tuple[int]:
        (status,) = self.call("delete", [("table", table), ("flags", flags), ("key", key)])
        return (self._status(status),)

    def sequence(self, table: str, flags: int, first: bool) -> tuple[int, bytes, bytes]:
        """-> (status, key, value); NOKEY at the end of the table."""
        status, key, value = self.call("sequence", [
            ("table", table), ("flags", flags),
            ("function", SEQ_FIRST if first else SEQ_NEXT)])
        return self._status(status), key, value


class ProxyTable:
    """A table used through the proxy service, like a `proxy:type:name`
    dictionary opened by a Postfix program.

    `flags` are the caller's dictionary flags (e.g. postmap's
    DUP_WARN|FOLD_FIX|UTF8_REQUEST|LOCK); `smtputf8` is the caller's
    smtputf8_enable. Operations return a status (plus data); DENY and BAD
    raise ProxyRefused with the message a Postfix client would die with.
    """

    def __init__(self, client: ProxyClient, table: str, flags: int, *,
                 smtputf8: bool = True, service: str = "proxymap"):
        self.client = client
        self.table = strip_proxy(table)
        self.service = service
        self.utf8 = bool(smtputf8 and flags & F.UTF8_REQUEST)
        self.inst_flags = flags & F.INST_MASK
        status, reply_flags = client.open(self.table, self.inst_flags)
        if status != OK:
            self._refuse("open", status)
            raise ProxyError(f"open of table {self.table} on the {service} service"
                             f" returned status {STATUS_NAMES.get(status, status)}")
        self.flags = (flags & ~F.IMPL_MASK) | (reply_flags & F.IMPL_MASK)

    def _refuse(self, request: str, status: int) -> None:
        if status == DENY:
            access = "update access" if request in ("update", "delete") else "service"
            raise ProxyRefused(f"{self.service} {access} is not configured for table"
                               f" \"{self.table}\"", status)
        if status == BAD:
            raise ProxyRefused(f"{self.service} service: {request} request for table"
                               f" \"{self.table}\": invalid request", status)

    def wire_key(self, key: bytes) -> tuple[bytes | None, int]:
        """(key as sent, flags as sent) for one request; key None when the
        UTF-8 layer refuses it (not valid UTF-8)."""
        flags = self.inst_flags | (self.flags & F.RQST_MASK)
        if not self.utf8:
            return key, flags
        fold = bool(self.flags & F.FIXED and self.flags & F.FOLD_FIX)
        return utf8_key(key, fold), flags & ~F.FOLD_ANY

    def lookup(self, key: bytes) -> tuple[int, bytes]:
        wkey, flags = self.wire_key(key)
        if wkey is None:
            return NOKEY, b""
        status, value = self.client.lookup(self.table, flags, wkey)
        self._refuse("lookup", status)
        if status == OK and self.utf8 and not is_utf8(value):
            return CONFIG, b""
        return status, value

    def update(self, key: bytes, value: bytes) -> int:
        wkey, flags = self.wire_key(key)
        if wkey is None:
            return OK  # the UTF-8 layer skips it silently, as Postfix does
        (status,) = self.client.update(self.table, flags, wkey, value)
        self._refuse("update", status)
        return status

    def delete(self, key: bytes) -> int:
        wkey, flags = self.wire_key(key)
        if wkey is None:
            return NOKEY
        (status,) = self.client.delete(self.table, flags, wkey)
        self._refuse("delete", status)
        return status

    def sequence(self, first: bool) -> tuple[int, bytes, bytes]:
        flags = self.inst_flags | (self.flags & F.RQST_MASK)
        if self.utf8:
            flags &= ~F.FOLD_ANY
        status, key, value = self.client.sequence(self.table, flags, first)
        self._refuse("sequence", status)
        return status, key, value
