"""The proxymap attribute codec: Postfix's NUL-delimited attribute lists.

A message is a sequence of `name NUL value NUL` pairs closed by a lone NUL
(attr_print0/attr_scan0 in Postfix). The server greets first with
`protocol=proxymap_protocol`; then each client request gets one reply.

`Decoder` turns a byte stream into complete attribute lists incrementally
(partial reads, several requests in one read) and enforces limits on the
number of attributes and on the size of one list. `encode` builds a reply.
`parse_request` checks a decoded list against the request layouts of
Postfix 3.6-3.10 and of 3.11+ (which adds `instance_flags`), detected per
request.

`split_hot_lookup` recognises raw bytes that are exactly one 3.6-3.10
lookup, for the worker's hot path (Dispatcher.hot_reply). That path has an
optional compiled form, proxymap/_hotpath.c, built by `pip install` where a
C compiler is available: `HOTPATH` is that module when it was built and the
environment does not set PROXYMAP_PURE_PYTHON (to anything but "" or "0"),
else None, and `IMPLEMENTATION` names the one in use (the worker logs it at
start, `status` shows it). The pure-Python functions stay the reference:
the compiled ones must behave exactly like them (tests/test_hotpath.py runs
both on the same inputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from proxymap.conventions.parameters import DEFAULTS

OK, NOKEY, RETRY, BAD, DENY, CONFIG = range(6)
STATUS_NAMES = {OK: "OK", NOKEY: "NOKEY", RETRY: "RETRY", BAD: "BAD",
                DENY: "DENY", CONFIG: "CONFIG"}

SEQ_FIRST, SEQ_NEXT = 0, 1

GREETING = b"protocol\0proxymap_protocol\0\0"

# Request attributes after `request`, in the mandatory order (3.7 layout).
LAYOUT_37 = {
    "open": ("table", "flags"),
    "lookup": ("table", "flags", "key"),
    "update": ("table", "flags", "key", "value"),
    "delete": ("table", "flags", "key"),
    "sequence": ("table", "flags", "function"),
}
# The 3.11+ layout inserts instance_flags after table (open: replaces flags).
LAYOUT_311 = {
    "open": ("table", "instance_flags"),
    "lookup": ("table", "instance_flags", "flags", "key"),
    "update": ("table", "instance_flags", "flags", "key", "value"),
    "delete": ("table", "instance_flags", "flags", "key"),
    "sequence": ("table", "instance_flags", "flags", "function"),
}
# Reply attributes after `status`, in order (3.7 layout); 3.11+ puts
# `flags` right after status in every reply.
REPLY_37 = {
    "open": ("flags",),
    "lookup": ("value",),
    "update": (),
    "delete": (),
    "sequence": ("key", "value"),
}
INTEGER_ATTRS = frozenset({"flags", "instance_flags", "function"})

# the defaults of proxymap_max_attributes and proxymap_max_request_size
DEFAULT_MAX_ATTRS = int(DEFAULTS["proxymap_max_attributes"])
DEFAULT_MAX_MESSAGE = int(DEFAULTS["proxymap_max_request_size"])


class ProtocolError(Exception):
    """The byte stream cannot be framed any more: close the connection."""


class Decoder:
    """Incremental decoder of NUL-encoded attribute lists.

    feed() takes whatever bytes arrived and returns the complete lists found
    so far, each a list of (name, value) byte pairs, in order; with `limit`
    at most that many, the others staying buffered (`more` is then true and
    feed(b"", limit) returns the next ones). Bytes of an unfinished list
    stay buffered; bytes without a NUL that continue one are appended, not
    rescanned, so a request dribbled in small pieces costs its length, not
    its length squared. A list with too many attributes or too many bytes
    raises ProtocolError: framing is then lost for good.
    """

    __slots__ = ("buf", "max_attrs", "max_message", "more")

    def __init__(self, max_attrs: int = DEFAULT_MAX_ATTRS,
                 max_message: int = DEFAULT_MAX_MESSAGE):
        self.buf: bytes | bytearray = b""
        self.max_attrs = max_attrs
        self.max_message = max_message
        # the buffer may hold complete lists that a limit held back
        self.more = False

    def feed(self, data: bytes, limit: int = 0) -> list[list[tuple[bytes, bytes]]]:
        max_attrs, max_message = self.max_attrs, self.max_message
        if self.buf:
            if not self.more and b"\0" not in data:
                # the unfinished token goes on: nothing new to scan
                if type(self.buf) is bytes:
                    self.buf = bytearray(self.buf)
                self.buf += data
                if len(self.buf) > max_message:
                    raise ProtocolError(f"request larger than {max_message} bytes")
                return []
            buf = bytes(self.buf) + data
        else:
            buf = data
        self.more = False
        # One split does the scanning: tokens alternate name, value, name...
        # and an empty token where a name belongs ends a list. The last
        # token is whatever follows the last NUL (an unfinished token). With
        # a limit, no more tokens are split than `limit` lists can hold,
        # plus the one that shows a list has too many attributes.
        if limit:
            tokens = buf.split(b"\0", limit * (2 * max_attrs + 1) + 1)
        else:
            tokens = buf.split(b"\0")
        # Fast path: exactly one complete list (the usual read). Its names
        # sit at even positions, none empty, and it ends in "\0\0".
        n = len(tokens)
        if n % 2 == 0 and n >= 2 and not tokens[-1] and not tokens[-2] \
                and b"" not in tokens[0:-2:2]:
            if n // 2 - 1 > max_attrs:
                raise ProtocolError(f"more than {max_attrs} attributes in one request")
            if len(buf) - 1 > max_message:
                raise ProtocolError(f"request larger than {max_message} bytes")
            self.buf = b""
            return [list(zip(tokens[0:-2:2], tokens[1:-2:2]))]
        complete = n - 1
        out = []
        current: list[tuple[bytes, bytes]] = []
        i = 0
        pos = 0           # byte offset of token i
        list_start = 0    # byte offset where the current list began
        consumed = 0      # byte offset just after the last complete list
        while i < complete:
            name = tokens[i]
            if not name:
                if pos - list_start > max_message:
                    raise ProtocolError(f"request larger than {max_message} bytes")
                out.append(current)
                current = []
                i += 1
                pos += 1
                consumed = list_start = pos
                if len(out) == limit:
                    self.more = consumed < len(buf)
                    break
                continue
            if i + 1 >= complete:
                break
            value = tokens[i + 1]
            current.append((name, value))
            if len(current) > max_attrs:
                raise ProtocolError(f"more than {max_attrs} attributes in one request")
            i += 2
            pos += len(name) + len(value) + 2
        self.buf = buf[consumed:] if consumed else buf
        if not self.more and len(self.buf) > max_message:
            raise ProtocolError(f"request larger than {max_message} bytes")
        return out

    @property
    def pending(self) -> int:
        return len(self.buf)


def encode(pairs) -> bytes:
    """Encode (name, value) pairs, values str/bytes/int, as one list."""
    out = bytearray()
    for name, value in pairs:
        out += name.encode() if isinstance(name, str) else name
        out += b"\0"
        if isinstance(value, int):
            out += str(value & 0xFFFFFFFF).encode()
        elif isinstance(value, str):
            out += value.encode()
        else:
            out += value
        out += b"\0"
    out += b"\0"
    return bytes(out)


@dataclass(slots=True)
class Request:
    """One well-formed request. `layout` is 37 or 311."""

    name: str
    table: str = ""
    flags: int = 0
    instance_flags: int | None = None
    key: bytes = b""
    value: bytes = b""
    function: int = 0
    layout: int = 37


class BadRequest(Exception):
    """A request that is answered with BAD. `name` is the request name if
    known (it decides the reply's attributes), `layout` the layout seen."""

    def __init__(self, reason: str, name: str | None = None, layout: int = 37):
        super().__init__(reason)
        self.reason = reason
        self.name = name
        self.layout = layout


def parse_uint(text: bytes) -> int:
    """Postfix reads integers as C's sscanf("%u") does and refuses any byte
    after the digits (checked against real postmap: `0 ` and `0abc` are
    malformed). Leading blanks and one sign are accepted; the magnitude
    saturates at 2**64-1 (strtoul), a minus sign negates modulo 2**64, and
    the result is cut to 32 bits. Anything else is BAD."""
    s = text.lstrip(b" \t\n\r\f\v")
    body = s[1:] if s[:1] in (b"+", b"-") else s
    digits = len(body) - len(body.lstrip(b"0123456789"))
    if not digits or digits != len(body):
        raise ValueError(f"malformed numerical data {text!r}")
    magnitude = int(body)
    if magnitude > 0xFFFFFFFFFFFFFFFF:
        value = 0xFFFFFFFFFFFFFFFF
    elif s[:1] == b"-":
        value = -magnitude & 0xFFFFFFFFFFFFFFFF
    else:
        value = magnitude
    return value & 0xFFFFFFFF


def parse_request(attrs: list[tuple[bytes, bytes]]) -> Request:
    """Check one decoded list against the request layouts; raise BadRequest."""
    if len(attrs) == 4:   # the common case, a 3.6-3.10 lookup, checked briefly
        (n0, v0), (n1, v1), (n2, v2), (n3, v3) = attrs
        if (n0 == b"request" and v0 == b"lookup" and n1 == b"table" and n2 == b"flags"
                and n3 == b"key" and v2.isdigit() and len(v2) <= 10):
            return Request("lookup", v1.decode("utf-8", "surrogateescape"),
                           int(v2) & 0xFFFFFFFF, None, v3)
    if not attrs or attrs[0][0] != b"request":
        raise BadRequest("unexpected attribute %r (expecting: request)"
                         % (attrs[0][0].decode("latin-1") if attrs else ""))
    name = attrs[0][1].decode("latin-1")
    if name not in LAYOUT_37:
        raise BadRequest(f"unrecognized request: {name!r}")
    rest = attrs[1:]
    layout = 311 if len(rest) > 1 and rest[1][0] == b"instance_flags" else 37
    expected = (LAYOUT_311 if layout == 311 else LAYOUT_37)[name]
    if len(rest) < len(expected):
        missing = expected[len(rest)] if all(
            n.decode("latin-1") == e for (n, _), e in zip(rest, expected)) else None
        raise BadRequest(f"missing attribute {missing or expected[-1]} in {name} request",
                         name, layout)
    if len(rest) > len(expected):
        raise BadRequest(f"unexpected attribute {rest[len(expected)][0].decode('latin-1')!r}"
                         f" in {name} request", name, layout)
    req = Request(name, layout=layout)
    for (attr, value), want in zip(rest, expected):
        if attr.decode("latin-1") != want:
            raise BadRequest(f"unexpected attribute {attr.decode('latin-1')!r}"
                             f" (expecting: {want})", name, layout)
        if want in INTEGER_ATTRS:
            try:
                setattr(req, want, parse_uint(value))
            except ValueError as exc:
                raise BadRequest(f"{want}: {exc}", name, layout) from None
        elif want == "table":
            req.table = value.decode("utf-8", "surrogateescape")
        else:
            setattr(req, want, value)
    if layout == 311 and name == "open":
        req.flags = req.instance_flags
    return req


_HOT_LOOKUP_HEAD = b"request\0lookup\0table\0"


def split_hot_lookup_python(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(table, flags, key), the raw values, when `data` is exactly one
    complete 3.6-3.10 lookup list (request, table, flags, key in this order,
    nothing before or after it); None for anything else, whatever it is.
    For the worker's hot path: what Decoder.feed and parse_request would
    make of such bytes, without the general machinery."""
    if not data.startswith(_HOT_LOOKUP_HEAD) or not data.endswith(b"\0\0"):
        return None
    tokens = data.split(b"\0")
    if len(tokens) != 10 or tokens[4] != b"flags" or tokens[6] != b"key":
        return None
    return tokens[3], tokens[5], tokens[7]


_HOT_OPEN_HEAD = b"request\0open\0table\0"


def split_hot_open(data: bytes) -> tuple[bytes, bytes] | None:
    """(table, flags), the raw values, when `data` is exactly one complete
    open list spelled as 3.6-3.10 clients send it (request, table, flags in
    this order, nothing before or after it); None for anything else. For
    the worker's prepared open reply (Dispatcher.open_reply): what
    Decoder.feed would make of such bytes, without the general machinery."""
    if not data.startswith(_HOT_OPEN_HEAD) or not data.endswith(b"\0\0"):
        return None
    tokens = data.split(b"\0")
    if len(tokens) != 8 or tokens[4] != b"flags":
        return None
    return tokens[3], tokens[5]


#: set to anything but "" or "0": the pure-Python hot path even where the
#: compiled one was built
PURE_PYTHON_ENV = "PROXYMAP_PURE_PYTHON"


def load_hotpath(environ=os.environ):
    """The compiled hot path module, or None (not built, or not wanted)."""
    if environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    try:
        from proxymap import _hotpath
    except ImportError:
        return None
    return _hotpath


HOTPATH = load_hotpath()
IMPLEMENTATION = "pure Python" if HOTPATH is None else "compiled (proxymap._hotpath)"
split_hot_lookup = split_hot_lookup_python if HOTPATH is None else HOTPATH.split_hot_lookup


_BAD_PREFIX = b"status\0%d\0" % BAD


def is_bad_reply(reply: bytes) -> bool:
    """True for an encoded reply whose status is BAD (every reply layout
    starts with its status)."""
    return reply.startswith(_BAD_PREFIX)


def encode_reply(name: str | None, status: int, layout: int = 37,
                 flags: int = 0, key: bytes = b"", value: bytes = b"") -> bytes:
    """The reply list for request `name` (None: unknown request, status only)."""
    if layout == 37:
        if name == "lookup":
            return b"status\0%d\0value\0%s\0\0" % (status, value)
        if name == "update" or name == "delete":    # REPLY_37: the status alone
            return b"status\0%d\0\0" % status
    pairs = [("status", status)]
    if name is None:
        return encode(pairs)
    if layout == 311 and name != "open":
        pairs.append(("flags", flags))
    for attr in REPLY_37[name]:
        pairs.append((attr, {"flags": flags, "key": key, "value": value}[attr]))
    return encode(pairs)
