"""Request logic without sockets: access lists, statuses, sharing, surrogates."""

import pytest

from proxymap import dictflags as F
from proxymap.dispatch import Dispatcher, SurrogateTable
from proxymap.protocol import Decoder, encode
from proxymap.tables import Table, TableError, TableOpenError
from proxymap.tables.base import snapshot_walk


class MemTable(Table):
    """A dict-backed table that records the flags it saw."""

    opened = []
    data = {}

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        MemTable.opened.append(self)
        self.seen_flags = []
        self.items = MemTable.data.setdefault(name, {})

    def lookup(self, key):
        self.seen_flags.append(self.flags)
        return self.items.get(self.fold(key))

    def update(self, key, value):
        self.seen_flags.append(self.flags)
        self.items[self.fold(key)] = value
        return True

    def delete(self, key):
        return self.items.pop(self.fold(key), None) is not None

    def walk(self, position):
        return snapshot_walk(position, lambda: sorted(self.items), self.items.get)


def opener(spec, flags, writable, params):
    type_name, _, name = spec.partition(":")
    if type_name == "mem":
        return MemTable(type_name, name, flags, writable, params)
    if type_name == "broken":
        raise TableOpenError("cannot open: no such file")
    if type_name == "crash":
        t = MemTable(type_name, name, flags, writable, params)
        t.lookup = lambda key: 1 / 0
        return t
    if type_name == "fail":
        t = MemTable(type_name, name, flags, writable, params)
        def boom(key):
            raise TableError("fail:x: table lookup failed")
        t.lookup = boom
        return t
    raise TableOpenError("unsupported dictionary type")


@pytest.fixture(autouse=True)
def fresh():
    MemTable.opened = []
    MemTable.data = {"a": {b"foo": b"bar"}}


def req(**attrs):
    return Decoder().feed(encode(list(attrs.items())))[0]


def reply(raw):
    return dict(Decoder().feed(raw)[0])


ALLOWED = {"mem:a", "mem:b", "broken:x", "crash:x", "fail:x"}


def read_service():
    return Dispatcher("proxymap", ALLOWED, {}, opener=opener)


def write_service():
    return Dispatcher("proxywrite", ALLOWED, {}, opener=opener)


def test_lookup_found_and_not_found():
    d = read_service()
    assert reply(d.handle(req(request="lookup", table="mem:a", flags=0, key="foo"))) == \
        {b"status": b"0", b"value": b"bar"}
    assert reply(d.handle(req(request="lookup", table="mem:a", flags=0, key="nope"))) == \
        {b"status": b"1", b"value": b""}


def test_proxy_prefixes_are_stripped_and_names_need_a_colon():
    d = read_service()
    r = reply(d.handle(req(request="lookup", table="proxy:proxy:mem:a", flags=0, key="foo")))
    assert r[b"status"] == b"0"
    assert reply(d.handle(req(request="open", table="nocolon", flags=0))) == \
        {b"status": b"3", b"flags": b"0"}


def test_unlisted_table_is_denied_on_every_request():
    d = write_service()
    assert reply(d.handle(req(request="open", table="mem:zzz", flags=0)))[b"status"] == b"4"
    for r in (req(request="lookup", table="mem:zzz", flags=0, key="k"),
              req(request="update", table="mem:zzz", flags=0, key="k", value="v"),
              req(request="delete", table="mem:zzz", flags=0, key="k"),
              req(request="sequence", table="mem:zzz", flags=0, function=0)):
        assert reply(d.handle(r))[b"status"] == b"4"
    assert MemTable.opened == []


def test_writes_on_the_read_service_are_denied_before_opening():
    d = read_service()
    assert d.handle(req(request="update", table="mem:a", flags=0, key="k", value="v")) == \
        b"status\x004\0\0"
    assert d.handle(req(request="delete", table="mem:a", flags=0, key="foo")) == b"status\x004\0\0"
    assert MemTable.opened == []


def test_sequence_is_allowed_on_the_read_service():
    d = read_service()
    r = reply(d.handle(req(request="sequence", table="mem:a", flags=0, function=0)))
    assert r == {b"status": b"0", b"key": b"foo", b"value": b"bar"}


def test_one_shared_instance_per_table_and_instance_flags():
    d = read_service()
    for _ in range(3):
        d.handle(req(request="lookup", table="mem:a", flags=F.LOCK, key="foo"))
    d.handle(req(request="open", table="mem:a", flags=0))
    assert len(MemTable.opened) == 1
    d.handle(req(request="open", table="mem:a", flags=F.OPEN_LOCK))
    assert len(MemTable.opened) == 2


def test_request_bits_replace_the_previous_ones():
    d = write_service()
    d.handle(req(request="lookup", table="mem:a", flags=F.LOCK | F.FOLD_FIX, key="FOO"))
    d.handle(req(request="update", table="mem:a", flags=F.LOCK, key="k", value="v"))
    t = MemTable.opened[0]
    assert t.seen_flags[0] & F.FOLD_FIX and t.seen_flags[0] & F.LOCK
    assert not t.seen_flags[1] & F.FOLD_FIX
    assert t.seen_flags[1] & (F.SYNC_UPDATE | F.DUP_REPLACE) == F.SYNC_UPDATE | F.DUP_REPLACE


def test_open_reply_carries_the_implementation_bits():
    r = reply(read_service().handle(req(request="open", table="mem:a", flags=0)))
    assert r[b"status"] == b"0" and int(r[b"flags"]) & F.FIXED


def test_open_failure_is_ok_on_open_and_retry_after():
    d = read_service()
    assert reply(d.handle(req(request="open", table="broken:x", flags=0))) == \
        {b"status": b"0", b"flags": str(F.PATTERN).encode()}
    assert reply(d.handle(req(request="lookup", table="broken:x", flags=0, key="k")))[b"status"] == b"2"
    assert isinstance(d.tables[("broken:x", 0, 37)], SurrogateTable)


def test_failed_open_is_retried_later(monkeypatch):
    d = read_service()
    d.handle(req(request="lookup", table="broken:x", flags=0, key="k"))
    surrogate = d.tables[("broken:x", 0, 37)]
    surrogate.failed_at -= 3600
    d.handle(req(request="lookup", table="broken:x", flags=0, key="k"))
    assert d.tables[("broken:x", 0, 37)] is not surrogate


def test_table_error_is_retry_and_a_bug_is_retry_not_a_crash():
    d = read_service()
    assert reply(d.handle(req(request="lookup", table="fail:x", flags=0, key="k")))[b"status"] == b"2"
    assert reply(d.handle(req(request="lookup", table="crash:x", flags=0, key="k")))[b"status"] == b"2"


def test_unsupported_operation_is_config():
    # The base Table has no update: Postfix 3.7 aborts here, we answer CONFIG.
    class Plain(Table):
        pass
    d = Dispatcher("proxywrite", {"plain:x"}, {},
                   opener=lambda *a: Plain("plain", "x", 0, True, {}))
    assert d.handle(req(request="update", table="plain:x", flags=0, key="k", value="v")) == \
        b"status\x005\0\0"
    assert reply(d.handle(req(request="sequence", table="plain:x", flags=0, function=1)))[b"status"] == b"5"


def test_bad_sequence_function_and_flags():
    d = read_service()
    assert reply(d.handle(req(request="sequence", table="mem:a", flags=0, function=2))) == \
        {b"status": b"3", b"key": b"", b"value": b""}
    assert reply(d.handle(req(request="lookup", table="mem:a", flags="abc", key="k")))[b"status"] == b"3"


def test_flags_minus_one_is_served_not_fatal():
    d = read_service()
    r = reply(d.handle(req(request="lookup", table="mem:a", flags="-1", key="FOO")))
    assert r == {b"status": b"0", b"value": b"bar"}


def test_utf8_layer_folds_unicode_and_rejects_bad_keys():
    MemTable.data["a"] = {"grüsse".encode(): b"x"}   # postmap stores casefolded keys
    d = read_service()
    flags = F.UTF8_REQUEST | F.FOLD_FIX
    r = reply(d.handle(req(request="lookup", table="mem:a", flags=flags, key="GRÜßE".encode())))
    assert r == {b"status": b"0", b"value": b"x"}  # full casefold: ß -> ss
    r = reply(read_service().handle(
        req(request="lookup", table="mem:a", flags=F.FOLD_FIX, key="GRÜSSE".encode())))
    assert r[b"status"] == b"1"  # instance without UTF-8 layer: ASCII folding only, Ü stays
    r = reply(d.handle(req(request="lookup", table="mem:a", flags=flags, key=b"\xff")))
    assert r == {b"status": b"1", b"value": b""}


def test_311_layout_replies_with_flags():
    d = read_service()
    raw = req(request="lookup", table="mem:a", instance_flags=0, flags=0, key="foo")
    r = Decoder().feed(d.handle(raw))[0]
    assert [n for n, _ in r] == [b"status", b"flags", b"value"]
    assert r[0][1] == b"0" and r[2][1] == b"bar"


# -- walks kept per connection; 3.11 flags rules --------------------------------------------

def seq(table, function, layout=37, flags=0):
    if layout == 311:
        return req(request="sequence", table=table, instance_flags=0, flags=flags,
                   function=function)
    return req(request="sequence", table=table, flags=flags, function=function)


def walk_keys(d, walks, table="mem:w", layout=37, first=True):
    r = reply(d.handle(seq(table, 0 if first else 1, layout), walks))
    return r[b"key"] if r[b"status"] == b"0" else None


def test_walks_are_per_connection_and_survive_reopens():
    MemTable.data["w"] = {b"a": b"1", b"b": b"2", b"c": b"3", b"d": b"4"}
    d = Dispatcher("proxymap", {"mem:w"}, {}, opener=opener)
    one, two = {}, {}
    assert walk_keys(d, one) == b"a"
    assert walk_keys(d, two) == b"a"
    assert walk_keys(d, one, first=False) == b"b"
    # the instance is reopened (its file changed): both walks go on
    table = d.tables[("mem:w", 0, 37)]
    table.changed = lambda: True
    assert walk_keys(d, one, first=False) == b"c"
    assert d.tables[("mem:w", 0, 37)] is not table
    assert walk_keys(d, two, first=False) == b"b"
    del MemTable.data["w"][b"d"]          # gone before the walk reached it
    assert walk_keys(d, one, first=False) is None
    assert walk_keys(d, one, first=False) is None
    assert [walk_keys(d, two, first=False) for _ in range(2)] == [b"c", None]


def test_311_open_reports_fresh_flags_and_every_reply_carries_flags():
    d = read_service()
    fresh = reply(d.handle(req(request="open", table="mem:a", instance_flags=F.UTF8_REQUEST)))
    assert int(fresh[b"flags"]) == F.UTF8_REQUEST | F.UTF8_ACTIVE | F.FIXED
    r = reply(d.handle(req(request="lookup", table="mem:a", instance_flags=F.UTF8_REQUEST,
                           flags=F.UTF8_REQUEST | F.LOCK | F.FIXED, key="foo")))
    assert r == {b"status": b"0", b"flags": str(F.UTF8_REQUEST | F.LOCK | F.FIXED).encode(),
                 b"value": b"bar"}
    # what that lookup did to the shared word does not show in a later open
    again = reply(d.handle(req(request="open", table="mem:a", instance_flags=F.UTF8_REQUEST)))
    assert again == fresh
    # temporary errors carry the request's word, refusals carry 0
    r = reply(d.handle(req(request="lookup", table="broken:x", instance_flags=0, flags=64,
                           key="k")))
    assert (r[b"status"], r[b"flags"]) == (b"2", b"64")
    r = reply(d.handle(req(request="lookup", table="mem:none", instance_flags=0, flags=64,
                           key="k")))
    assert (r[b"status"], r[b"flags"]) == (b"4", b"0")
    # a 3.11 surrogate says so as 3.11 does (bit 0) on open
    r = reply(d.handle(req(request="open", table="broken:x", instance_flags=0)))
    assert int(r[b"flags"]) == F.PATTERN | F.SURROGATE_311


def test_types_listed_only_by_311_refuse_older_layouts():
    MemTable.data["w"] = {b"a": b"1"}

    class Since311(MemTable):
        sequence_since_311 = True
    d = Dispatcher("proxymap", {"mem:w"}, {},
                   opener=lambda spec, *a: Since311("mem", "w", *a))
    assert reply(d.handle(seq("mem:w", 0)))[b"status"] == b"5"
    r = reply(d.handle(seq("mem:w", 0, layout=311)))
    assert (r[b"status"], r[b"key"]) == (b"0", b"a")
