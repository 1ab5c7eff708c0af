"""Real Postfix programs against our worker.

Real `postmap` (Postfix 3.7, Debian) is the client here: queries through
`proxy:hash:` and `proxy:btree:` must give the same answers as a direct read
of the same file, refusals must look like refusals to it, and the verify(8)
cache-cleanup exchange captured from real Postfix is replayed byte for byte.
"""

import random
import string

import pytest

from worker_fixture import WorkerInstance, RawClient

N_KEYS = 3000


def make_source(path, n):
    rng = random.Random(7)
    lines, keys = [], []
    for i in range(n):
        key = f"user{i}-{''.join(rng.choices(string.ascii_letters, k=6))}@Example.{rng.choice(['com', 'org'])}"
        keys.append(key)
        lines.append(f"{key}\tvalue {i} {''.join(rng.choices(string.ascii_lowercase, k=10))}")
    lines.append("Grüße@例え.jp\tunicode value")
    keys.append("Grüße@例え.jp")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return keys


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    i = WorkerInstance(root)
    src = root / "etc" / "virtual"
    keys = make_source(src, N_KEYS)
    btree_src = root / "etc" / "cache"
    btree_src.write_bytes(src.read_bytes())
    for spec in (f"hash:{src}", f"btree:{btree_src}"):
        r = i.postmap(spec)
        assert r.returncode == 0, r.stderr
    i.write_main_cf(read_maps=f"proxy:hash:{src} proxy:btree:{btree_src}",
                    write_maps=f"proxy:btree:{btree_src}")
    i.keys, i.hash, i.btree = keys, f"hash:{src}", f"btree:{btree_src}"
    i.start("proxymap")
    i.start("proxywrite")
    yield i
    i.stop()


@pytest.mark.parametrize("kind", ["hash", "btree"])
def test_bulk_queries_through_the_proxy_match_a_direct_read(inst, kind):
    table = getattr(inst, kind)
    rng = random.Random(1)
    probe = rng.sample(inst.keys, 1500) + [f"missing{i}@example.com" for i in range(500)]
    probe = [k.upper() if i % 3 == 0 else k for i, k in enumerate(probe)]
    stdin = ("\n".join(probe) + "\n").encode()
    direct = inst.postmap("-q", "-", table, input=stdin)
    proxied = inst.postmap("-q", "-", f"proxy:{table}", input=stdin)
    assert direct.returncode == 0 and proxied.returncode == 0, proxied.stderr
    assert proxied.stdout == direct.stdout
    assert len(proxied.stdout.splitlines()) == 1500


def test_single_queries_and_exit_codes(inst):
    ok = inst.postmap("-q", inst.keys[10].lower(), f"proxy:{inst.hash}")
    assert ok.returncode == 0 and ok.stdout.startswith(b"value 10 ")
    utf8 = inst.postmap("-q", "GRÜSSE@例え.jp", f"proxy:{inst.hash}")
    assert (utf8.returncode, utf8.stdout) == (0, b"unicode value\n")
    missing = inst.postmap("-q", "nobody@nowhere", f"proxy:{inst.hash}")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, b"", b"")


def test_unlisted_table_is_refused(inst):
    r = inst.postmap("-q", "x", f"proxy:hash:{inst.config_dir}/other")
    assert r.returncode == 1
    assert b'proxymap service is not configured for table "hash:' in r.stderr
    assert "request for unapproved table" in inst.log()


def test_delete_through_proxywrite_is_visible_to_a_direct_read_at_once(inst):
    key = inst.keys[42]
    assert inst.postmap("-q", key, inst.btree).returncode == 0
    r = inst.postmap("-d", key, f"proxy:{inst.btree}")
    assert r.returncode == 0, r.stderr
    assert inst.postmap("-q", key, inst.btree).returncode == 1
    # and through the read service
    assert inst.postmap("-q", key, f"proxy:{inst.btree}").returncode == 1
    again = inst.postmap("-d", key, f"proxy:{inst.btree}")
    assert again.returncode == 1


def test_delete_on_a_table_not_in_proxy_write_maps_is_refused(inst):
    r = inst.postmap("-d", inst.keys[1], f"proxy:{inst.hash}")
    assert r.returncode == 1
    assert b"proxywrite service is not configured" in r.stderr


# The verify(8) cache cleanup, as captured from Postfix 3.7.11 (spec 11.1).
def verify_exchange(table):
    t = table.encode()
    seq = b"request\0sequence\0table\0" + t + b"\0flags\x00590208\0function\0"
    upd = b"request\0update\0table\0" + t + b"\0flags\x00590208\0key\0"
    dele = b"request\0delete\0table\0" + t + b"\0flags\x00590208\0key\0"
    return [
        (b"request\0open\0table\0" + t + b"\0flags\x0065536\0\0", b"status\x000\0flags\x0065564\0\0"),
        (b"request\0lookup\0table\0" + t + b"\0flags\x00590208\0key\0_LAST_CACHE_CLEANUP_COMPLETED_\0\0",
         b"status\x001\0value\0\0\0"),
        (seq + b"0\0\0", b"status\x000\0key\0keep@example.com\0value\x000:0:1795597808:ok\0\0"),
        (seq + b"1\0\0", b"status\x000\0key\0old1@example.com\0value\x000:0:1:ok\0\0"),
        (seq + b"1\0\0", b"status\x000\0key\0old2@example.com\0value\x000:0:1:ok\0\0"),
        (dele + b"old1@example.com\0\0", b"status\x000\0\0"),
        (upd + b"user@example.com\0value\x000:0:1795597811:ok\0\0", b"status\x000\0\0"),
        (seq + b"1\0\0", b"status\x000\0key\0user@example.com\0value\x000:0:1795597811:ok\0\0"),
        (dele + b"old2@example.com\0\0", b"status\x000\0\0"),
        (seq + b"1\0\0", b"status\x001\0key\0\0value\0\0\0"),
        (upd + b"_LAST_CACHE_CLEANUP_COMPLETED_\0value\x001795597811\0\0", b"status\x000\0\0"),
    ]


def test_verify_cache_cleanup_exchange_byte_for_byte(tmp_path):
    i = WorkerInstance(tmp_path)
    src = tmp_path / "etc" / "verify_cache"
    src.write_text("keep@example.com 0:0:1795597808:ok\nold1@example.com 0:0:1:ok\n"
                   "old2@example.com 0:0:1:ok\n")
    assert i.postmap(f"btree:{src}").returncode == 0
    table = f"btree:{src}"
    i.write_main_cf(write_maps=f"proxy:{table}")
    i.start("proxywrite")
    try:
        c = RawClient(i.socket_path("proxywrite"))
        for request, expected in verify_exchange(table):
            c.send(request)
            from proxymap.protocol import encode
            assert encode(c.read()) == expected, request
    finally:
        i.stop()
    dump = i.postmap("-s", table)
    assert sorted(dump.stdout.decode().splitlines()) == [
        "_LAST_CACHE_CLEANUP_COMPLETED_\t1795597811", "keep@example.com\t0:0:1795597808:ok",
        "user@example.com\t0:0:1795597811:ok"]


def test_postmap_delete_beside_a_verify_style_lifetime_lock(tmp_path):
    """verify(8) holds its cache under OPEN_LOCK in our proxywrite worker;
    a `postmap -d` through the same worker (a second instance, LOCK per
    request) must neither wait on the worker's own lock nor be refused."""
    i = WorkerInstance(tmp_path)
    src = tmp_path / "etc" / "cache"
    src.write_text("a@example.com 1\nb@example.com 2\n")
    assert i.postmap(f"btree:{src}").returncode == 0
    table = f"btree:{src}"
    i.write_main_cf(write_maps=f"proxy:{table}")
    i.start("proxywrite")
    try:
        c = RawClient(i.socket_path("proxywrite"))
        assert c.request(request="open", table=table, flags=65536)[b"status"] == b"0"
        r = i.postmap("-d", "a@example.com", f"proxy:{table}")
        assert r.returncode == 0, r.stderr
        got = c.request(request="lookup", table=table, flags=590208, key="a@example.com")
        assert got[b"status"] == b"1"
        got = c.request(request="lookup", table=table, flags=590208, key="b@example.com")
        assert got == {b"status": b"0", b"value": b"2"}
    finally:
        i.stop()
    assert "locked by another process" not in i.log()


def test_table_rebuilt_by_real_postmap_is_served_fresh_without_a_restart(tmp_path):
    """Postfix's proxymap exits when a table file changes and its clients
    reconnect; ours reopens the table before the next request: the same
    connection, the same worker process, the new content."""
    i = WorkerInstance(tmp_path)
    src = tmp_path / "etc" / "map"
    src.write_text("key old-value\n")
    assert i.postmap(f"hash:{src}").returncode == 0
    table = f"hash:{src}"
    i.write_main_cf(read_maps=f"proxy:{table}")
    proc = i.start("proxymap")
    try:
        c = RawClient(i.socket_path())
        assert c.request(request="lookup", table=table, flags=64, key="key")[b"value"] == b"old-value"
        src.write_text("key new-value\nadded yes\n")
        assert i.postmap(f"hash:{src}").returncode == 0      # rebuilt in place, same inode
        assert c.request(request="lookup", table=table, flags=64, key="key")[b"value"] == b"new-value"
        assert c.request(request="lookup", table=table, flags=64, key="added")[b"value"] == b"yes"
        r = i.postmap("-q", "added", f"proxy:{table}")
        assert (r.returncode, r.stdout) == (0, b"yes\n")
        assert proc.poll() is None
    finally:
        i.stop()
    assert "has changed -- reopening" in i.log()
