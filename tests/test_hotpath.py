"""The worker's hot path in both forms: the pure-Python reference
(protocol.split_hot_lookup_python, Dispatcher.hot_reply) and the optional
compiled one (proxymap/_hotpath.c). Both get the same inputs and must give
the same results, the same counters and the same errors: direct cases, a
randomized comparison with a fixed seed, and the choice between them
(PROXYMAP_PURE_PYTHON). The whole suite runs once on each (`make test`)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest

from proxymap import dictflags as F
from proxymap import protocol
from proxymap.dispatch import Dispatcher, configure_hotpath
from proxymap.filewatch import FileWatcher
from proxymap.protocol import Decoder, encode, split_hot_lookup_python
from tests.instance import POSTMAP
from tests.test_answercache import settle

try:
    from proxymap import _hotpath as compiled
except ImportError:     # not built here: only the pure-Python form is tested
    compiled = None
else:                   # compared with the pure form even where that one serves
    configure_hotpath(compiled)

needs_compiled = pytest.mark.skipif(compiled is None, reason="proxymap._hotpath not built")
SPLITTERS = [pytest.param(split_hot_lookup_python, id="python"),
             pytest.param(getattr(compiled, "split_hot_lookup", None), id="compiled",
                          marks=needs_compiled)]

LOOKUP = b"request\0lookup\0table\0hash:/etc/map\0flags\00064\0key\0k@example.com\0\0"


# -- which form serves ------------------------------------------------------------------


def test_the_compiled_form_is_built_where_a_compiler_is():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the install goes on without the extension")
    assert compiled is not None, "pip install -e . did not build proxymap/_hotpath.c"


@needs_compiled
def test_the_environment_chooses_the_pure_form():
    assert protocol.load_hotpath({}) is compiled
    assert protocol.load_hotpath({"PROXYMAP_PURE_PYTHON": "0"}) is compiled
    assert protocol.load_hotpath({"PROXYMAP_PURE_PYTHON": ""}) is compiled
    assert protocol.load_hotpath({"PROXYMAP_PURE_PYTHON": "1"}) is None


def test_a_missing_extension_means_the_pure_form(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_hotpath" in fromlist:
            raise ImportError("no _hotpath")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    assert protocol.load_hotpath({}) is None


def test_implementation_names_the_form_in_use():
    assert (protocol.IMPLEMENTATION == "pure Python") == (protocol.HOTPATH is None)
    assert protocol.split_hot_lookup is (split_hot_lookup_python if protocol.HOTPATH is None
                                         else protocol.HOTPATH.split_hot_lookup)


# -- split_hot_lookup -------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITTERS)
def test_split_gives_the_raw_values_of_one_lookup(split):
    assert split(LOOKUP) == (b"hash:/etc/map", b"64", b"k@example.com")
    assert split(b"request\0lookup\0table\0\0flags\0\0key\0\0\0") == (b"", b"", b"")
    assert split(b"request\0lookup\0table\0t\xff\0flags\0 +1\0key\0\x80\x01\0\0") == \
        (b"t\xff", b" +1", b"\x80\x01")


@pytest.mark.parametrize("split", SPLITTERS)
@pytest.mark.parametrize("data", [
    b"",
    b"\0",
    LOOKUP[:-1],                                        # unfinished
    LOOKUP[:-2],
    LOOKUP + LOOKUP,                                    # two requests in one read
    LOOKUP + b"x",                                      # and the start of another
    b"x" + LOOKUP,
    LOOKUP.replace(b"lookup", b"update"),
    LOOKUP.replace(b"flags", b"flagz"),
    LOOKUP.replace(b"key\0", b"kex\0"),
    LOOKUP.replace(b"\0key\0", b"\0instance_flags\0"),
    b"request\0lookup\0table\0t\0instance_flags\0000\0flags\0000\0key\0k\0\0",   # 3.11
    b"request\0lookup\0table\0t\0flags\0000\0key\0k\0value\0v\0\0",
    b"request\0lookup\0table\0t\0flags\0000\0\0",
    b"request\0lookup\0table\0t\0key\0k\0flags\0000\0\0",
    b"request\0lookup\0table\0t\0flags\0000\0key\0k\0\0\0",
    b"request\0lookup\0table\0\0\0",
    b"request\0lookup\0table\0",
])
def test_split_refuses_anything_else(split, data):
    assert split(data) is None


@pytest.mark.parametrize("split", SPLITTERS)
def test_split_wants_bytes(split):
    with pytest.raises(TypeError):
        split(LOOKUP.decode("latin-1"))


def decoder_view(data: bytes):
    """What the general path makes of `data`: the three values when the
    decoder finds exactly one list, nothing left over, that is a 3.6-3.10
    lookup in the mandatory order (Dispatcher.handle's hot test)."""
    try:
        lists = Decoder(1000, 1 << 20).feed(data)
    except protocol.ProtocolError:
        return None
    if len(lists) != 1 or not data.endswith(b"\0\0") or len(b"".join(
            n + b"\0" + v + b"\0" for n, v in lists[0])) + 1 != len(data):
        return None
    attrs = lists[0]
    if [n for n, _ in attrs] != [b"request", b"table", b"flags", b"key"] \
            or attrs[0][1] != b"lookup":
        return None
    return attrs[1][1], attrs[2][1], attrs[3][1]


TOKENS = [b"request", b"lookup", b"table", b"flags", b"key", b"", b"", b"value", b"0064",
          b"hash:/m", b"k\xff", b"instance_flags", b"update", b"x"]


def random_request(rng: random.Random) -> bytes:
    if rng.random() < 0.5:      # mostly a lookup, with one thing changed
        tokens = [b"request", b"lookup", b"table", rng.choice(TOKENS), b"flags",
                  rng.choice(TOKENS), b"key", rng.choice(TOKENS), b"", b""]
        for _ in range(rng.randrange(3)):
            i = rng.randrange(len(tokens))
            tokens[i] = rng.choice(TOKENS)
        if rng.random() < 0.2:
            del tokens[rng.randrange(len(tokens))]
        data = b"\0".join(tokens)
    else:
        data = b"\0".join(rng.choice(TOKENS) for _ in range(rng.randrange(12))) + \
            b"\0" * rng.randrange(3)
    if rng.random() < 0.1:
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + bytes([rng.randrange(256)]) + data[cut:]
    return data


@pytest.mark.parametrize("split", SPLITTERS)
def test_split_agrees_with_the_decoder_on_random_input(split):
    rng = random.Random(11)
    seen = 0
    for _ in range(20000):
        data = random_request(rng)
        expected = decoder_view(data)
        assert split(data) == expected, data
        seen += expected is not None
    assert seen > 1000      # the comparison covered real lookups too


@needs_compiled
def test_both_splits_agree_on_random_bytes():
    rng = random.Random(3)
    alphabet = b"\0\0\0rekyft"
    for _ in range(20000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        if rng.random() < 0.5:
            data = b"request\0lookup\0table\0" + data
        assert compiled.split_hot_lookup(data) == split_hot_lookup_python(data), data


# -- hot_reply --------------------------------------------------------------------------


def request(table: str, key: bytes, flags: int | bytes = F.LOCK | F.FOLD_FIX) -> bytes:
    return encode([("request", "lookup"), ("table", table),
                   ("flags", flags if isinstance(flags, bytes) else str(flags).encode()),
                   ("key", key)])


def counters_of(d: Dispatcher, table: str):
    c = d.metrics.table(table)
    return list(c.requests), sum(c.latency)


def state(d: Dispatcher, table: str):
    instances = [t for regkey, t in d.tables.items() if regkey[0] == table]
    return (counters_of(d, table), d.cache_stats.as_dict(),
            sorted(t.flags for t in instances))


def pure_reply(d: Dispatcher, data: bytes):
    return Dispatcher.hot_reply(d, data)


def answer(d: Dispatcher, data: bytes, hot) -> bytes:
    """As the worker answers one read: the hot path first, else decoded."""
    d.refresh()
    reply = hot(d, data)
    if reply is not None:
        return reply
    [attrs] = Decoder().feed(data)
    return d.handle(attrs)


@pytest.fixture
def table_file(tmp_path):
    src = tmp_path / "map"
    src.write_text("".join(f"key{n} value{n}\n" for n in range(20)) + "Folded v\n")
    settle(src)
    return f"texthash:{src}", src


def make_dispatcher(table, **kwargs):
    kwargs.setdefault("cache_entries", 8)
    kwargs.setdefault("cache_bytes", 10000)
    return Dispatcher("proxymap", {table}, {}, watcher=FileWatcher(), **kwargs)


def test_read_service_without_hits_answers_none_and_counts_nothing(table_file):
    table, _ = table_file
    d = make_dispatcher(table)
    try:
        before = state(d, table)
        assert pure_reply(d, request(table, b"key1")) is None
        assert state(d, table) == before
        d.handle(list(Decoder().feed(request(table, b"key1"))[0]))
        assert pure_reply(d, request(table, b"key1")) is not None
        assert pure_reply(d, request(table, b"key2")) is None     # not cached yet
        assert pure_reply(d, request(table, b"key1", b"64 ")) is None   # another spelling
        assert pure_reply(d, LOOKUP) is None
    finally:
        d.close_all()


def test_write_service_never_answers_from_the_hot_path(table_file):
    table, _ = table_file
    d = Dispatcher("proxywrite", {table}, {}, watcher=FileWatcher(), cache_entries=8,
                   cache_bytes=10000)
    try:
        d.handle(list(Decoder().feed(request(table, b"key1"))[0]))
        assert d.hot_reply(request(table, b"key1")) is None
    finally:
        d.close_all()


@needs_compiled
def test_a_read_service_uses_the_compiled_form_when_it_serves(table_file):
    table, _ = table_file
    d = make_dispatcher(table)
    try:
        if protocol.HOTPATH is None:
            assert d.hot_reply.__func__ is Dispatcher.hot_reply
        else:
            assert d.hot_reply.func is compiled.hot_reply and d.hot_reply.args == (d,)
    finally:
        d.close_all()


def compiled_reply(d: Dispatcher, data: bytes):
    return compiled.hot_reply(d, data)


@needs_compiled
def test_compiled_hot_reply_needs_its_configuration_and_bytes(table_file):
    table, _ = table_file
    d = make_dispatcher(table)
    try:
        with pytest.raises(TypeError):
            compiled.hot_reply(d, request(table, b"key1").decode())
        with pytest.raises(TypeError):
            compiled.hot_reply(d)
    finally:
        d.close_all()


@needs_compiled
def test_both_hot_replies_agree_on_a_random_workload(table_file):
    """Two dispatchers on the same file get the same requests, one answering
    through each form: every reply, counter, cache figure and instance flags
    word stays the same, across evictions, flag changes and file changes."""
    table, src = table_file
    pure, fast = make_dispatcher(table), make_dispatcher(table)
    rng = random.Random(7)
    keys = [f"key{n}".encode() for n in range(12)] + [b"folded", b"FOLDED", b"nokey"]
    flag_words = [F.LOCK | F.FOLD_FIX, F.FOLD_FIX, 0, F.FOLD_FIX | F.DUP_REPLACE,
                  F.LOCK | F.FOLD_FIX | F.TRY1NULL, 0xFFFFFFFF]
    try:
        for n in range(3000):
            if n % 1000 == 999:         # a change: both see its notification
                src.write_text(src.read_text() + f"new{n} v\n")
                settle(src)
            spelling = rng.choice(flag_words)
            flags = str(spelling).encode() if rng.random() < 0.9 else b"0%d" % spelling
            tname = table if rng.random() < 0.95 else "texthash:/not/listed"
            data = request(tname, rng.choice(keys), flags)
            if rng.random() < 0.05:
                data = data[:-1]        # not a complete list: never hot
            if data.endswith(b"\0\0"):
                a, b = answer(pure, data, pure_reply), answer(fast, data, compiled_reply)
            else:
                a, b = pure_reply(pure, data), compiled_reply(fast, data)
            assert a == b, data
            assert state(pure, table) == state(fast, table), data
        assert pure.cache_stats.hits > 300 and pure.cache_stats.invalidations > 0
    finally:
        pure.close_all()
        fast.close_all()


@needs_compiled
def test_both_hot_replies_raise_alike_on_a_broken_hot_map(table_file):
    table, _ = table_file
    for hot in (pure_reply, compiled_reply):
        d = make_dispatcher(table)
        try:
            d.handle(list(Decoder().feed(request(table, b"key1"))[0]))
            [(spelling, (instance, flags, direct))] = d._hot.items()
            instance.watch = None       # no watch where one was: a bug, not an answer
            with pytest.raises(AttributeError):
                hot(d, request(table, b"key1"))
        finally:
            d.close_all()


def test_the_variable_chooses_at_import():
    code = "from proxymap import protocol; print(protocol.IMPLEMENTATION)"
    built = "pure Python" if compiled is None else "compiled (proxymap._hotpath)"
    for value, expected in (("1", "pure Python"), ("0", built)):
        env = dict(os.environ, PROXYMAP_PURE_PYTHON=value)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.stdout == expected + "\n", done.stderr


def test_status_names_the_hot_path_in_use():
    from master.control import format_status
    status = {"running": True, "pid": 1, "uptime": 0, "services": {},
              "hot_path": protocol.IMPLEMENTATION}
    assert format_status(status).splitlines()[0].endswith(
        f", hot path {protocol.IMPLEMENTATION}")


# -- direct reads (Berkeley DB files, answer cache on or off) ----------------------------

needs_postmap = pytest.mark.skipif(POSTMAP is None, reason="real Postfix postmap not installed")

DB_SOURCE = ("".join(f"key{n} value{n}\n" for n in range(20)) + "Folded v\n"
             + "long" + "x" * 300 + " long value\n" + "nonascii\xe9 v\xe9\n")
DB_KEYS = ([f"key{n}".encode() for n in range(24)]
           + [b"folded", b"FOLDED", b"Key3", b"nokey", b"", b"long" + b"x" * 300,
              b"LONG" + b"X" * 300, "nonascii\xe9".encode(), b"\xff\xfe"])
DB_FLAG_WORDS = [F.LOCK | F.FOLD_FIX, F.FOLD_FIX, 0, F.LOCK, F.LOCK | F.FOLD_FIX | F.TRY1NULL,
                 F.FOLD_FIX | F.TRY0NULL, F.LOCK | F.TRY0NULL | F.TRY1NULL,
                 F.FOLD_FIX | F.UTF8_REQUEST, 0xFFFFFFFF]


def build_db(src, type_name: str, variant: str, source: str) -> None:
    """The real postmap's file for `src` holding `source` (a main.cf next
    to it)."""
    cf = src.parent / "cf"
    if not cf.exists():
        cf.mkdir()
        (cf / "main.cf").write_text(f"compatibility_level = 3.6\nqueue_directory = {src.parent}\n"
                                    f"data_directory = {src.parent}\nmail_owner = postfix\n"
                                    "myhostname = test.localdomain\n")
    src.write_text(source)
    done = subprocess.run([POSTMAP, "-c", str(cf), *([variant] if variant else []),
                           f"{type_name}:{src}"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


DB_VARIANTS = [("hash", ""), ("hash", "-N"), ("hash", "-n"), ("btree", "")]


@pytest.fixture(scope="module")
def db_templates(tmp_path_factory):
    """Per (type, variant): the file of DB_SOURCE and that of a changed
    source, each built once (postmap takes a while to start)."""
    if POSTMAP is None:
        return {}
    base = tmp_path_factory.mktemp("db")
    out = {}
    for type_name, variant in DB_VARIANTS:
        files = []
        for n, source in enumerate((DB_SOURCE, DB_SOURCE + "added v\nkey3 changed\n")):
            src = base / f"{type_name}{variant}-{n}"
            build_db(src, type_name, variant, source)
            files.append(f"{src}.db")
        out[type_name, variant] = files
    return out


def install_db(template: str, src) -> None:
    """Put a built file in place as a writer would rewrite it (same inode)."""
    shutil.copyfile(template, f"{src}.db")
    settle(f"{src}.db")


@pytest.fixture(params=DB_VARIANTS, ids=lambda p: p[0] + p[1])
def db_file(tmp_path, request, db_templates):
    if POSTMAP is None:
        pytest.skip("real Postfix postmap not installed")
    type_name, variant = request.param
    src = tmp_path / "map"
    install_db(db_templates[type_name, variant][0], src)
    return f"{type_name}:{src}", src, db_templates[type_name, variant]


def whole_reply(d: Dispatcher, data: bytes):
    """The whole path alone: no spelling ever leads to the hot path."""
    d._hot.clear()
    return None


def hot_answers(d: Dispatcher) -> int:
    return sum(sum(c.requests) for c in d.metrics.tables.values())


@needs_postmap
@needs_compiled
@pytest.mark.parametrize("cache_entries", [0, 8])
def test_direct_reads_agree_with_the_whole_path_on_a_random_workload(db_file, cache_entries):
    """Three dispatchers on the same Berkeley DB file get the same requests:
    one answers through the whole path only, one through the pure-Python
    hot path and one through the compiled one. Every reply, counter, cache
    figure and instance flags word stays the same, across flag words
    (locks, folding, NUL conventions, a UTF-8 layer), keys found or not,
    long keys and a rebuild of the file."""
    table, src, templates = db_file
    dispatchers = [make_dispatcher(table, cache_entries=cache_entries) for _ in range(3)]
    forms = (whole_reply, pure_reply, compiled_reply)
    rng = random.Random(13)
    hot = 0
    try:
        for n in range(2000):
            if n % 700 == 699:          # a rebuild: all three see its notification
                install_db(templates[n // 700 % 2 == 0], src)
            spelling = rng.choice(DB_FLAG_WORDS)
            flags = str(spelling).encode() if rng.random() < 0.9 else b"0%d" % spelling
            data = request(table, rng.choice(DB_KEYS), flags)
            replies = []
            for d, form in zip(dispatchers, forms):
                d.refresh()
                reply = form(d, data)
                if reply is None:
                    [attrs] = Decoder().feed(data)
                    reply = d.handle(attrs)
                elif form is pure_reply:
                    hot += 1
                replies.append(reply)
            assert replies[0] == replies[1] == replies[2], data
            states = [state(d, table) for d in dispatchers]
            assert states[0] == states[1] == states[2], data
        assert hot > 1000       # the hot path answered most, directly or from the cache
        if cache_entries:
            assert dispatchers[0].cache_stats.misses > 100
    finally:
        for d in dispatchers:
            d.close_all()


def warmed(table: str, cache_entries: int = 0) -> Dispatcher:
    d = make_dispatcher(table, cache_entries=cache_entries)
    d.handle(list(Decoder().feed(request(table, b"key1"))[0]))
    assert d._hot and list(d._hot.values())[0][2] is True     # a direct instance
    return d


@needs_postmap
@pytest.mark.parametrize("hot", [pure_reply, pytest.param(
    lambda d, data: compiled.hot_reply(d, data), marks=needs_compiled, id="compiled")])
def test_direct_reads_leave_a_busy_lock_to_the_whole_path(db_file, hot, monkeypatch):
    import fcntl
    from proxymap.tables import filelock
    monkeypatch.setattr(filelock, "wait_limit", 0)      # as in the worker's loop
    table, src, _ = db_file
    d = warmed(table)
    d.handle(list(Decoder().feed(request(table, b"key1", F.FOLD_FIX))[0]))
    holder = os.open(f"{src}.db", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        before = state(d, table)
        assert hot(d, request(table, b"key2")) is None
        assert state(d, table) == before
        assert d.handle(list(Decoder().feed(request(table, b"key2"))[0]), may_wait=True) is None
        # a lookup without LOCK needs no lock: read at once
        assert hot(d, request(table, b"key2", F.FOLD_FIX)) == b"status\x000\x00value\x00value2\x00\x00"
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert hot(d, request(table, b"KEY2")) == b"status\x000\x00value\x00value2\x00\x00"
        # and it gave its shared lock back
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(holder)
        d.close_all()


@needs_postmap
@pytest.mark.parametrize("hot", [pure_reply, pytest.param(
    lambda d, data: compiled.hot_reply(d, data), marks=needs_compiled, id="compiled")])
def test_direct_reads_leave_what_they_cannot_do_to_the_whole_path(db_file, hot, monkeypatch):
    """No handle, a lock not of the flock style, a read that fails: None
    with nothing changed (the whole path answers with its own errors); an
    exception that is not an Exception goes through, the lock given back;
    a handle that gives no bytes is a TypeError in both forms."""
    import fcntl
    from berkeleydb import db as bdb
    from proxymap.tables import filelock
    from proxymap.tables.berkeleydb import _BerkeleyTable
    table, src, _ = db_file
    d = warmed(table)
    [(instance, _, _)] = d._hot.values()
    data = request(table, b"key3")
    try:
        before = state(d, table)
        saved = instance.lock.style
        instance.lock.style = filelock.FCNTL
        assert hot(d, data) is None
        instance.lock.style = saved

        def failing(_key):
            raise bdb.DBError(5, "Input/output error")
        monkeypatch.setattr(_BerkeleyTable, "direct_get", property(lambda self: failing))
        assert hot(d, data) is None
        monkeypatch.setattr(_BerkeleyTable, "direct_get", property(lambda self: None))
        assert hot(d, data) is None
        assert state(d, table) == before

        def interrupted(_key):
            raise KeyboardInterrupt
        monkeypatch.setattr(_BerkeleyTable, "direct_get", property(lambda self: interrupted))
        with pytest.raises(KeyboardInterrupt):
            hot(d, data)
        holder = os.open(f"{src}.db", os.O_RDONLY)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)    # given back
        finally:
            os.close(holder)
        monkeypatch.setattr(_BerkeleyTable, "direct_get", property(lambda self: lambda k: "text"))
        with pytest.raises(TypeError):
            hot(d, data)
        monkeypatch.undo()
        assert hot(d, data) == b"status\x000\x00value\x00value3\x00\x00"
    finally:
        d.close_all()


@needs_postmap
def test_a_closed_instance_is_never_read_directly(db_file):
    table, _, _ = db_file
    d = warmed(table)
    forms = [pure_reply] + ([compiled_reply] if compiled is not None else [])
    [(instance, _, _)] = d._hot.values()
    d.close_all()
    for hot in forms:
        assert hot(d, request(table, b"key1")) is None
