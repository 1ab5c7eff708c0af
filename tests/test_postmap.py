"""proxymap-postmap and proxymap.client, checked against real Postfix 3.7 postmap.

Tables built by real postmap are read by ours and the other way round (hash,
btree, lmdb); flags, duplicates, deletes, incremental updates, warnings and
exit codes are compared with what real postmap does. The proxy: mode runs
against our own proxymap/proxywrite workers started here; the client's wire
bytes are checked against a scripted fake server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxymap import dictflags as F
from proxymap.client import (ProxyClient, ProxyError, ProxyRefused, ProxyTable, strip_proxy,
                             utf8_key)
from proxymap.postmap import (Fatal, Options, dict_flags, for_stdin, parse_args, table_spec,
                              utf8_entries)
from proxymap.protocol import CONFIG, DENY, GREETING, NOKEY, OK, RETRY, Decoder, encode
from tests.instance import POSTMAP as REAL_POSTMAP

REPO = Path(__file__).resolve().parent.parent
needs_postfix = pytest.mark.skipif(REAL_POSTMAP is None,
                                   reason="real Postfix postmap not installed")

SOURCE = (b"# a comment\n"
          b"Foo bar\n"
          b"foo second\n"
          b"\"a b\" quoted key\n"
          b"multi first\n"
          b"   continued here\n"
          b"x   value with  spaces  \n"
          b"\xc3\x84\xc3\x96 umlaut\n"
          b"key: colon\n")


# -- helpers -------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path):
    """A private configuration directory and queue for both postmaps."""
    conf = tmp_path / "conf"
    queue = tmp_path / "queue"
    for d in (conf, queue / "private", tmp_path / "data"):
        d.mkdir(parents=True)
    write_source(conf / "main.cf", (
        "compatibility_level = 3.6\n"
        f"queue_directory = {queue}\n"
        f"data_directory = {tmp_path / 'data'}\n"
        "mail_owner = postfix\n"
        f"proxy_read_maps = proxy:btree:{tmp_path}/p proxy:hash:{tmp_path}/missing\n"
        f"proxy_write_maps = proxy:btree:{tmp_path}/p\n").encode())
    return tmp_path


def _env_vars():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("MAIL_CONFIG", None)
    return e


def ours(env, *args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "proxymap.postmap", "-c", str(env / "conf"),
                           *args], input=stdin, capture_output=True, cwd=env,
                          env=_env_vars(), timeout=30)


def real(env, *args, stdin=b""):
    return subprocess.run([REAL_POSTMAP, "-c", str(env / "conf"), *args], input=stdin,
                          capture_output=True, cwd=env, timeout=30)


def write_source(path: Path, data: bytes) -> None:
    """Write a file dated in the past: real Postfix programs wait while
    main.cf looks freshly modified, and postmap while its source does."""
    path.write_bytes(data)
    past = time.time() - 10
    os.utime(path, (past, past))


def records(result) -> set[bytes]:
    assert result.returncode == 0, result.stderr
    return set(result.stdout.splitlines())


def no_traceback(result):
    assert b"Traceback" not in result.stderr, result.stderr


def raw_db(path: Path, btree: bool = False) -> dict[bytes, bytes]:
    from berkeleydb import db
    handle = db.DB()
    handle.open(str(path), dbtype=db.DB_BTREE if btree else db.DB_HASH, flags=db.DB_RDONLY)
    try:
        return dict(handle.items())
    finally:
        handle.close()


# -- pure functions ------------------------------------------------------------------

def test_parse_args_modes_and_flags():
    o = parse_args(["-q", "k", "-N", "-f", "-w", "hash:t"], environ={})
    assert (o.mode, o.key, o.nul, o.fold, o.dup, o.tables) == (
        "query", "k", F.TRY1NULL, False, F.DUP_IGNORE, ["hash:t"])
    # GNU order: options after operands; last of -N/-n and -r/-w wins
    o = parse_args(["t1", "-N", "-n", "-w", "-r", "-d", "-", "t2"], environ={})
    assert (o.mode, o.key, o.nul, o.dup, o.tables) == ("delete", "-", F.TRY0NULL,
                                                       F.DUP_REPLACE, ["t1", "t2"])
    assert parse_args(["-i", "t"], environ={"MAIL_CONFIG": "/x"}).config_dir == "/x"
    assert parse_args(["t"], environ={}).mode == "build"
    assert parse_args(["-s", "-o", "-p", "-u", "-U", "-v", "t"], environ={}).mode == "sequence"


@pytest.mark.parametrize("argv, text", [
    (["-q", "k", "-s", "t"], "only one of"),
    (["-q", "k", "-d", "k", "t"], "only one of"),
    ([], "usage:"),
    (["-Z", "t"], "usage:"),
    (["-b", "-q", "-", "t"], "not supported"),
    (["-F", "t"], "not supported"),
])
def test_parse_args_errors(argv, text):
    with pytest.raises(Fatal, match=text):
        parse_args(argv, environ={})


def test_dict_flags_match_postmap_on_the_wire():
    q = Options(mode="query")
    # 524353 + FOLD_FIX: the UTF-8 layer removes FOLD_FIX before sending
    assert dict_flags(q, smtputf8=True) == F.DUP_WARN | F.LOCK | F.FOLD_FIX | F.UTF8_REQUEST
    assert dict_flags(Options(mode="query", utf8=False), smtputf8=True) == 16449
    assert dict_flags(q, smtputf8=False) == 16449
    assert dict_flags(Options(), smtputf8=True) == F.DUP_WARN | F.FOLD_FIX | F.UTF8_REQUEST
    b = Options(fold=False, nul=F.TRY0NULL, dup=F.DUP_REPLACE)
    assert dict_flags(b, smtputf8=False) == F.TRY0NULL | F.DUP_REPLACE


def test_table_spec():
    assert table_spec("file", "btree") == ("btree", "file")
    assert table_spec("lmdb:/a/b", "hash") == ("lmdb", "/a/b")
    assert table_spec("proxy:hash:/a", "hash") == ("proxy", "hash:/a")
    with pytest.raises(Fatal):
        table_spec(":x", "hash")
    assert strip_proxy("proxy:proxy:hash:/a") == "hash:/a"


def test_utf8_key_and_entries():
    assert utf8_key("ÄÖ Straße".encode(), True) == "äö strasse".encode()
    assert utf8_key(b"MiXed", False) == b"MiXed"
    assert utf8_key(b"\xff", True) is None
    warnings = []
    got = list(utf8_entries([(b"K", b"v"), (b"\xff", b"v"), (b"k2", b"\xfe")], True,
                            "src", warnings.append))
    assert got == [(b"k", b"v")]
    assert len(warnings) == 2 and all("src: non-UTF-8" in w for w in warnings)
    seen = []
    for_stdin(seen.append)("/dev/stdin, line 3: bad")
    assert seen == ["stdin, line 3: bad"]


# -- the client against a scripted server ------------------------------------------

class FakeServer:
    """Accepts connections one after another on a UNIX socket, greets and
    answers each request list with respond(attrs) (None: hang up)."""

    def __init__(self, path: Path, respond, greeting: bytes = GREETING):
        self.path = str(path)
        self.respond = respond
        self.greeting = greeting
        self.requests: list[list[tuple[bytes, bytes]]] = []
        self.raw: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                conn.sendall(self.greeting)
                decoder = Decoder()
                while not self.stopping:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        break
                    if not data:
                        break
                    self.raw.append(data)
                    hang_up = False
                    for attrs in decoder.feed(data):
                        self.requests.append(attrs)
                        reply = self.respond(attrs)
                        if reply is None:
                            hang_up = True
                            break
                        conn.sendall(reply)
                    if hang_up:
                        break

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def fake(tmp_path):
    servers = []

    def start(respond, **kw):
        server = FakeServer(tmp_path / f"fake{len(servers)}", respond, **kw)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def scripted(open_flags=28, value=b"bar", lookup_status=OK):
    def respond(attrs):
        request = attrs[0][1]
        if request == b"open":
            return encode([("status", OK), ("flags", open_flags)])
        if request == b"lookup":
            return encode([("status", lookup_status), ("value", value)])
        if request == b"sequence":
            return encode([("status", NOKEY), ("key", b""), ("value", b"")])
        return encode([("status", OK)])
    return respond


def test_client_sends_postmap_bytes(fake):
    server = fake(scripted())
    with ProxyClient(server.path, timeout=5) as client:
        table = ProxyTable(client, "proxy:hash:/etc/postfix/aliases",
                           F.DUP_WARN | F.LOCK | F.FOLD_FIX | F.UTF8_REQUEST)
        assert table.flags & F.IMPL_MASK == F.FIXED
        assert table.lookup(b"FOO") == (OK, b"bar")
    # byte for byte what postmap 3.7 -q sends (spec 4.4), key folded client side
    assert b"".join(server.raw) == (
        b"request\0open\0table\0hash:/etc/postfix/aliases\0flags\x000\0\0"
        b"request\0lookup\0table\0hash:/etc/postfix/aliases\0flags\x00524353\0key\0foo\0\0")


def test_client_without_utf8_lets_server_fold(fake):
    server = fake(scripted())
    with ProxyClient(server.path, timeout=5) as client:
        table = ProxyTable(client, "hash:/t", 16449, smtputf8=False)
        table.lookup(b"MIXED")
    assert server.requests[-1][2:] == [(b"flags", b"16449"), (b"key", b"MIXED")]


def test_client_utf8_layer_details(fake):
    # PATTERN table: no client folding, FOLD bits still cleared
    server = fake(scripted(open_flags=F.PATTERN, value=b"\xff"))
    with ProxyClient(server.path, timeout=5) as client:
        table = ProxyTable(client, "pcre:/t", F.FOLD_FIX | F.UTF8_REQUEST | F.OPEN_LOCK)
        assert server.requests[0][2] == (b"flags", str(F.OPEN_LOCK).encode())
        assert table.lookup(b"\xc3\x84B") == (CONFIG, b"")   # non-UTF-8 value
        assert server.requests[-1][2:] == [(b"flags", str(F.UTF8_REQUEST | F.OPEN_LOCK).encode()),
                                           (b"key", "ÄB".encode())]
        sent = len(server.requests)
        assert table.lookup(b"\xff") == (NOKEY, b"")           # refused locally
        assert table.delete(b"\xff") == NOKEY
        assert len(server.requests) == sent


def test_client_status_handling(fake):
    state = {"status": DENY}
    server = fake(lambda attrs: encode([("status", state["status"]), ("flags", 0)])
                  if attrs[0][1] == b"open" else
                  encode([("status", state["status"]), ("value", b"")]))
    with ProxyClient(server.path, timeout=5) as client:
        with pytest.raises(ProxyRefused, match='proxymap service is not configured for table'
                                               ' "hash:/t"'):
            ProxyTable(client, "hash:/t", 0)
        state["status"] = OK
        table = ProxyTable(client, "hash:/t", 0)
        state["status"] = RETRY
        assert table.lookup(b"k") == (RETRY, b"")
        state["status"] = 3
        with pytest.raises(ProxyRefused, match="invalid request"):
            table.lookup(b"k")


def test_client_reconnects_after_hang_up(fake):
    calls = {"n": 0}

    def respond(attrs):
        calls["n"] += 1
        if calls["n"] == 1:
            return None          # drop the first request on the floor
        return encode([("status", NOKEY), ("value", b"")])
    server = fake(respond)
    with ProxyClient(server.path, timeout=5, retry_delay=0) as client:
        assert client.lookup("hash:/t", 0, b"k") == (NOKEY, b"")
    assert server.connections == 2
    assert server.requests[0] == server.requests[1]


def test_client_gives_up_on_malformed_replies(fake):
    server = fake(lambda attrs: encode([("status", OK)]))   # lookup reply lacks value
    with ProxyClient(server.path, timeout=5, retries=1, retry_delay=0) as client:
        with pytest.raises(ProxyError, match="malformed lookup reply"):
            client.lookup("hash:/t", 0, b"k")
    assert len(server.requests) == 2


def test_client_checks_greeting(fake):
    server = fake(scripted(), greeting=b"protocol\0other\0\0")
    client = ProxyClient(server.path, timeout=5, retries=0)
    with pytest.raises(ProxyError, match="greeting"):
        client.open("hash:/t", 0)
    with pytest.raises(ProxyError, match="connect"):
        ProxyClient(server.path + "-absent", retries=0).open("hash:/t", 0)


# -- interoperability with real postmap ----------------------------------------------

@needs_postfix
@pytest.mark.parametrize("kind", ["hash", "btree"])
def test_real_built_table_read_by_ours(env, kind):
    write_source(env / "src", SOURCE)
    built = real(env, f"{kind}:src")
    assert built.returncode == 0, built.stderr
    expected = records(real(env, "-s", f"{kind}:src"))
    assert records(ours(env, "-s", f"{kind}:src")) == expected
    assert b"multi\tfirst   continued here" in expected
    for key, value in [("FOO", b"bar\n"), ("äö", b"umlaut\n"), ("ÄÖ", b"umlaut\n"),
                       ('"a b"', b"quoted key\n"), ("key:", b"colon\n")]:
        r = ours(env, "-q", key, f"{kind}:src")
        assert (r.returncode, r.stdout) == (0, value), (key, r.stderr)
    r = ours(env, "-q", "nosuchkey", f"{kind}:src")
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", b"")


@needs_postfix
@pytest.mark.parametrize("kind", ["hash", "btree"])
def test_ours_built_table_read_by_real(env, kind):
    write_source(env / "src", SOURCE)
    mine = ours(env, f"{kind}:src")
    assert mine.returncode == 0, mine.stderr
    assert b'src.db: duplicate entry: "foo"' in mine.stderr
    assert b'src, line 9: record is in "key: value" format' in mine.stderr
    ours_records = records(real(env, "-s", f"{kind}:src"))
    write_source(env / "src2", SOURCE)
    assert real(env, f"{kind}:src2").returncode == 0
    assert ours_records == records(real(env, "-s", f"{kind}:src2"))
    r = real(env, "-q", "ÄÖ", f"{kind}:src")
    assert (r.returncode, r.stdout) == (0, b"umlaut\n")
    # both store with a trailing NUL by default on Linux
    assert raw_db(env / "src.db", kind == "btree") == raw_db(env / "src2.db", kind == "btree")


@needs_postfix
def test_lmdb_both_ways(env):
    write_source(env / "src", SOURCE)
    assert real(env, "lmdb:src").returncode == 0
    assert records(ours(env, "-s", "lmdb:src")) == records(real(env, "-s", "lmdb:src"))
    write_source(env / "mine", SOURCE)
    assert ours(env, "lmdb:mine").returncode == 0
    r = real(env, "-q", "foo", "lmdb:mine")
    assert (r.returncode, r.stdout) == (0, b"bar\n")


@needs_postfix
def test_cdb_both_ways(env):
    from proxymap.tables import TableOpenError, table_class
    try:
        table_class("cdb")
    except TableOpenError:
        pytest.skip("cdb tables not available yet")
    write_source(env / "src", SOURCE)
    assert real(env, "cdb:src").returncode == 0
    for key, value in [("FOO", b"bar\n"), ("ÄÖ", b"umlaut\n")]:
        assert ours(env, "-q", key, "cdb:src").stdout == value
    write_source(env / "mine", SOURCE)
    r = ours(env, "cdb:mine")
    assert r.returncode == 0, r.stderr
    r = real(env, "-q", "ÄÖ", "cdb:mine")
    assert (r.returncode, r.stdout) == (0, b"umlaut\n")
    assert real(env, "-q", "nosuch", "cdb:mine").returncode == 1
    r = ours(env, "-s", "cdb:mine")          # cdb has no sequence: one fatal line
    assert r.returncode == 1
    assert r.stderr == b"proxymap-postmap: fatal: table cdb:mine: operation sequence" \
                       b" is not supported\n"


@needs_postfix
def test_nul_conventions(env):
    write_source(env / "src", b"a 1\nb 2\n")
    assert ours(env, "-n", "hash:src").returncode == 0
    assert raw_db(env / "src.db") == {b"a": b"1", b"b": b"2"}
    assert real(env, "-N", "-q", "a", "hash:src").returncode == 1
    assert real(env, "-n", "-q", "a", "hash:src").stdout == b"1\n"
    assert real(env, "-q", "a", "hash:src").stdout == b"1\n"
    assert ours(env, "-N", "-q", "a", "hash:src").returncode == 1
    assert real(env, "-N", "hash:src").returncode == 0
    assert raw_db(env / "src.db") == {b"a\0": b"1\0", b"b\0": b"2\0"}
    assert ours(env, "-n", "-q", "a", "hash:src").returncode == 1
    assert ours(env, "-N", "-q", "a", "hash:src").stdout == b"1\n"
    assert ours(env, "-q", "b", "hash:src").stdout == b"2\n"


@needs_postfix
def test_no_folding(env):
    write_source(env / "src", b"UP one\nup two\n")
    assert ours(env, "-f", "btree:src").returncode == 0
    assert records(real(env, "-s", "btree:src")) == {b"UP\tone", b"up\ttwo"}
    assert ours(env, "-f", "-q", "UP", "btree:src").stdout == b"one\n"
    assert ours(env, "-q", "UP", "btree:src").stdout == b"two\n"   # key folded
    r = ours(env, "btree:src")                                       # folding: a duplicate
    assert b'duplicate entry: "up"' in r.stderr
    assert records(real(env, "-s", "btree:src")) == {b"up\tone"}


@needs_postfix
@pytest.mark.parametrize("flag, value, warned", [(None, b"one", True), ("-r", b"three", False),
                                                 ("-w", b"one", False)])
def test_duplicates_like_real(env, flag, value, warned):
    write_source(env / "src", b"k one\nk two\nK three\n")
    shutil.copy(env / "src", env / "ref")
    args = [flag] if flag else []
    mine = ours(env, *args, "hash:src")
    ref = real(env, *args, "hash:ref")
    assert mine.returncode == ref.returncode == 0
    assert (b"duplicate entry" in mine.stderr) is warned is (b"duplicate entry" in ref.stderr)
    assert real(env, "-q", "k", "hash:src").stdout == value + b"\n"
    assert records(real(env, "-s", "hash:src")) == records(real(env, "-s", "hash:ref"))


@needs_postfix
def test_bad_lines_warn_with_file_and_line(env):
    write_source(env / "src", b"good val\nnovalue\n\"unbalanced x\n  \n\xff\xfe bad8\nlast v\n")
    r = ours(env, "hash:src")
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    assert b"proxymap-postmap: warning: src, line 2: " in r.stderr
    assert b"proxymap-postmap: warning: src, line 3: " in r.stderr
    assert b"non-UTF-8" in r.stderr
    assert records(real(env, "-s", "hash:src")) == {b"good\tval", b"last\tv"}
    # with -u the non-UTF-8 line is stored, as real postmap -u does
    assert ours(env, "-u", "hash:src").returncode == 0
    assert b"\xff\xfe\tbad8" in records(real(env, "-u", "-s", "hash:src"))


@needs_postfix
def test_delete(env):
    write_source(env / "t1", b"a 1\nb 2\n")
    write_source(env / "t2", b"a X\nc 3\n")
    assert real(env, "t1", "t2").returncode == 0
    r = ours(env, "-d", "A", "t1", "hash:t2")
    assert (r.returncode, r.stderr) == (0, b"")
    assert real(env, "-q", "a", "t1", "t2").returncode == 1
    assert ours(env, "-d", "a", "t1", "t2").returncode == 1
    r = ours(env, "-d", "-", "t1", "t2", stdin=b"zz\nc\n")
    assert r.returncode == 0
    assert records(real(env, "-s", "t2")) == set()
    assert records(real(env, "-s", "t1")) == {b"b\t2"}
    assert ours(env, "-d", "-", "t1", stdin=b"zz\n").returncode == 1


@needs_postfix
def test_incremental(env):
    write_source(env / "t", b"old v\n")
    assert real(env, "hash:t").returncode == 0
    r = ours(env, "-i", "hash:t", stdin=b"New v1\nnovalue\nold dup\n")
    assert r.returncode == 0
    assert b"warning: stdin, line 2: " in r.stderr
    assert b'duplicate entry: "old"' in r.stderr
    assert records(real(env, "-s", "hash:t")) == {b"old\tv", b"new\tv1"}
    assert ours(env, "-i", "-r", "hash:t", stdin=b"old replaced\n").returncode == 0
    assert real(env, "-q", "old", "hash:t").stdout == b"replaced\n"
    # a table that does not exist yet is created
    assert ours(env, "-i", "btree:fresh", stdin=b"k v\n").returncode == 0
    assert real(env, "-q", "k", "btree:fresh").stdout == b"v\n"


@needs_postfix
def test_query_stdin_and_several_tables(env):
    write_source(env / "t1", b"a 1\n")
    write_source(env / "t2", b"a X\nb Y\n")
    assert real(env, "t1", "t2").returncode == 0
    r = ours(env, "-q", "-", "t1", "t2", stdin=b"a\nb\nzz\n")
    ref = real(env, "-q", "-", "t1", "t2", stdin=b"a\nb\nzz\n")
    assert (r.returncode, r.stdout) == (ref.returncode, ref.stdout) == (0, b"a\t1\nb\tY\n")
    assert ours(env, "-q", "-", "t1", "t2", stdin=b"zz\n").returncode == 1
    assert ours(env, "-q", "b", "t1", "t2").stdout == b"Y\n"
    # later tables are opened only when needed, as postmap does
    assert ours(env, "-q", "a", "t1", "nonexistent").stdout == b"1\n"
    assert records(ours(env, "-s", "t2", "t1")) == {b"a\tX", b"b\tY"}


@needs_postfix
def test_fatal_errors_and_exit_codes(env):
    cases = [
        (["-q", "a", "hash:nonexistent"], b"fatal: open database nonexistent.db"),
        (["nonexistent"], b"fatal: open nonexistent: No such file or directory"),
        (["bogus:x"], b"fatal: unsupported dictionary type: bogus"),
        (["-q", "a", "-s", "x"], b"fatal: specify only one of"),
    ]
    no_build = [t for t in ("inline", "texthash", "static", "environ", "cidr")
                if _available(t)]
    if no_build:
        cases.append(([f"{no_build[0]}:x"], b"does not support bulk-mode creation"))
    for args, message in cases:
        r = ours(env, *args)
        assert r.returncode == 1, args
        assert r.stderr.startswith(b"proxymap-postmap: fatal: ") and message in r.stderr, r.stderr
        no_traceback(r)
    r = subprocess.run([sys.executable, "-m", "proxymap.postmap", "-c", str(env / "nodir"),
                        "-q", "a", "t"], capture_output=True, env=_env_vars(), timeout=30)
    assert r.returncode == 1 and b"fatal: open " in r.stderr and b"main.cf" in r.stderr


@needs_postfix
def test_permissions_follow_source(env):
    write_source(env / "src", b"a 1\n")
    os.chmod(env / "src", 0o640)
    assert ours(env, "hash:src").returncode == 0
    assert (env / "src.db").stat().st_mode & 0o777 == 0o640
    (env / "src.db").unlink()
    assert ours(env, "-p", "hash:src").returncode == 0
    assert (env / "src.db").stat().st_mode & 0o777 == 0o644 & ~_umask()


@needs_postfix
def test_delete_needs_an_existing_table(env):
    for tool in (ours, real):
        r = tool(env, "-d", "a", "hash:absent")
        assert r.returncode == 1
        assert b"fatal: open database absent.db: No such file or directory" in r.stderr
        assert not (env / "absent.db").exists()


@needs_postfix
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_build_as_source_owner(env):
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    shared = env / "shared"
    shared.mkdir()
    os.chmod(env, 0o755)
    os.chmod(shared, 0o777)
    write_source(shared / "src", b"a 1\n")
    os.chown(shared / "src", nobody.pw_uid, nobody.pw_gid)
    for tool, flags, owner in [(ours, [], nobody.pw_uid), (real, [], nobody.pw_uid),
                               (ours, ["-o"], 0), (real, ["-o"], 0)]:
        r = tool(env, *flags, "hash:shared/src")
        assert r.returncode == 0, r.stderr
        assert (shared / "src.db").stat().st_uid == owner, (tool, flags)
        (shared / "src.db").unlink()


def _available(type_name: str) -> bool:
    from proxymap.tables import TableOpenError, table_class
    try:
        return not hasattr(table_class(type_name), "build")
    except TableOpenError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- proxy: through our own workers --------------------------------------------------

@pytest.fixture
def workers(env):
    """proxymap and proxywrite workers of this project on the queue's sockets."""
    procs = []
    for service in ("proxymap", "proxywrite"):
        sock = env / "queue" / "private" / service
        log = open(env / f"{service}.log", "wb")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "proxymap.server", "-c", str(env / "conf"), "-n", service,
             "--listen", str(sock), "--stderr"], stdout=log, stderr=log, env=_env_vars(),
            cwd=env), log, sock))
    try:
        for proc, _, sock in procs:
            for _ in range(200):                     # at most ~10 s
                if sock.exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert sock.exists(), (env / "proxymap.log").read_text()
        yield env
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            log.close()


@needs_postfix
def test_proxy_query_sequence_delete(workers):
    env = workers
    write_source(env / "p", SOURCE)
    assert real(env, "btree:p").returncode == 0
    table = f"proxy:btree:{env}/p"
    r = ours(env, "-q", "ÄÖ", table)
    assert (r.returncode, r.stdout) == (0, b"umlaut\n"), r.stderr
    r = ours(env, "-q", "nosuch", table)
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", b"")
    r = ours(env, "-q", "-", table, stdin=b"FOO\nnone\nx\n")
    assert (r.returncode, r.stdout) == (0, b"FOO\tbar\nx\tvalue with  spaces\n")
    # -s through the proxy (real postmap 3.7 refuses; we list the table)
    assert records(ours(env, "-s", table)) == records(real(env, "-s", f"btree:{env}/p"))
    assert real(env, "-s", table).returncode == 1
    # -d goes to proxywrite
    r = ours(env, "-d", "Foo", table)
    assert r.returncode == 0, r.stderr
    assert real(env, "-q", "foo", f"btree:{env}/p").returncode == 1
    assert ours(env, "-d", "foo", table).returncode == 1
    # real postmap as a client of our workers agrees
    assert real(env, "-q", "x", table).stdout == b"value with  spaces\n"


@needs_postfix
def test_proxy_refusals(workers):
    env = workers
    write_source(env / "p", b"a 1\n")
    cases = [
        (["-q", "a", f"proxy:hash:{env}/unlisted"],
         f'fatal: proxymap service is not configured for table "hash:{env}/unlisted"'),
        (["-d", "a", f"proxy:hash:{env}/missing"],
         f'fatal: proxywrite service is not configured for table "hash:{env}/missing"'),
        (["-q", "a", f"proxy:hash:{env}/missing"],
         f"fatal: table proxy:hash:{env}/missing: query error"),
        ([f"proxy:btree:{env}/p"], "fatal: can't create maps via the proxy service"),
        (["-i", f"proxy:btree:{env}/p"], "via the proxy service"),
    ]
    for args, message in cases:
        r = ours(env, *args, stdin=b"a b\n")
        assert r.returncode == 1, (args, r.stderr)
        assert message.encode() in r.stderr, r.stderr
        no_traceback(r)


def test_proxy_service_down(env):
    r = ours(env, "-q", "a", f"proxy:btree:{env}/p")
    assert r.returncode == 1
    assert b"fatal: table proxy:btree:" in r.stderr and b"connect to " in r.stderr
    no_traceback(r)
