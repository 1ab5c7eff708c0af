"""Real Postfix 3.10 (Debian trixie) and 3.11 (Debian sid) clients against
our service, every case checked against that release's own C proxymap.

The chroots come from tests/newer_postfix.py. For each suite one instance
of our master and one private instance of the chroot's real Postfix serve
the same read tables (built once by the host's postmap); each has a write
table of its own with the same content. The chroot's `postmap` is then run
against both with the same arguments and the two outcomes (exit status,
stdout, stderr with the write table's path normalised) must be the same.
Raw 3.11-layout exchanges are compared byte for byte.
"""

from __future__ import annotations

import os
import itertools
import shutil
import socket
import subprocess
import threading

import pytest

from proxymap import dictflags as F
from proxymap.client import NOKEY, OK, ProxyClient
from proxymap.protocol import Decoder, GREETING, encode
from tests.instance import POSTMAP, mail_owner, temporary_instance, wait_for
from tests.newer_postfix import MASTER_CF, CPostfix, chroot_for, needs_root

pytestmark = [pytest.mark.interop, needs_root]

READ = {"alice": "alice@example.org", "bob": "bob@example.org", "Mixed": "case",
        "carol": "carol@example.org"}
WRITE = {f"w{i:02d}": f"value {i}" for i in range(12)}
TYPES = ("hash", "btree", "cdb", "lmdb")
#: tables walked while they change: 1,900 records that stay, 54 that churn
WALK_TYPES = ("btree", "hash", "lmdb")
STABLE = {f"stable{i:04d}": f"s{i}" for i in range(1900)}
CHURN = [f"churn{i:02d}" for i in range(54)]
WALK_ENTRIES = {**STABLE, **{k: "c" for k in CHURN}}


def build(postmap, path: str, entries: dict, type_name: str) -> None:
    with open(path, "w") as f:
        f.write("".join(f"{k} {v}\n" for k, v in entries.items()))
    if type_name not in ("texthash", "cidr"):
        done = postmap(f"{type_name}:{path}")
        assert done.returncode == 0, done.stderr
    for name in os.listdir(os.path.dirname(path)):
        shutil.chown(os.path.join(os.path.dirname(path), name), mail_owner(), mail_owner())


class Site:
    """Our master and the chroot's real Postfix, side by side."""

    def __init__(self, chroot, ours, c):
        self.chroot, self.ours, self.c = chroot, ours, c
        self.t = ours.table_dir

    def postmap(self, server, *args, stdin=None):
        done = self.chroot.postmap(server.config_dir, *args, input=stdin)
        return done.returncode, done.stdout, done.stderr.replace(server.write_dir, "WRITE")

    def both(self, *args, stdin=None, unordered=False):
        """Run the chroot's postmap against both; assert the same outcome
        (with `unordered`, the same lines in any order)."""
        ours = self.postmap(self.ours, *args, stdin=stdin)
        theirs = self.postmap(self.c, *args, stdin=stdin)
        if unordered:
            ours, theirs = [(rc, sorted(out.splitlines()), err) for rc, out, err in (ours, theirs)]
        assert ours == theirs, f"postmap {' '.join(args)}: ours {ours!r}, C {theirs!r}"
        return ours


def make_write_table(ours, root: str) -> tuple[str, str]:
    """A directory of its own with the write table (same content for both)."""
    os.makedirs(root)
    shutil.chown(root, mail_owner())
    build(ours.postmap, f"{root}/w", WRITE, "btree")
    return root, f"btree:{root}/w"


@pytest.fixture(scope="module", params=["trixie", "sid"])
def site(request, tmp_path_factory):
    chroot = chroot_for(request.param)
    with temporary_instance(tmp_path_factory.mktemp(request.param)) as ours:
        t = ours.table_dir
        for type_name in TYPES:
            build(ours.postmap, f"{t}/{type_name}", READ, type_name)
        build(ours.postmap, f"{t}/th", {"Foo": "upper", "bar": "lower"}, "texthash")
        with open(f"{t}/bin", "wb") as f:      # a value that is not UTF-8
            f.write(b"bad \xff\xfe\ngood fine\n")
        assert ours.postmap(f"hash:{t}/bin").returncode == 0
        shutil.chown(f"{t}/bin.db", mail_owner())
        with open(f"{t}/clients", "w") as f:
            f.write("127.0.0.0/8 loopback\n10.0.0.0/8 ten\n")
        for type_name in WALK_TYPES:
            build(ours.postmap, f"{t}/walk-{type_name}", WALK_ENTRIES, type_name)
        read_maps = [f"proxy:{type_name}:{t}/{type_name}" for type_name in TYPES]
        read_maps += [f"proxy:{type_name}:{t}/walk-{type_name}" for type_name in WALK_TYPES]
        read_maps += [f"proxy:texthash:{t}/th", f"proxy:cidr:{t}/clients",
                      f"proxy:hash:{t}/bin", f"proxy:hash:{t}/missing", "proxy:fail:oops"]

        walk_maps = [f"proxy:{type_name}:{t}/walk-{type_name}" for type_name in WALK_TYPES]

        def allow(write_table):
            return {"proxy_read_maps": " ".join(read_maps + [f"proxy:{write_table}"]),
                    "proxy_write_maps": " ".join([f"proxy:{write_table}"] + walk_maps)}

        ours.write_dir, ours.write_table = make_write_table(ours, f"{ours.root}/write-ours")
        ours.write_main_cf(**allow(ours.write_table))
        write_dir, write_table = make_write_table(ours, f"{ours.root}/write-c")
        c = CPostfix(chroot, f"{ours.root}/c", {**ours.main_settings(), **allow(write_table)})
        c.write_dir, c.write_table = write_dir, write_table
        ours.start()
        c.start()
        try:
            yield Site(chroot, ours, c)
        finally:
            c.stop()


def read_table(site, type_name):
    return f"proxy:{type_name}:{site.t}/{type_name}"


# -- postmap -q, -q -, -s, -d --------------------------------------------------------------

@pytest.mark.parametrize("type_name", TYPES)
def test_lookups(site, type_name):
    for key in ("alice", "MIXED", "mixed", "nosuch"):
        site.both("-q", key, read_table(site, type_name))
    rc, out, _ = site.both("-q", "alice", read_table(site, type_name))
    assert (rc, out) == (0, "alice@example.org\n")


def test_pattern_and_texthash_lookups(site):
    for key in ("127.0.0.1", "10.1.2.3", "192.0.2.1"):
        site.both("-q", key, f"proxy:cidr:{site.t}/clients")
    # 3.11 opens the instance with the client's folding bits: an upper-case
    # source key is reachable; 3.10 opens with none and it is not.
    rc, out, _ = site.both("-q", "foo", f"proxy:texthash:{site.t}/th")
    assert (rc, out) == ((0, "upper\n") if site.chroot.release >= (3, 11) else (1, ""))


def test_bulk_queries(site):
    keys = "".join(f"{k}\n" for k in ["alice", "nosuch", "bob", "MIXED", "x"] * 40)
    for type_name in TYPES:
        rc, out, err = site.both("-q", "-", read_table(site, type_name), stdin=keys)
        assert out.count("alice\talice@example.org\n") == 40


@pytest.mark.parametrize("type_name", TYPES + ("texthash",))
def test_sequence(site, type_name):
    table = (f"proxy:texthash:{site.t}/th" if type_name == "texthash"
             else read_table(site, type_name))
    # the order of a hash table in memory is the implementation's own
    rc, out, err = site.both("-s", table, unordered=type_name == "texthash")
    if site.chroot.release < (3, 11):
        assert rc == 1 and "can't sequence maps via the proxy service" in err
    else:
        assert rc == 0, err
        lines = out if isinstance(out, list) else out.splitlines()
        assert len(lines) == (2 if type_name == "texthash" else len(READ))


def test_deletes_through_proxywrite(site):
    for key in ("w03", "w03", "nosuch", "W05"):
        ours = site.postmap(site.ours, "-d", key, f"proxy:{site.ours.write_table}")
        theirs = site.postmap(site.c, "-d", key, f"proxy:{site.c.write_table}")
        assert ours == theirs
    dumps = [site.postmap(s, "-s", s.write_table) for s in (site.ours, site.c)]
    assert dumps[0] == dumps[1] and "w03\t" not in dumps[0][1] and "w04\t" in dumps[0][1]


def test_refusals_and_retries(site):
    rc, _, err = site.both("-q", "k", f"proxy:hash:{site.t}/unlisted")
    assert rc == 1 and "service is not configured" in err
    rc, _, err = site.both("-q", "k", f"proxy:hash:{site.t}/missing")
    assert rc == 1 and "query error" in err
    rc, _, err = site.both("-q", "k", "proxy:fail:oops")
    assert rc == 1
    rc, _, err = site.both("-d", "k", f"proxy:hash:{site.t}/hash")
    assert rc == 1 and "proxywrite service is not configured" in err


# -- the 3.11 wire layout, byte for byte -------------------------------------------------------

def exchange(path: str, requests: list[list[tuple[str, object]]]) -> list[bytes]:
    """Send each request on one connection; the raw reply lists."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        decoder = Decoder()
        pending = []

        def one():
            while not pending:
                data = sock.recv(65536)
                assert data, "server closed the connection"
                pending.extend(decoder.feed(data))
            return encode(pending.pop(0))
        assert one() == GREETING
        for req in requests:
            sock.sendall(encode(req))
            replies.append(one())
    return replies


def lookup311(table, inst, flags, key):
    return [("request", "lookup"), ("table", table), ("instance_flags", inst),
            ("flags", flags), ("key", key)]


def open311(table, inst):
    return [("request", "open"), ("table", table), ("instance_flags", inst)]


def seq311(table, inst, flags, function):
    return [("request", "sequence"), ("table", table), ("instance_flags", inst),
            ("flags", flags), ("function", function)]


POSTMAP_Q = F.UTF8_REQUEST | F.LOCK | F.DUP_WARN    # what postmap -q opens with


@pytest.fixture
def sid(site):
    if site.chroot.release < (3, 11):
        pytest.skip("the 3.11 layout")
    return site


def compare_raw(site, requests, service="proxymap"):
    ours = exchange(site.ours.socket_path(service), requests)
    try:
        theirs = exchange(site.c.socket_path(service), requests)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; C server log: {site.c.log()[-1500:]}") from None
    assert ours == theirs
    return ours


def test_311_open_reports_a_fresh_instance(sid):
    t = f"hash:{sid.t}/hash"
    replies = compare_raw(sid, [
        open311(t, POSTMAP_Q),
        lookup311(t, POSTMAP_Q, POSTMAP_Q | F.FIXED | F.TRY0NULL | F.TRY1NULL, "alice"),
        lookup311(t, POSTMAP_Q, F.FIXED | F.FOLD_FIX | F.TRY1NULL, "bob"),
        open311(t, POSTMAP_Q),
        open311(t, 0),
        open311(t, F.TRY0NULL),
    ])
    assert replies[3] == replies[0]


def test_311_flags_of_every_status(sid):
    t = sid.t
    compare_raw(sid, [
        lookup311(f"hash:{t}/missing", POSTMAP_Q, POSTMAP_Q, "k"),       # surrogate: RETRY
        open311(f"hash:{t}/missing", POSTMAP_Q),
        lookup311("fail:oops", 0, F.LOCK, "k"),                         # RETRY
        lookup311(f"hash:{t}/bin", POSTMAP_Q, POSTMAP_Q | F.UTF8_ACTIVE | F.FIXED
                  | F.TRY1NULL | F.TRY0NULL, "bad"),                    # CONFIG
        lookup311(f"hash:{t}/unlisted", 0, 77, "k"),                    # DENY
        open311(f"hash:{t}/unlisted", 0),
        seq311(f"hash:{t}/hash", 0, 0, 7),                               # BAD
        [("request", "update"), ("table", f"hash:{t}/hash"), ("instance_flags", 0),
         ("flags", 0), ("key", "k"), ("value", "v")],                    # DENY on read
        lookup311(f"cidr:{t}/clients", 0, F.PATTERN, "10.9.9.9"),
    ])
    # (a hash lookup whose flags carry neither TRY bit makes 3.11 panic; we
    # answer NOKEY: tests/test_dispatch.py)


def test_311_sequence_of_cdb_and_lmdb(sid):
    for type_name in ("cdb", "lmdb", "btree"):
        t = f"{type_name}:{sid.t}/{type_name}"
        flags = POSTMAP_Q | F.FIXED | F.TRY0NULL | F.TRY1NULL
        replies = compare_raw(sid, [open311(t, POSTMAP_Q)] +
                              [seq311(t, POSTMAP_Q, flags, 0)] +
                              [seq311(t, POSTMAP_Q, flags, 1)] * len(READ))
        # (one more NEXT makes 3.11's cdb panic: "no cursor"; we say NOKEY)
        assert replies[-1].startswith(b"status\x001\x00")


# -- walks while the table changes -------------------------------------------------------------

class Churn:
    """Updates and deletes of the CHURN keys through our proxywrite, and now
    and then a real `postmap -i` of some of them on the file itself, until
    stopped. Every record of STABLE stays untouched."""

    def __init__(self, site, type_name):
        self.site = site
        self.table = f"{type_name}:{site.t}/walk-{type_name}"
        self.stop = threading.Event()
        self.writes = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        path = self.site.ours.socket_path("proxywrite")
        flags = F.UTF8_REQUEST | F.LOCK | F.DUP_REPLACE
        try:
            with ProxyClient(path, timeout=30) as client:
                for i in itertools.count():
                    if self.stop.is_set() or i > 200_000:
                        return
                    key = CHURN[i % len(CHURN)].encode()
                    if i % 3 == 2:
                        client.delete(self.table, flags, key)
                    else:
                        client.update(self.table, flags, key, b"v%d" % i)
                    if i % 50 == 49:
                        done = subprocess.run(
                            [POSTMAP, "-c", self.site.ours.config_dir, "-i", self.table],
                            input="".join(f"{k} i{i}\n" for k in CHURN[:5]),
                            capture_output=True, text=True, timeout=60)
                        if done.returncode != 0:
                            self.errors.append(done.stderr)
                    self.writes += 1
        except Exception as exc:  # reported by the test
            self.errors.append(repr(exc))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def check_walk(keys: list[str], what: str) -> None:
    repeated = sorted(k for k in set(keys) if keys.count(k) > 1)
    assert not repeated, f"{what}: listed more than once: {repeated[:10]}"
    missing = set(STABLE) - set(keys)
    assert not missing, f"{what}: skipped {len(missing)} records, e.g. {sorted(missing)[:5]}"
    assert set(keys) <= set(WALK_ENTRIES), what


#: what our worker logs when a lock wait ran out and it answered RETRY
LOCK_WAIT_RAN_OUT = "table is locked by another process"


def walk_allowing_lock_waits(site, walk_once, what: str) -> list[str]:
    """The keys of one complete walk. Postfix blocks on a table lock without
    limit; our worker waits a bounded time (filelock.LOCK_WAIT_LIMIT) and then
    answers RETRY, which a client reports as a failed walk. On a loaded machine
    a real `postmap -i` can hold the lock that long, so a walk cut short counts
    as inconclusive, and is walked again, only when our log shows that wait ran
    out meanwhile; any other failure fails the test."""
    for _ in range(3):
        before = site.ours.log().count(LOCK_WAIT_RAN_OUT)
        ok, keys, detail = walk_once()
        if ok:
            return keys
        assert site.ours.log().count(LOCK_WAIT_RAN_OUT) > before, f"{what}: {detail}"
    pytest.fail(f"{what}: three walks in a row cut short by lock waits: {detail}")


@pytest.mark.parametrize("type_name", WALK_TYPES)
def test_walks_survive_changes(site, type_name):
    """A walk in progress never lists a record twice and never skips one
    present for the whole walk, while proxywrite and the real postmap
    change the table (each change makes our read worker reopen it)."""
    table = f"{type_name}:{site.t}/walk-{type_name}"

    def postmap_s():           # the real client, 3.11 layout
        rc, out, err = site.postmap(site.ours, "-s", f"proxy:{table}")
        return rc == 0, [line.split("\t")[0] for line in out.splitlines()], err

    def layout_37():           # 3.6-3.10 layout (3.10's postmap will not walk the proxy itself)
        # with LOCK, as every real walker asks: postmap -s adds it, and so
        # does the cache cleanup of verify/postscreen through proxy:. A walk
        # without it reads pages while another process writes them and has
        # no consistency (in Postfix's proxymap neither): see docs/tables.md
        flags = F.UTF8_REQUEST | F.LOCK
        keys = []
        with ProxyClient(site.ours.socket_path("proxymap"), timeout=30) as client:
            status, key, _ = client.sequence(table, flags, True)
            while status == OK:
                keys.append(key.decode())
                status, key, _ = client.sequence(table, flags, False)
        return status == NOKEY, keys, f"walk ended with status {status}"

    with Churn(site, type_name) as churn:
        for round_ in range(2):
            if site.chroot.release >= (3, 11):
                what = f"postmap -s, round {round_}"
                check_walk(walk_allowing_lock_waits(site, postmap_s, what), what)
            what = f"3.7 layout, round {round_}"
            check_walk(walk_allowing_lock_waits(site, layout_37, what), what)
    assert not churn.errors, churn.errors
    assert churn.writes > 0


# -- defaults that changed in 3.11 -------------------------------------------------------------

def test_311_defaults_match_postconf_of_311():
    """Our 3.11 defaults are sid's `postconf -d` text, and `config -d` shows
    the other generation's proxy_read_maps beside the one in effect."""
    from proxymap.conventions.mainconfig import MainConfig
    from proxymap.conventions.parameters import DEFAULTS_311, PROXY_READ_MAPS_DEFAULT
    chroot = chroot_for("sid")
    done = chroot.run("/usr/sbin/postconf", "-d", *sorted(DEFAULTS_311))
    assert done.returncode == 0, done.stderr
    theirs = dict(line.split(" =", 1) for line in done.stdout.splitlines())
    assert {k: v.strip() for k, v in theirs.items()} == DEFAULTS_311
    trixie = chroot_for("trixie").run("/usr/sbin/postconf", "-dh", "proxy_read_maps")
    assert trixie.stdout.strip() == PROXY_READ_MAPS_DEFAULT
    site_311 = MainConfig("/nonexistent", "/nonexistent/main.cf",
                          {"proxymap_postfix_version": ("3.11.7", 1)})
    assert site_311.defaults()["proxy_read_maps"] == DEFAULTS_311["proxy_read_maps"]


def test_311_site_relying_on_defaults(tmp_path):
    """A 3.11 site that relies on the defaults: tables named by a parameter
    only 3.11's proxy_read_maps lists, inside a /file/name value, and in a
    restriction class. Ours (proxymap_postfix_version = 3.11) serves them as
    3.11's C proxymap does; with 3.7's rules all three would be DENY."""
    chroot = chroot_for("sid")
    with temporary_instance(tmp_path) as ours:
        t = ours.table_dir
        for name in ("peers", "networks", "classy"):
            build(ours.postmap, f"{t}/{name}", {"k": name}, "hash")
        with open(f"{t}/client-checks", "w") as f:
            f.write("# a /file/name value\ncheck_client_access\n  proxy:hash:"
                    f"{t}/networks\n")
        settings = {
            "debug_peer_list": f"proxy:hash:{t}/peers",
            "smtpd_client_restrictions": f"{t}/client-checks",
            "smtpd_restriction_classes": "myclass",
            "myclass": f"check_sender_access proxy:hash:{t}/classy",
        }
        settings.update((k, v) for k, v in ours.main_settings().items()
                        if k not in ("proxy_read_maps", "proxy_write_maps"))

        def write_ours(version):
            ours._replace("main.cf", "".join(
                f"{k} = {v}\n" for k, v in {**settings, "proxymap_postfix_version": version}.items()))
        c = CPostfix(chroot, f"{ours.root}/c", settings)
        write_ours("3.11")
        ours.start()
        c.start(services=("proxymap",))
        try:
            for name in ("peers", "networks", "classy"):
                answers = [chroot.postmap(server.config_dir, "-q", "k", f"proxy:hash:{t}/{name}")
                           for server in (ours, c)]
                assert [(a.returncode, a.stdout, a.stderr) for a in answers] == \
                    [(0, f"{name}\n", "")] * 2
            # the same site declared 3.7: only 3.7's rules
            write_ours("3.7")
            assert ours.control("reload").returncode == 0
            def denied():
                done = chroot.postmap(ours.config_dir, "-q", "k", f"proxy:hash:{t}/peers")
                return done.returncode == 1 and "not configured" in done.stderr
            wait_for(denied, 30, what="3.7 rules after reload")
        finally:
            c.stop()


# -- a long-running 3.11 daemon: verify(8) and its cache cleanup ------------------------------

VERIFY_CF = """\
verify    unix  -  -  n  -  1  verify
postlog   unix-dgram n - n - 1 postlogd
"""
MASTER_CF_WITH_VERIFY = MASTER_CF + "verify    unix  -  -  n  -  1  verify\n"
VERIFY_CACHE = {"keep@example.com": "0:0:4102444800:ok", "old1@example.com": "0:0:1:ok",
                "old2@example.com": "0:0:1:ok"}


def test_verify_cache_cleanup_of_311(tmp_path):
    """Real verify(8) of 3.11 runs its cache cleanup (open with OPEN_LOCK,
    lookup, sequence with delete-behind, update) through our proxywrite;
    the same daemon beside 3.11's own proxywrite leaves the same cache."""
    chroot = chroot_for("sid")
    with temporary_instance(tmp_path) as ours:
        caches = {}
        for side in ("ours", "c"):
            path = f"{ours.table_dir}/verify-{side}"
            build(ours.postmap, path, VERIFY_CACHE, "btree")
            caches[side] = f"btree:{path}"

        def settings(side):
            return {**ours.main_settings(),
                    "proxy_read_maps": f"proxy:{caches[side]}",
                    "proxy_write_maps": f"proxy:{caches[side]}",
                    "address_verify_map": f"proxy:{caches[side]}",
                    "address_verify_cache_cleanup_interval": "1s"}
        ours.write_main_cf(**settings("ours"))
        ours.start()
        beside = CPostfix(chroot, f"{ours.root}/beside", settings("ours"), VERIFY_CF,
                          queue_dir=ours.queue_dir)
        alone = CPostfix(chroot, f"{ours.root}/alone", settings("c"),
                         MASTER_CF_WITH_VERIFY)
        try:
            for real in (beside, alone):
                real.start(services=("verify",))
                with socket.socket(socket.AF_UNIX) as s:   # waking verify starts the cleanup
                    s.connect(real.socket_path("verify"))
                    wait_for(lambda: "retained=1 dropped=2" in real.log(), 60,
                             what=f"verify's cleanup ({real.root})")
            assert "fatal" not in beside.log() and "panic" not in beside.log()
        finally:
            beside.stop()
            alone.stop()
            ours.stop()
        dumps = [chroot.postmap(ours.config_dir, "-s", caches[side]) for side in ("ours", "c")]
        # the same records; the cleanup stamp's value is the clock's
        stamp = "_LAST_CACHE_CLEANUP_COMPLETED_\t"
        lines = [sorted(stamp if line.startswith(stamp) else line
                        for line in d.stdout.splitlines()) for d in dumps]
        assert lines[0] == lines[1], (dumps[0].stderr, dumps[1].stderr)
        keys = [line.split("\t")[0] for line in lines[0]]
        assert "keep@example.com" in keys and "old1@example.com" not in keys
        assert "_LAST_CACHE_CLEANUP_COMPLETED_" in keys
