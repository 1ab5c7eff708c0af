"""memcache: through our proxy against Postfix's own C client on one server.

The suite starts Debian's memcached on a UNIX socket in a temporary
directory (tests/servers.py, stopped by pid). Real `postmap -q` (Postfix
3.7, whose memcache client is built in) queries each parameter file
directly (`memcache:FILE`) and through our worker (`proxy:memcache:FILE`):
same output, same exit codes, for key formats, the domain filter, limits,
a backup table and a server that is not there. Updates and deletes go
through our proxywrite worker (Postfix's postmap cannot update a memcache
table itself: "does not support bulk-mode creation") and are checked on
the server; deletes are compared with real `postmap -d`.
"""

import pytest

from servers import MemcachedServer
from sqldata import assert_same_answers, both, check_outage_and_recovery, check_pool_bound
from worker_fixture import RawClient, WorkerInstance
from proxymap import dictflags as F
from proxymap.tables.memcache import has_space, read_line, value_size, ReplyError

pytestmark = pytest.mark.skipif(__import__("shutil").which("memcached") is None,
                                reason="memcached is not installed (apt-get install memcached)")

SEEDED = {
    b"alice@example.com": b"alice value",
    b"mc:alice@example.com": b"prefixed value",
    b"example.com/alice": b"parts value",
    b"dom:example.com": b"labels value",
    b"big": b"twenty bytes of data",
    b"plain": b"plain value",
    "ünï@例え.jp".encode(): "ünïcode".encode(),
}
KEYS = ["alice@example.com", "ALICE@Example.COM", "bob@example.org", "with space",
        "tab\there", "plain", "big", "missing", "x@", "@example.com", "ünï@例え.jp",
        "a@b.example.com", "backup-only", "100%"]
CONFIGS = {
    "plain": "",
    # ours: the answer cache's settings, which Postfix's memcache table ignores
    "cached": ("proxymap_cache_ttl = 1h\nproxymap_cache_negative_ttl = 3600\n"
               "proxymap_cache_entries = 100\n"),
    "prefix": "key_format = mc:%s\n",
    "parts": "key_format = %d/%u\n",
    "labels": "key_format = dom:%2.%1\n",
    "domain": "domain = example.com\n",
    "small": "line_size_limit = 24\ndata_size_limit = 12\n",
    "backup": "backup = lmdb:{backup}\n",
    "down": "memcache = unix:{root}/no-such-socket\nmax_try = 1\n",
}


def seed(mc, items):
    for key, value in items.items():
        reply = mc.text(b"set " + key + b" 0 0 %d\r\n" % len(value) + value + b"\r\n")
        assert reply == b"STORED\r\n", (key, reply)


def raw_get(mc, key: bytes) -> tuple[int, bytes] | None:
    """(flags, value) as memcached holds it, or None."""
    reply = mc.text(b"get " + key + b"\r\n", until=b"END\r\n")
    if reply == b"END\r\n":
        return None
    head, _, rest = reply.partition(b"\r\n")
    return int(head.split()[2]), rest[:value_size(head)]


@pytest.fixture(scope="module")
def mc():
    with MemcachedServer() as server:
        seed(server, SEEDED)
        yield server


def write_cfs(inst, mc, configs):
    specs = {}
    backup = f"{inst.config_dir}/backup"
    with open(backup, "w") as f:
        f.write("backup-only from the backup\nalice@example.com from the backup too\n")
    assert inst.postmap(f"lmdb:{backup}").returncode == 0
    for name, body in configs.items():
        cf = f"{inst.config_dir}/mc-{name}.cf"
        with open(cf, "w", encoding="utf-8") as f:
            f.write(f"memcache = unix:{mc.socket}\n"
                    + body.format(backup=backup, root=inst.root))
        specs[name] = f"memcache:{cf}"
    return specs


@pytest.fixture(scope="module")
def inst(mc, tmp_path_factory):
    i = WorkerInstance(tmp_path_factory.mktemp("memcache"))
    i.cfs = write_cfs(i, mc, CONFIGS)
    i.cfs["rw"] = write_cfs(i, mc, {"rw": "ttl = 600\nflags = 7\nkey_format = rw:%s\n"})["rw"]
    listed = " ".join(f"proxy:{s}" for s in i.cfs.values())
    i.write_main_cf(read_maps=listed, write_maps=listed)
    i.start("proxymap")
    i.start("proxywrite")
    yield i
    i.stop()


@pytest.mark.parametrize("table", sorted(CONFIGS))
def test_every_key_answers_like_postfix(inst, table):
    assert_same_answers(inst, inst.cfs[table], KEYS, expect_found=table != "down")


def test_known_answers(inst):
    _, p = both(inst, "ALICE@Example.COM", inst.cfs["prefix"])
    assert p.stdout == b"prefixed value\n"
    _, p = both(inst, "alice@example.com", inst.cfs["parts"])
    assert p.stdout == b"parts value\n"
    _, p = both(inst, "a@b.example.com", inst.cfs["labels"])
    assert p.stdout == b"labels value\n"
    _, p = both(inst, "backup-only", inst.cfs["backup"])
    assert p.stdout == b"from the backup\n"
    d, p = both(inst, "big", inst.cfs["small"])        # 20 bytes > data_size_limit
    assert p.returncode == d.returncode == 1 and b"query error" in p.stderr
    d, p = both(inst, "x", inst.cfs["down"])
    assert p.returncode == d.returncode == 1 and b"query error" in p.stderr
    log = inst.log()
    assert "connect to " in log and "no-such-socket" in log and "Traceback" not in log


def write(inst, request, spec, **attrs):
    c = RawClient(inst.socket_path("proxywrite"))
    try:
        return c.request(request=request, table=spec.encode(),
                         flags=str(F.FOLD_FIX).encode(), **attrs)
    finally:
        c.close()


def test_update_and_delete_through_proxywrite(inst, mc):
    spec = inst.cfs["rw"]
    assert write(inst, b"update", spec, key=b"New@Example.COM", value=b"fresh")[b"status"] == b"0"
    assert raw_get(mc, b"rw:new@example.com") == (7, b"fresh")       # folded, formatted
    reply = mc.text(b"mg rw:new@example.com t\r\n")
    ttl = int(reply.split()[1][1:])
    assert 0 < ttl <= 600, reply
    _, p = both(inst, "new@example.com", spec)
    assert p.stdout == b"fresh\n"
    assert write(inst, b"update", spec, key=b"with space", value=b"x")[b"status"] == b"1"
    assert 'skipping update for name "with space": name contains space' in inst.log()
    assert write(inst, b"delete", spec, key=b"new@example.com")[b"status"] == b"0"
    assert raw_get(mc, b"rw:new@example.com") is None
    assert write(inst, b"delete", spec, key=b"new@example.com")[b"status"] == b"1"
    # the same deletes by Postfix's own client and through proxy:, with real postmap -d
    seed(mc, {b"rw:one": b"1", b"rw:two": b"2"})
    direct = inst.postmap("-d", "one", spec)
    proxied = inst.postmap("-d", "two", f"proxy:{spec}")
    assert direct.returncode == proxied.returncode == 0, (direct, proxied)
    assert raw_get(mc, b"rw:one") is None and raw_get(mc, b"rw:two") is None
    direct = inst.postmap("-d", "one", spec)
    proxied = inst.postmap("-d", "two", f"proxy:{spec}")
    assert (direct.returncode, direct.stdout) == (proxied.returncode, proxied.stdout)


def test_update_with_backup_writes_both(inst, mc, tmp_path):
    spec = inst.cfs["backup"]
    listed = " ".join(f"proxy:{s}" for s in inst.cfs.values())
    assert listed  # the module's instance lists the backup table for proxywrite too
    assert write(inst, b"update", spec, key=b"both", value=b"stored twice")[b"status"] == b"0"
    assert raw_get(mc, b"both") == (0, b"stored twice")
    backup = spec.partition(":")[2].replace("mc-backup.cf", "backup")
    assert inst.postmap("-q", "both", f"lmdb:{backup}").stdout == b"stored twice\n"
    assert write(inst, b"delete", spec, key=b"both")[b"status"] == b"0"
    assert raw_get(mc, b"both") is None
    assert inst.postmap("-q", "both", f"lmdb:{backup}").returncode == 1
    # sequence walks the backup
    c = RawClient(inst.socket_path("proxymap"))
    reply = c.request(request=b"sequence", table=spec.encode(), flags=b"0", function=b"0")
    c.close()
    assert reply[b"status"] == b"0" and reply[b"key"] in (b"backup-only", b"alice@example.com")


class FakeStream:
    def __init__(self, data: bytes):
        self.buf = bytearray(data)

    def read_more(self):
        raise EOFError


def test_reply_parsing():
    assert read_line(FakeStream(b"END\r\nrest"), 1024) == b"END"
    assert read_line(FakeStream(b"END\n"), 4) == b"END"
    with pytest.raises(ReplyError):
        read_line(FakeStream(b"VALUE a-very-long-line\r\n"), 10)
    assert value_size(b"VALUE k 0 12") == 12
    assert value_size(b"SERVER_ERROR x") is None
    assert has_space(b"a\tb") and has_space(b"a b") and not has_space("é".encode())


def test_64_clients_share_a_few_connections(mc, tmp_path):
    seed(mc, {b"pool:alice@example.com": b"alice.local@mail.example.com"})
    i = WorkerInstance(tmp_path)
    spec = write_cfs(i, mc, {"pool": "key_format = pool:%s\n"})["pool"]

    def connections():
        stats = mc.text(b"stats\r\n", until=b"END\r\n").decode()
        return int(next(line.split()[2] for line in stats.splitlines()
                        if line.startswith("STAT curr_connections ")))
    before = connections()
    held = check_pool_bound(i, spec, lambda: connections() - before)
    print(f"FIGURES memcache: 64 clients x 3 lookups through one worker held {held}"
          f" connections (proxymap_backend_threads = 3)")


class Reseeded:
    """A memcached that comes back empty (it keeps nothing on disk): the
    outage check's start() restarts it and puts the test's record back."""

    def __init__(self, server, items):
        self.server, self.items = server, items

    def stop(self):
        self.server.stop()

    def start(self):
        self.server.start()
        seed(self.server, self.items)


def test_memcached_down_under_load_answers_retry_and_recovers(tmp_path):
    """memcached stopped under load: every lookup is answered RETRY within
    proxymap_backend_timeout while a file table keeps answering; after the
    restart lookups are found again, with the same worker."""
    with MemcachedServer() as server:
        items = {b"fault:alice@example.com": b"alice.local@mail.example.com"}
        seed(server, items)
        i = WorkerInstance(tmp_path)
        spec = write_cfs(i, server, {"fault": "key_format = fault:%s\n"})["fault"]
        check_outage_and_recovery(i, spec, Reseeded(server, items), "lookup failed after")
