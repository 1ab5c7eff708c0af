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
"""

import shutil

import pytest

from servers import RedisServer
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
    server = RedisServer()
    try:
        server.client = redis.Redis(unix_socket_path=server.socket)
        yield server
    finally:
        server.cleanup()


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
