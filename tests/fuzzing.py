"""Hostile proxymap requests for tests: generators, mutators, reply checks.

Shared by tests/test_fuzz.py (property tests and socket fuzz runs) and by
later reliability tests. Everything is driven by a `random.Random` so a
failing run can be replayed from its seed, plus hypothesis strategies for
the property tests. The requests follow the 3.7 and 3.11+ layouts of
Postfix's proxymap protocol (see proxymap/protocol.py); the mutations are
the ways a broken or hostile client can deviate from them: cut lists,
stray NULs, wrong order, duplicated or unknown attributes, junk numbers,
overlong names and values.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import strategies as st

from proxymap.client import read_greeting
from proxymap.protocol import (INTEGER_ATTRS, LAYOUT_37, LAYOUT_311, REPLY_37, Decoder,
                               encode)

REQUEST_NAMES = tuple(LAYOUT_37)
#: attribute names a reply may carry (3.7 and 3.11+ layouts)
REPLY_ATTRS = frozenset({"status", "flags", "key", "value"})
#: flags words real clients send (open, lookup with UTF-8 + LOCK, 0)
COMMON_FLAGS = (0, 28, 524353, 524288, 16384, 64, 4294967295)
NUMBER_JUNK = (b"", b"abc", b"-", b"+", b"0x10", b"1 ", b"7abc", b"--1", b"\xff",
               b"99999999999999999999999", b"-1", b" 3", b"4294967296")
TABLE_JUNK = ("", "nocolon", ":", ":x", "x:", "proxy:", "proxy:proxy:hash:/etc/aliases",
              "hash:../../etc/shadow", "hash:/etc/shadow", "unix:passwd.byname",
              "hash:$config_directory/aliases", "unionmap:{hash:/etc/aliases}",
              "environ:", "fail:oops", "static:{x}", "texthash:/etc/passwd",
              "tcp:localhost:25", "ldap:/etc/postfix/ldap.cf", "hash:\xff\xfe")


# -- well-formed requests --------------------------------------------------------------

def request_pairs(name: str, table: str, *, layout: int = 37, flags: int = 0,
                  instance_flags: int = 0, key: bytes = b"", value: bytes = b"",
                  function: int = 0) -> list[tuple[str, object]]:
    """The attribute pairs of one well-formed request, in protocol order."""
    fields = {"table": table, "flags": flags, "instance_flags": instance_flags,
              "key": key, "value": value, "function": function}
    order = (LAYOUT_311 if layout == 311 else LAYOUT_37)[name]
    return [("request", name)] + [(attr, fields[attr]) for attr in order]


def random_key(rng: random.Random, keys=()) -> bytes:
    """A known key, a case variant of one, or random bytes without NUL."""
    choice = rng.random()
    if keys and choice < 0.5:
        return rng.choice(keys).encode()
    if keys and choice < 0.6:
        return rng.choice(keys).upper().encode()
    return bytes(rng.choice(range(1, 256)) for _ in range(rng.randrange(0, 40)))


def well_formed(rng: random.Random, tables, keys=()) -> list[tuple[str, object]]:
    """A random request that parses: any request name, either layout, a
    table from `tables` (or junk), plausible or random flags."""
    name = rng.choice(REQUEST_NAMES)
    table = rng.choice(tables) if tables and rng.random() < 0.8 else rng.choice(TABLE_JUNK)
    if rng.random() < 0.1:
        table = "proxy:" + table
    flags = rng.choice(COMMON_FLAGS) if rng.random() < 0.8 else rng.getrandbits(32)
    return request_pairs(name, table, layout=311 if rng.random() < 0.25 else 37,
                         flags=flags, instance_flags=rng.choice((0, 0, 65536, 4)),
                         key=random_key(rng, keys),
                         value=random_key(rng, keys),
                         function=rng.choice((0, 1, 1, 2, 4294967295)))


# -- mutations ------------------------------------------------------------------------

def _pairs_mutation(rng: random.Random, pairs: list) -> list:
    pairs = list(pairs)
    op = rng.randrange(8)
    i = rng.randrange(len(pairs))
    if op == 0:                                   # drop an attribute
        del pairs[i]
    elif op == 1:                                 # duplicate one
        pairs.insert(i, pairs[i])
    elif op == 2 and len(pairs) > 1:              # swap two
        j = rng.randrange(len(pairs))
        pairs[i], pairs[j] = pairs[j], pairs[i]
    elif op == 3:                                 # unknown attribute
        pairs.insert(i, (rng.choice(("extra", "Request", "TABLE", "status", "x" * 300)), b"v"))
    elif op == 4:                                 # junk in a number
        nums = [k for k, (n, _) in enumerate(pairs) if n in INTEGER_ATTRS]
        if nums:
            k = rng.choice(nums)
            pairs[k] = (pairs[k][0], rng.choice(NUMBER_JUNK))
    elif op == 5:                                 # another request name
        pairs[0] = ("request", rng.choice((b"frobnicate", b"", b"LOOKUP", b"open ",
                                           b"lookup\xff", b"close")))
    elif op == 6:                                 # hostile table name
        for k, (n, _) in enumerate(pairs):
            if n == "table":
                pairs[k] = ("table", rng.choice(TABLE_JUNK))
    else:                                         # long key, rarely huge
        size = 100_000 if rng.random() < 0.02 else rng.choice((300, 1000, 3000))
        pairs.append(("key", b"k" * size))
    return pairs


def _bytes_mutation(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(7)
    i = rng.randrange(len(buf) + 1)
    if op == 0 and buf:                           # flip a byte
        i = min(i, len(buf) - 1)
        buf[i] = rng.randrange(256)
    elif op == 1:                                 # stray NUL
        buf.insert(i, 0)
    elif op == 2:                                 # cut out a slice
        del buf[i:i + rng.randrange(1, 10)]
    elif op == 3:                                 # repeat a slice
        buf[i:i] = buf[i:i + rng.randrange(1, 20)]
    elif op == 4:                                 # random bytes
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    elif op == 5:                                 # truncate
        del buf[i:]
    else:                                         # drop a NUL (merges fields)
        nuls = [k for k, b in enumerate(buf) if b == 0]
        if nuls:
            del buf[rng.choice(nuls)]
    return bytes(buf)


def mutated(rng: random.Random, tables, keys=()) -> bytes:
    """Encoded bytes of a request broken at the attribute or byte level
    (sometimes both, sometimes several times). The result may be anything:
    an incomplete list, several lists, or a well-formed request again."""
    pairs = well_formed(rng, tables, keys)
    for _ in range(rng.choice((0, 1, 1, 2))):
        pairs = _pairs_mutation(rng, pairs)
    data = encode(pairs)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        data = _bytes_mutation(rng, data)
    return data


def garbage(rng: random.Random) -> bytes:
    """Random bytes, NUL-rich so that they form lists now and then."""
    alphabet = b"\0\0\0requstlokpfagyvn=:0123456789\xff "
    return bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 80)))


def fuzz_message(rng: random.Random, tables, keys=()) -> bytes:
    """One fuzz message: 20% well-formed, 65% mutated, 15% garbage."""
    roll = rng.random()
    if roll < 0.2:
        return encode(well_formed(rng, tables, keys))
    if roll < 0.85:
        return mutated(rng, tables, keys)
    return garbage(rng)


#: bytes that bring the server's decoder back to a list boundary from any
#: state (inside a name, inside a value, or at a list start); each extra
#: NUL at a list start is an empty list, answered with BAD
RESYNC = b"\0\0\0"


# -- reply checks -----------------------------------------------------------------------

def reply_problem(attrs: list[tuple[bytes, bytes]]) -> str | None:
    """Why a decoded reply is not one a proxymap server may send, or None.

    A reply starts with `status` 0..5 and carries only reply attributes,
    each at most once, in one of the documented layouts."""
    if not attrs or attrs[0][0] != b"status":
        return f"reply does not start with status: {attrs[:2]!r}"
    if attrs[0][1] not in (b"0", b"1", b"2", b"3", b"4", b"5"):
        return f"status out of range: {attrs[0][1]!r}"
    names = [n.decode("latin-1") for n, _ in attrs[1:]]
    if any(n not in REPLY_ATTRS for n in names) or len(set(names)) != len(names):
        return f"unexpected reply attributes {names}"
    layouts = {()} | {tuple(v) for v in REPLY_37.values()} | \
        {("flags",) + tuple(v) for v in REPLY_37.values()}
    if tuple(names) not in layouts:
        return f"reply attributes not in any layout: {names}"
    if "flags" in names and not dict(attrs)[b"flags"].isdigit():
        return f"flags not a number: {dict(attrs)[b'flags']!r}"
    return None


class ReplyTally:
    """Counts replies by status name and remembers the first problem."""

    NAMES = {b"0": "OK", b"1": "NOKEY", b"2": "RETRY", b"3": "BAD", b"4": "DENY",
             b"5": "CONFIG"}

    def __init__(self):
        self.by_status: Counter = Counter()
        self.problems: list[str] = []

    def add(self, attrs) -> None:
        problem = reply_problem(attrs)
        if problem:
            self.problems.append(problem)
            return
        self.by_status[self.NAMES[attrs[0][1]]] += 1

    def merge(self, other: "ReplyTally") -> None:
        self.by_status.update(other.by_status)
        self.problems += other.problems


def decode_all(data: bytes) -> list:
    """All complete lists in data (replies are small; generous limits)."""
    return Decoder(max_attrs=64, max_message=1 << 24).feed(data)


# -- hypothesis strategies ------------------------------------------------------------

names = st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b)
values = st.binary(max_size=40).filter(lambda b: b"\0" not in b)
attr_lists = st.lists(st.tuples(names, values), max_size=10)
numbers = st.one_of(st.integers(-(1 << 70), 1 << 70).map(lambda n: str(n).encode()),
                    st.sampled_from(NUMBER_JUNK),
                    st.binary(max_size=12).filter(lambda b: b"\0" not in b))


@st.composite
def requests(draw, tables=("hash:/etc/aliases", "inline:{a=b}")):
    """Well-formed request pairs (either layout), values as bytes/int."""
    name = draw(st.sampled_from(REQUEST_NAMES))
    return request_pairs(
        name, draw(st.sampled_from(tables)), layout=draw(st.sampled_from((37, 311))),
        flags=draw(st.integers(0, 0xFFFFFFFF)),
        instance_flags=draw(st.integers(0, 0xFFFFFFFF)),
        key=draw(values), value=draw(values), function=draw(st.integers(0, 0xFFFFFFFF)))


@st.composite
def hostile_lists(draw):
    """Attribute lists near the request grammar: a well-formed request with
    attributes dropped, duplicated, renamed, reordered or given junk."""
    pairs = [(n.encode(), v if isinstance(v, bytes) else str(v).encode())
             for n, v in draw(requests())]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(pairs)))
        if op == 0 and pairs:
            del pairs[min(i, len(pairs) - 1)]
        elif op == 1 and pairs:
            j = draw(st.integers(0, len(pairs) - 1))
            pairs.insert(i, pairs[j])
        elif op == 2:
            pairs.insert(i, (draw(names), draw(values)))
        elif op == 3 and pairs:
            k = min(i, len(pairs) - 1)
            pairs[k] = (pairs[k][0], draw(numbers))
        elif op == 4 and len(pairs) > 1:
            j = draw(st.integers(0, len(pairs) - 1))
            k = min(i, len(pairs) - 1)
            pairs[j], pairs[k] = pairs[k], pairs[j]
    return pairs


# -- one fuzzing connection -----------------------------------------------------------

class ConnectionResult:
    """What one fuzzing connection saw. `expected_lists` is how many lists
    a decoder with the server's limits finds in what we sent (None when
    those bytes break a framing limit, so the server must hang up)."""

    __slots__ = ("sent", "tally", "closed", "sentinel_ok", "replies", "expected_lists")

    def __init__(self):
        self.sent = 0
        self.tally = ReplyTally()
        self.closed = False
        self.sentinel_ok = False
        self.replies = 0
        self.expected_lists: int | None = 0


def fuzz_connection(path: str, rng: random.Random, count: int, tables, keys,
                    sentinel: bytes, sentinel_value: bytes, *, max_attrs: int,
                    max_message: int, timeout: float = 30.0) -> ConnectionResult:
    """Send `count` fuzz messages on one connection, then RESYNC and the
    well-formed `sentinel` request (whose reply carries `sentinel_value`),
    and read every reply up to the sentinel's or until the server closes.

    Every reply is checked with reply_problem(). A decoder with the server's
    limits tells how many lists the server must answer: exactly that many
    replies (the sentinel's last) unless a limit is broken, in which case
    the server must close the connection instead.
    """
    import socket

    from proxymap.protocol import GREETING, ProtocolError

    result = ConnectionResult()
    # Mostly a message is followed by the NULs (0-3) that end whatever list
    # it left open, so that one broken message does not glue the next ones
    # into an overlong list; now and then they run together.
    model = Decoder(max_attrs, max_message)
    parts = []
    for _ in range(count):
        parts.append(fuzz_message(rng, tables, keys))
        if model is None:
            continue
        try:
            model.feed(parts[-1])
            while model.pending and rng.random() < 0.9:
                parts.append(b"\0")
                model.feed(b"\0")
        except ProtocolError:
            model = None   # a limit is broken: the server will hang up
    payload = b"".join(parts) + RESYNC
    result.sent = count
    try:
        result.expected_lists = len(Decoder(max_attrs, max_message).feed(payload + sentinel))
    except ProtocolError:
        result.expected_lists = None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    decoder = Decoder(max_attrs=64, max_message=1 << 24)
    try:
        sock.connect(path)
        greeting = read_greeting(sock)
        if len(greeting) < len(GREETING):
            raise AssertionError("server closed before its greeting")
        assert greeting == GREETING, greeting
        try:
            sock.sendall(payload + sentinel)
        except (BrokenPipeError, ConnectionResetError):
            result.closed = True
        while not result.closed and not result.sentinel_ok:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                result.closed = True
                break
            for attrs in decoder.feed(data):
                result.replies += 1
                if dict(attrs).get(b"value") == sentinel_value:
                    result.sentinel_ok = True
                else:
                    result.tally.add(attrs)
        if decoder.pending:
            result.tally.problems.append(f"{decoder.pending} bytes of an unfinished reply")
    finally:
        sock.close()
    return result
