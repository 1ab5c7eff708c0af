"""Prepared `open` replies (issue 11, item 5: cheaper connection set-up).

Every short-lived client (a one-shot `postmap -q`, an smtpd that exits)
opens its table before its first lookup. Dispatcher.open_reply answers an
open spelled like one the whole path answered before, from an instance
that still stands unchanged, without decoding it; these tests check that
it gives exactly what the whole path gives (reply bytes, counters,
instance flags), and that it steps aside whenever the whole path could
answer differently: a changed or reopened table, a 3.11 request, another
spelling, a table not on the allow-list, proxywrite. Then end to end: the
reply and the status counts a real worker gives many short sessions.
"""

from __future__ import annotations

import random

import pytest

from proxymap import dictflags as F
from proxymap.dispatch import Dispatcher
from proxymap.filewatch import FileWatcher
from proxymap.protocol import Decoder, ProtocolError, encode, split_hot_open
from tests.test_answercache import settle


def open_request(table: str, flags: int | bytes = F.LOCK | F.FOLD_FIX) -> bytes:
    return encode([("request", "open"), ("table", table),
                   ("flags", flags if isinstance(flags, bytes) else str(flags).encode())])


def lookup_request(table: str, key: bytes, flags: int = F.LOCK | F.FOLD_FIX) -> bytes:
    return encode([("request", "lookup"), ("table", table), ("flags", str(flags).encode()),
                   ("key", key)])


# -- the split ---------------------------------------------------------------------------

def decoder_view(data: bytes):
    """What the general path makes of `data`: (table, flags) when the
    decoder finds exactly one list, nothing left over, that is an open in
    the 3.6-3.10 order (Dispatcher.handle's test before it notes one)."""
    try:
        lists = Decoder(1000, 1 << 20).feed(data)
    except ProtocolError:
        return None
    if len(lists) != 1 or not data.endswith(b"\0\0") or len(b"".join(
            n + b"\0" + v + b"\0" for n, v in lists[0])) + 1 != len(data):
        return None
    attrs = lists[0]
    if [n for n, _ in attrs] != [b"request", b"table", b"flags"] or attrs[0][1] != b"open":
        return None
    return attrs[1][1], attrs[2][1]


def test_split_gives_the_raw_values_of_one_open():
    assert split_hot_open(open_request("hash:/etc/m", b"0064")) == (b"hash:/etc/m", b"0064")
    assert split_hot_open(b"request\0open\0table\0\0flags\0\0\0") == (b"", b"")


@pytest.mark.parametrize("data", [
    b"", b"\0", b"request\0open\0table\0t\0flags\0" + b"64\0",      # unfinished
    b"request\0open\0table\0t\0flags\x0064\0\0request\0open\0\0",  # two lists
    b"request\0open\0table\0t\0instance_flags\x0064\0\0",          # another order
    b"request\0open\0table\0t\0flags\x0064\0requester\0x\0\0",      # 3.11 extra
    b"request\0lookup\0table\0t\0flags\x0064\0key\0k\0\0",
    b"request\0open\0table\0t\0\0",
])
def test_split_refuses_anything_else(data):
    assert split_hot_open(data) is None
    assert decoder_view(data) is None


def test_split_agrees_with_the_decoder_on_random_input():
    rng = random.Random(5)
    words = [b"request", b"open", b"table", b"flags", b"", b"hash:/m", b"64", b"key",
             b"instance_flags", b"x"]
    seen = 0
    for _ in range(20000):
        tokens = [b"request", b"open", b"table", rng.choice(words), b"flags",
                  rng.choice(words), b"", b""]
        for _ in range(rng.randrange(3)):
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
        if rng.random() < 0.2:
            del tokens[rng.randrange(len(tokens))]
        if rng.random() < 0.2:
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(words))
        data = b"\0".join(tokens)
        expected = decoder_view(data)
        assert split_hot_open(data) == expected, data
        seen += expected is not None
    assert seen > 1000


# -- open_reply against the whole path -----------------------------------------------------

@pytest.fixture
def table_file(tmp_path):
    src = tmp_path / "map"
    src.write_text("".join(f"key{n} value{n}\n" for n in range(20)))
    settle(src)
    return f"texthash:{src}", src


def make_dispatcher(table, service="proxymap"):
    return Dispatcher(service, {table}, {}, watcher=FileWatcher(), cache_entries=8,
                      cache_bytes=10000)


def whole(d: Dispatcher, data: bytes) -> bytes:
    d.refresh()
    [attrs] = Decoder().feed(data)
    return d.handle(attrs)


def fast_or_whole(d: Dispatcher, data: bytes) -> tuple[bytes, bool]:
    """As the worker answers a first read: the prepared reply, else decoded."""
    d.refresh()
    reply = d.open_reply(data)
    if reply is not None:
        return reply, True
    return whole(d, data), False


def state(d: Dispatcher, table: str):
    c = d.metrics.table(table)
    return list(c.requests), sum(c.latency), sorted(t.flags for t in d.tables.values())


def test_a_repeated_open_gets_the_whole_paths_reply_and_counts(table_file):
    table, _ = table_file
    fast, slow = make_dispatcher(table), make_dispatcher(table)
    data = open_request(table)
    assert fast.open_reply(data) is None           # nothing answered yet
    answers = [fast_or_whole(fast, data) for _ in range(5)]
    assert [prepared for _, prepared in answers] == [False, True, True, True, True]
    assert {reply for reply, _ in answers} == {whole(slow, data)}
    for _ in range(4):
        whole(slow, data)
    assert state(fast, table) == state(slow, table)
    assert fast.metrics.table(table).requests == slow.metrics.table(table).requests


def test_the_reply_follows_the_flags_word_lookups_leave(table_file):
    table, _ = table_file
    fast, slow = make_dispatcher(table), make_dispatcher(table)
    data = open_request(table, F.FOLD_FIX)
    for d in (fast, slow):
        whole(d, data)
        # a lookup with other request bits changes the instance's word
        whole(d, lookup_request(table, b"key1", F.LOCK))
    reply, prepared = fast_or_whole(fast, data)
    assert prepared and reply == whole(slow, data)
    assert state(fast, table) == state(slow, table)


def test_a_changed_table_goes_back_to_the_whole_path(table_file):
    table, src = table_file
    d = make_dispatcher(table)
    data = open_request(table)
    whole(d, data)
    before = next(iter(d.tables.values()))
    src.write_text("other value\n")
    settle(src)
    reply, prepared = fast_or_whole(d, data)
    assert not prepared                         # the whole path reopened it
    after = next(iter(d.tables.values()))
    assert after is not before
    assert fast_or_whole(d, data) == (reply, True)  # and the new instance is prepared


def test_other_spellings_and_services_are_left_to_the_whole_path(table_file):
    table, _ = table_file
    d = make_dispatcher(table)
    whole(d, open_request(table, b"64"))
    assert d.open_reply(open_request(table, b"064")) is None     # same word, other bytes
    assert d.open_reply(encode([("request", "open"), ("table", table),
                                ("instance_flags", b"64"), ("requester", b"x")])) is None
    # a table off the allow-list is denied by the whole path, never prepared
    other = table + "x"
    whole(d, open_request(other))
    assert d.open_reply(open_request(other)) is None
    # 3.11's open is answered whole, never prepared
    whole(d, encode([("request", "open"), ("table", table), ("instance_flags", b"64"),
                     ("requester", b"x")]))
    assert len(d._opens) == 1
    w = make_dispatcher(table, service="proxywrite")
    whole(w, open_request(table))
    assert w.open_reply(open_request(table)) is None


def test_a_failed_open_is_never_prepared(tmp_path):
    table = f"texthash:{tmp_path}/missing"
    d = make_dispatcher(table)
    data = open_request(table)
    first = whole(d, data)
    assert d.open_reply(data) is None
    assert whole(d, data) == first


# -- end to end ------------------------------------------------------------------------------

def test_short_sessions_get_one_reply_and_are_all_counted(tmp_path):
    """Sessions as a one-shot postmap -q makes them (connect, greeting,
    open, lookup, close) on a real master and worker: after the first, the
    opens are answered prepared; every reply after the first is the same
    (the first lookup adds its request bits to the instance's word, as in
    Postfix), and the status counts every open and every lookup."""
    from proxymap.client import OK, ProxyClient
    from tests.instance import temporary_instance, wait_for
    sessions = 30
    with temporary_instance(tmp_path, main_extra={"max_use": "1000"}) as inst:
        inst.run_foreground()
        table = f"proxy:{inst.read_table}"
        replies = []
        for _ in range(sessions):
            with ProxyClient(inst.socket_path(), timeout=20, retries=0) as client:
                client.connect()
                replies.append(client.open(table, F.LOCK | F.FOLD_FIX))
                assert client.lookup(table, F.LOCK | F.FOLD_FIX, b"alice") == \
                    (OK, b"alice@example.org")
        assert {status for status, _ in replies} == {OK}
        assert len(set(replies[1:])) == 1

        def counted():
            tables = inst.status()["services"]["proxymap"]["tables"]
            return tables.get(inst.read_table, {}).get("requests")
        wait_for(lambda: counted() == {"open": {"OK": sessions}, "lookup": {"OK": sessions}},
                 20, what="the status counts of every session")
