"""The answer cache in front of remote tables (proxymap_remote_cache_ttl).

A remote table's server tells a worker nothing when a record changes
elsewhere, so its answers are kept only for a time set in main.cf (off by
default). The tests use a real redis-server (tests/servers.py, stopped by
pid) and real `postmap -q` through our worker; the TTLs are an hour, so
nothing here depends on the clock: a record changed behind the worker's
back is still answered the old way (found, and not found), while our own
writes through proxywrite are seen at once, and without the parameter every
change is seen at once. Expiry itself is tested on AnswerCache with an
injected clock (tests/test_answercache.py).

A table's parameter file may set its own cache (proxymap_cache_ttl,
_negative_ttl, _entries), which real Postfix's pgsql table ignores: tested
with a real PostgreSQL, real `postmap -q` on the file directly and through
our master, and the table's hit and miss counts in `status`.
"""

import shutil

import pytest

from servers import PostgresServer, RedisServer, find_postgres
from tests.instance import temporary_instance, wait_for
from worker_fixture import WorkerInstance
from proxymap import dictflags as F
from proxymap.client import ProxyClient
from proxymap.protocol import NOKEY, OK

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

CACHED = "proxymap_remote_cache_ttl = 3600s\nproxymap_remote_cache_negative_ttl = 1h\n"


@pytest.fixture(scope="module")
def rd():
    with RedisServer() as server:
        server.client = redis.Redis(unix_socket_path=server.socket)
        yield server


def instance(root, rd, extra):
    inst = WorkerInstance(root)
    cf = f"{inst.config_dir}/redis.cf"
    with open(cf, "w") as f:
        f.write(f"hosts = unix:{rd.socket}\nkey_format = {root.name}:%s\n")
    inst.spec = f"redis:{cf}"
    inst.prefix = f"{root.name}:"
    inst.write_main_cf(read_maps=f"proxy:{inst.spec}", write_maps=f"proxy:{inst.spec}",
                       extra=extra)
    inst.start("proxymap")
    inst.start("proxywrite")
    return inst


def query(inst, key):
    done = inst.postmap("-q", key, f"proxy:{inst.spec}")
    assert done.returncode in (0, 1), done.stderr.decode()
    return done.stdout.decode().strip() if done.returncode == 0 else None


@pytest.mark.parametrize("cached", [True, False], ids=["ttl", "default"])
def test_changes_made_elsewhere_within_the_ttl(rd, tmp_path, cached):
    inst = instance(tmp_path / ("cached" if cached else "plain"), rd, CACHED if cached else "")
    try:
        rd.client.set(inst.prefix + "alice", "first")
        assert query(inst, "alice") == "first"
        assert query(inst, "nobody") is None
        rd.client.set(inst.prefix + "alice", "second")     # behind the worker's back
        rd.client.set(inst.prefix + "nobody", "now here")
        if cached:
            assert (query(inst, "alice"), query(inst, "nobody")) == ("first", None)
        else:
            assert (query(inst, "alice"), query(inst, "nobody")) == ("second", "now here")
    finally:
        inst.stop()


def test_own_writes_are_seen_at_once(rd, tmp_path):
    inst = instance(tmp_path / "writes", rd, CACHED)
    try:
        table = inst.spec
        rd.client.set(inst.prefix + "bob", "old")
        with ProxyClient(inst.socket_path("proxywrite"), timeout=30) as client:
            assert client.lookup(table, F.LOCK, b"bob") == (OK, b"old")
            assert client.lookup(table, F.LOCK, b"carol") == (NOKEY, b"")
            assert client.update(table, F.LOCK | F.DUP_REPLACE, b"bob", b"new") == (OK,)
            assert client.update(table, F.LOCK | F.DUP_REPLACE, b"carol", b"added") == (OK,)
            assert client.lookup(table, F.LOCK, b"bob") == (OK, b"new")
            assert client.lookup(table, F.LOCK, b"carol") == (OK, b"added")
            assert client.delete(table, F.LOCK, b"bob") == (OK,)
            assert client.lookup(table, F.LOCK, b"bob") == (NOKEY, b"")
        assert rd.client.get(inst.prefix + "carol") == b"added"
        assert rd.client.get(inst.prefix + "bob") is None
    finally:
        inst.stop()


# -- a table's own settings, in its parameter file ------------------------------------

OWN_CACHE = "proxymap_cache_ttl = 1h\nproxymap_cache_negative_ttl = 3600\n"


@pytest.mark.skipif(find_postgres() is None, reason="PostgreSQL is not installed")
def test_the_tables_file_sets_its_cache_and_postfix_ignores_it(tmp_path):
    """Two pgsql files on one server, main.cf without a remote TTL: the
    one with proxymap_cache_ttl keeps its answers (found and not found)
    across a change made behind the worker's back, the other sees it at
    once; real Postfix reads the same file without a word and sees the
    change. `status` counts the cached table's hits and misses."""
    with PostgresServer() as pg:
        pg.psql("CREATE DATABASE mail")
        pg.psql("CREATE TABLE t (k text, v text); INSERT INTO t VALUES ('alice', 'first')",
                db="mail")
        with temporary_instance(tmp_path) as inst:
            specs = {}
            for name, extra in (("own", OWN_CACHE), ("plain", "")):
                cf = f"{inst.config_dir}/{name}.cf"
                with open(cf, "w") as f:
                    f.write(f"hosts = unix:{pg.socket_dir}\nuser = postgres\ndbname = mail\n"
                            f"query = SELECT v FROM t WHERE k='%s'\n{extra}")
                specs[name] = f"pgsql:{cf}"
            inst.write_main_cf(proxy_read_maps=" ".join(f"proxy:{s}" for s in specs.values()))
            inst.start()

            def ask(key, spec):
                done = inst.postmap("-q", key, spec)
                assert done.returncode in (0, 1) and not done.stderr, done
                return done.stdout.strip() or None
            for spec in specs.values():
                assert (ask("alice", spec), ask("nobody", spec)) == ("first", None)
                assert (ask("alice", f"proxy:{spec}"), ask("nobody", f"proxy:{spec}")) == \
                    ("first", None)
            pg.psql("UPDATE t SET v = 'second'; INSERT INTO t VALUES ('nobody', 'here')",
                    db="mail")
            own, plain = specs["own"], specs["plain"]
            assert (ask("alice", f"proxy:{own}"), ask("nobody", f"proxy:{own}")) == \
                ("first", None)                                     # kept for an hour
            assert (ask("alice", f"proxy:{plain}"), ask("nobody", f"proxy:{plain}")) == \
                ("second", "here")
            assert (ask("alice", own), ask("nobody", own)) == ("second", "here")   # Postfix

            def cache_of(spec):
                tables = inst.raw_status().get("services", {}).get("proxymap", {}) \
                    .get("tables", {})
                return tables.get(spec, {}).get("cache")
            # own: 2 misses (first look), 2 hits; plain: no cache, no counts
            assert wait_for(lambda: cache_of(own) == {"hits": 2, "misses": 2}, 30,
                            what="the cached table's hits and misses")
            assert cache_of(plain) is None
            assert "hits 2 misses 2" in inst.control("status").stdout


def test_cache_settings_parse_and_override_main_cf():
    """Parameters.cache_settings(): main.cf's time syntax, a count, errors
    with the table's name; the dispatcher takes a table's own settings over
    main.cf's, in both directions (0 turns main.cf's cache off)."""
    from proxymap.dispatch import Dispatcher
    from proxymap.offload import Offloader
    from proxymap.tables.backend import BackendTable
    from proxymap.tables.base import TableOpenError
    from proxymap.tables.dbcommon import Parameters

    def settings(**values):
        return Parameters("/etc/postfix/t.cf", values, "/etc/postfix/t.cf").cache_settings()
    assert settings() == {}
    assert settings(proxymap_cache_ttl="5m", proxymap_cache_negative_ttl="30",
                    proxymap_cache_entries="7") == {"ttl": 300, "negative_ttl": 30,
                                                    "entries": 7}
    with pytest.raises(TableOpenError, match=r"^/etc/postfix/t.cf: bad time configuration:"
                                             r" proxymap_cache_ttl = soon$"):
        settings(proxymap_cache_ttl="soon")
    with pytest.raises(TableOpenError, match="bad numerical configuration: "
                                             "proxymap_cache_entries = -1"):
        settings(proxymap_cache_entries="-1")

    class Remote(BackendTable):
        def lookup(self, key):
            return None
    offload = Offloader()
    try:
        def cache_for(own, **main):
            dispatcher = Dispatcher("proxymap", set(), {}, offload=offload,
                                    cache_entries=main.get("entries", 100), cache_bytes=1 << 20,
                                    remote_ttl=main.get("ttl", 0),
                                    remote_negative_ttl=main.get("negative_ttl", 0))
            table = Remote("remote", "/x.cf", 0, False, {})
            table.cache_settings = own
            return dispatcher._answer_cache(table)
        assert cache_for({}) is None                                  # off by default
        cache = cache_for({"ttl": 60, "negative_ttl": 5})
        assert (cache.ttl, cache.negative_ttl, cache.max_entries) == (60, 5, 100)
        assert cache_for({"ttl": 0}, ttl=60) is None                  # the file turns it off
        assert cache_for({"entries": 0}, ttl=60) is None
        cache = cache_for({"entries": 3}, ttl=60, negative_ttl=2)     # main.cf's TTLs
        assert (cache.ttl, cache.negative_ttl, cache.max_entries) == (60, 2, 3)
    finally:
        offload.close()
