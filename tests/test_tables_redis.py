"""redis: (ours; Postfix has no Redis client) driven by real Postfix clients.

The suite starts Debian's redis-server on a UNIX socket in a temporary
directory (tests/servers.py, stopped by pid). Postfix has no redis table
to compare with, so the oracle is a Postfix table with the same records:
real `postmap -q` and `-d` through our worker (and our client's FIRST/NEXT) (`proxy:redis:FILE`,
proxywrite for deletes) give what they give on an lmdb: table built by
real postmap from the same pairs. Then: key_format, domain, ttl and ACL
passwords as documented; a walk over more keys than one SCAN batch, with
each key deleted as it is seen (what postscreen's and verify's cache
cleanup does); 64 clients sharing a few connections; redis stopped under
load answers RETRY while a file table keeps answering, and recovers when
it is back; real verify(8) keeps its cache in redis through our
proxywrite; a real Redis Sentinel names the master; TLS with a CA of the
test's own (openssl).
"""

import os
import shutil
import socket

import pytest

from servers import RedisServer, free_loopback_port as free_port
from sqldata import check_outage_and_recovery, check_pool_bound
from worker_fixture import RawClient, WorkerInstance
from proxymap import dictflags as F
from proxymap.client import ProxyClient
from proxymap.conventions.service_sockets import service_socket_path
from proxymap.protocol import NOKEY, OK, SEQ_FIRST, SEQ_NEXT
from proxymap.tables.redis import glob_escape, parse_host, scan_pattern

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")

PAIRS = {"alice@example.com": "alice.local@mail.example.com", "bob@example.org": "bob value",
         "with space": "spaced value", "ünï@例え.jp": "ünïcode", "plain": "plain value",
         "100%": "percent"}
KEYS = [*PAIRS, "ALICE@Example.COM", "Bob@EXAMPLE.org", "missing", "x@", "@example.com"]
CONFIGS = {
    "plain": "",
    "prefix": "key_format = psc:%s\n",
    "parts": "key_format = %d/%u\n",
    "domain": "domain = example.com\n",
    "ttl": "key_format = ttl:%s\nttl = 600\n",
    "acl": "username = pm\npassword = secret\nkey_format = psc:%s\n",
    "badpass": "username = pm\npassword = wrong\n",
    "walk": "key_format = walk:%s\n",
}


@pytest.fixture(scope="module")
def rd():
    with RedisServer() as server:
        server.client = redis.Redis(unix_socket_path=server.socket)
        for key, value in PAIRS.items():
            server.client.set(key, value)
            server.client.set("psc:" + key, "psc " + value)
        server.client.set("example.com/alice", "parts value")
        server.client.execute_command("ACL", "SETUSER", "pm", "on", ">secret", "~*", "+@all")
        yield server


def write_cfs(inst, rd, configs, extra=""):
    specs = {}
    for name, body in configs.items():
        cf = f"{inst.config_dir}/redis-{name}.cf"
        with open(cf, "w", encoding="utf-8") as f:
            f.write(f"hosts = unix:{rd.socket}\n{extra}{body}")
        specs[name] = f"redis:{cf}"
    return specs


@pytest.fixture(scope="module")
def inst(rd, tmp_path_factory):
    i = WorkerInstance(tmp_path_factory.mktemp("redis"))
    i.cfs = write_cfs(i, rd, CONFIGS)
    i.lmdb = f"lmdb:{i.config_dir}/pairs"
    with open(f"{i.config_dir}/pairs", "w", encoding="utf-8") as f:
        # a Postfix source file cannot hold a key with a space: redis can
        f.writelines(f"{k} {v}\n" for k, v in PAIRS.items() if " " not in k)
    assert i.postmap(i.lmdb).returncode == 0
    listed = " ".join(f"proxy:{s}" for s in i.cfs.values())
    i.write_main_cf(read_maps=f"{listed} proxy:{i.lmdb}", write_maps=f"{listed} proxy:{i.lmdb}")
    i.start("proxymap")
    i.start("proxywrite")
    yield i
    i.stop()


def test_lookups_answer_like_a_postfix_table_with_the_same_records(inst):
    found = 0
    for key in (k for k in KEYS if " " not in k):
        ours = inst.postmap("-q", key, f"proxy:{inst.cfs['plain']}")
        theirs = inst.postmap("-q", key, inst.lmdb)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (key, ours)
        found += ours.returncode == 0
    assert found >= len(PAIRS) - 1


def walk_all(inst, spec, service="proxymap"):
    """Every record of a FIRST/NEXT walk through our worker (Postfix 3.7's
    postmap refuses -s through proxy:; real verify(8) walks below)."""
    records = []
    with ProxyClient(inst.socket_path(service), timeout=60) as client:
        first = True
        while True:
            status, key, value = client.sequence(spec, 0, first)
            if status != OK:
                assert status == NOKEY, status
                return records
            records.append((key.decode(), value.decode()))
            first = False


def test_sequence_walks_the_key_format_prefix(inst, rd):
    ours = walk_all(inst, inst.cfs["prefix"])
    assert sorted(ours) == sorted((k, "psc " + v) for k, v in PAIRS.items())
    theirs = walk_all(inst, inst.lmdb)      # a Postfix table with the same records
    assert sorted(theirs) == sorted((k, v) for k, v in PAIRS.items() if " " not in k)
    assert len(walk_all(inst, inst.cfs["plain"])) == len(PAIRS) * 2 + 1   # every key


def test_key_format_domain_and_acl(inst):
    def q(key, table):
        r = inst.postmap("-q", key, f"proxy:{inst.cfs[table]}")
        return r.returncode, r.stdout
    assert q("ALICE@Example.COM", "prefix") == (0, b"psc alice.local@mail.example.com\n")
    assert q("alice@example.com", "parts") == (0, b"parts value\n")
    assert q("plain", "parts")[0] == 1                 # no domain: not looked up
    assert q("alice@example.com", "domain")[0] == 0
    assert q("bob@example.org", "domain")[0] == 1      # outside `domain`
    assert q("with space", "acl") == (0, b"psc spaced value\n")
    r = inst.postmap("-q", "plain", f"proxy:{inst.cfs['badpass']}")
    assert r.returncode == 1 and b"query error" in r.stderr
    log = inst.log()
    assert "connect to redis server" in log and "Traceback" not in log


def proxywrite(inst, request, table, **attrs):
    c = RawClient(inst.socket_path("proxywrite"))
    try:
        return c.request(request=request, table=table, flags=str(F.FOLD_FIX).encode(), **attrs)
    finally:
        c.close()


def test_update_delete_and_ttl_through_proxywrite(inst, rd):
    spec = inst.cfs["ttl"].encode()
    reply = proxywrite(inst, request=b"update", table=spec, key=b"New@Example.COM", value=b"v1")
    assert reply[b"status"] == b"0"
    assert rd.client.get("ttl:new@example.com") == b"v1"
    assert 0 < rd.client.ttl("ttl:new@example.com") <= 600
    r = inst.postmap("-q", "new@example.com", f"proxy:{inst.cfs['ttl']}")
    assert r.stdout == b"v1\n"
    # real postmap -d through proxywrite, beside the same deletes on lmdb
    assert inst.postmap("-i", inst.lmdb, input=b"new@example.com v1\n").returncode == 0
    for key in ("new@example.com", "new@example.com"):
        ours = inst.postmap("-d", key, f"proxy:{inst.cfs['ttl']}")
        theirs = inst.postmap("-d", key, inst.lmdb)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours
    assert rd.client.get("ttl:new@example.com") is None
    reply = proxywrite(inst, request=b"update", table=inst.cfs["parts"].encode(), key=b"plain",
                       value=b"x")
    assert reply[b"status"] == b"1"
    assert 'skipping update for name "plain": empty lookup key expansion' in inst.log()


def test_walk_with_deletes_sees_every_key_once(inst, rd):
    many = {f"walk:k{n:04d}": f"v{n}" for n in range(350)}      # several SCAN batches
    rd.client.mset(many)
    spec = inst.cfs["walk"]
    c = RawClient(inst.socket_path("proxywrite"), timeout=60)
    seen = []
    function = SEQ_FIRST
    while True:
        reply = c.request(request=b"sequence", table=spec.encode(), flags=b"0",
                          function=str(function).encode())
        if reply[b"status"] != b"0":
            assert reply[b"status"] == b"1", reply
            break
        seen.append((reply[b"key"], reply[b"value"]))
        gone = c.request(request=b"delete", table=spec.encode(), flags=b"0", key=reply[b"key"])
        assert gone[b"status"] == b"0"
        function = SEQ_NEXT
    c.close()
    assert sorted(seen) == sorted((k[5:].encode(), v.encode()) for k, v in many.items())
    assert rd.client.keys("walk:*") == []


def test_64_clients_share_a_few_connections(rd, tmp_path):
    i = WorkerInstance(tmp_path)
    specs = write_cfs(i, rd, {"pool": ""})

    def connections():
        return int(rd.client.info("clients")["connected_clients"]) - 1   # not ours
    before = connections()
    held = check_pool_bound(i, specs["pool"], lambda: connections() - before)
    print(f"FIGURES redis: 64 clients x 3 lookups through one worker held {held}"
          f" connections (proxymap_backend_threads = 3)")


def test_redis_down_under_load_answers_retry_and_recovers(tmp_path):
    with RedisServer() as server:
        client = redis.Redis(unix_socket_path=server.socket)
        client.set("alice@example.com", "alice.local@mail.example.com")
        client.close()
        i = WorkerInstance(tmp_path)
        specs = write_cfs(i, server, {"fault": "retry_interval = 1\n"})
        check_outage_and_recovery(i, specs["fault"], server, "no Redis server answered")


def test_parsing_helpers():
    assert parse_host("unix:/run/r.sock") == ("unix", "/run/r.sock", 0)
    assert parse_host("inet:[::1]:7000") == ("inet", "::1", 7000)
    assert parse_host("localhost") == ("inet", "localhost", 6379)
    assert parse_host("10.0.0.1:6380") == ("inet", "10.0.0.1", 6380)
    with pytest.raises(ValueError):
        parse_host("inet:host:port")
    assert scan_pattern("psc:%s") == ("psc:", "")
    assert scan_pattern("a%%b%s.x") == ("a%b", ".x")
    assert scan_pattern("%d/%u") is None and scan_pattern("%s%s") is None
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


@pytest.mark.interop
@pytest.mark.skipif(os.geteuid() != 0, reason="a real Postfix master needs root")
def test_real_verify_keeps_its_cache_in_redis(tmp_path):
    """Real verify(8) (Postfix 3.7) with address_verify_map =
    proxy:redis:FILE runs its cache cleanup through our proxywrite: a
    sequence over redis, the expired records deleted, the stamp updated."""
    from tests.instance import temporary_instance, wait_for
    from tests.test_real_daemons import RealPostfix
    with RedisServer() as server:
        client = redis.Redis(unix_socket_path=server.socket)
        client.mset({"keep@example.com": "0:0:4102444800:ok", "old1@example.com": "0:0:1:ok",
                     "old2@example.com": "0:0:1:ok"})
        with temporary_instance(tmp_path) as ours:
            cf = os.path.join(ours.table_dir, "verify.cf")
            with open(cf, "w") as f:
                f.write(f"hosts = unix:{server.socket}\n")
            cache = f"redis:{cf}"
            ours.write_main_cf(proxy_read_maps=f"proxy:{cache}",
                               proxy_write_maps=f"proxy:{cache}",
                               maillog_file=os.path.join(ours.root, "ours.log"),
                               maillog_file_prefixes=ours.root)
            ours.start()
            real = RealPostfix(ours.root, ours, free_port(), f"""\
address_verify_map = proxy:{cache}
address_verify_cache_cleanup_interval = 1s
""")
            try:
                real.start()
                with socket.socket(socket.AF_UNIX) as s:   # waking verify starts its cleanup
                    s.connect(service_socket_path(real.queue_dir, "verify"))
                    try:
                        wait_for(lambda: client.get("_LAST_CACHE_CLEANUP_COMPLETED_"), 60,
                                 what="verify's cache cleanup in redis")
                    except AssertionError as exc:
                        with open(os.path.join(ours.root, "ours.log"), errors="replace") as f:
                            raise AssertionError(f"{exc}\n{real.log()[-3000:]}\n{f.read()}") \
                                from None
                log = real.log()
            finally:
                real.stop()
        assert client.get("keep@example.com") == b"0:0:4102444800:ok"
        assert client.get("old1@example.com") is None and client.get("old2@example.com") is None
        assert "retained=1 dropped=2" in log, log
        client.close()


def test_sentinels_name_the_master(tmp_path):
    """With `sentinels`, redis-py asks a real Redis Sentinel for the master."""
    from servers import RedisSentinel
    with RedisServer(port=free_port()) as master:
        with RedisSentinel(free_port(), master.port) as sentinel:
            client = redis.Redis(unix_socket_path=master.socket)
            client.set("alice@example.com", "from the master")
            i = WorkerInstance(tmp_path)
            cf = f"{i.config_dir}/sentinel.cf"
            with open(cf, "w") as f:
                f.write(f"sentinels = inet:127.0.0.1:{sentinel.port}\n"
                        "sentinel_master = mymaster\n")
            spec = f"redis:{cf}"
            i.write_main_cf(read_maps=f"proxy:{spec}", write_maps=f"proxy:{spec}")
            i.start("proxymap")
            i.start("proxywrite")
            try:
                r = i.postmap("-q", "Alice@Example.com", f"proxy:{spec}")
                assert (r.returncode, r.stdout) == (0, b"from the master\n"), (r, i.log())
                assert proxywrite(i, b"update", spec.encode(), key=b"new",
                                  value=b"v")[b"status"] == b"0"
                assert client.get("new") == b"v"
            finally:
                i.stop()
            client.close()


def make_certificates(directory) -> dict:
    """A CA and a server certificate for 127.0.0.1 (openssl), for TLS."""
    import subprocess
    paths = {n: os.path.join(directory, f"{n}.pem") for n in ("ca", "cakey", "cert", "key")}
    ext = os.path.join(directory, "san.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName = IP:127.0.0.1\n")
    csr = os.path.join(directory, "server.csr")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
         "-keyout", paths["cakey"], "-out", paths["ca"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", paths["key"], "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["cakey"],
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", paths["cert"]]):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    for path in paths.values():
        os.chmod(path, 0o644)
    return paths


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_to_a_server_with_a_certificate_of_our_ca(tmp_path):
    import tempfile
    certs_dir = tempfile.mkdtemp(prefix="pmtest-certs-")    # redis-server's user reads it
    os.chmod(certs_dir, 0o755)
    try:
        certs = make_certificates(certs_dir)
        tls_port = free_port()
        server = RedisServer(options=(
            "--tls-port", str(tls_port), "--tls-cert-file", certs["cert"], "--tls-key-file",
            certs["key"], "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "no"))
    except BaseException:
        shutil.rmtree(certs_dir, ignore_errors=True)
        raise
    try:
        client = redis.Redis(unix_socket_path=server.socket)
        client.set("secret@example.com", "over tls")
        i = WorkerInstance(tmp_path / "inst")
        specs = {}
        for name, ca in (("good", certs["ca"]), ("wrong_ca", certs["cert"])):
            cf = f"{i.config_dir}/tls-{name}.cf"
            with open(cf, "w") as f:
                f.write(f"hosts = inet:127.0.0.1:{tls_port}\ntls = yes\ntls_CAfile = {ca}\n")
            specs[name] = f"redis:{cf}"
        i.write_main_cf(read_maps=" ".join(f"proxy:{s}" for s in specs.values()))
        i.start("proxymap")
        try:
            r = i.postmap("-q", "secret@example.com", f"proxy:{specs['good']}")
            assert (r.returncode, r.stdout) == (0, b"over tls\n"), (r, i.log())
            r = i.postmap("-q", "secret@example.com", f"proxy:{specs['wrong_ca']}")
            assert r.returncode == 1 and b"query error" in r.stderr   # not verified: RETRY
            assert "certificate verify failed" in i.log()
        finally:
            i.stop()
        client.close()
    finally:
        server.cleanup()
        shutil.rmtree(certs_dir, ignore_errors=True)


def test_a_server_that_does_not_start_leaves_no_directory(monkeypatch):
    """tests/servers.py: a redis-server that exits at once (an unknown
    option) raises, with neither its process nor its temporary directory
    left behind."""
    import servers
    made = []
    real_mkdtemp = servers.tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(servers.tempfile, "mkdtemp", recording_mkdtemp)
    with pytest.raises(RuntimeError, match="exited"):
        RedisServer(options=("--no-such-option", "x"))
    assert len(made) == 1 and not os.path.exists(made[0])
