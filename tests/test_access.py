"""Access control of proxymap/proxywrite against hostile table names.

The allow-lists (proxy_read_maps, proxy_write_maps) are matched as exact
`type:name` strings after the `proxy:` prefixes are dropped, as Postfix
does: no path normalisation, no expansion at request time. These tests
send every request type for tables that are not listed, listed only for
reading, or written with path and parameter tricks, over a real socket to
a standalone worker, and some through real `postmap -q/-d proxy:...` so the
client's view is proven too. docs/security.md maps threats to these tests.
"""

from __future__ import annotations

import fcntl
import os
import pytest

from proxymap import dictflags as F
from worker_fixture import WorkerInstance, RawClient

REQUESTS = {
    "open": {},
    "lookup": {"key": "alice"},
    "update": {"key": "k", "value": "v"},
    "delete": {"key": "alice"},
    "sequence": {"function": 0},
}


def ask(client, name, table, layout=37, flags=0):
    attrs = {"request": name, "table": table}
    if layout == 311:
        attrs["instance_flags"] = 0
    if layout == 37 or name != "open":
        attrs["flags"] = flags
    attrs.update(REQUESTS[name])
    return client.request(**attrs)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A worker pair over: `rw` listed for both services, `ro` only for
    reading, `secret` not listed, and unionmaps around them."""
    tmp_path = tmp_path_factory.mktemp("access")
    tables = tmp_path / "tables"
    tables.mkdir()
    inst = WorkerInstance(tmp_path)
    for name in ("rw", "ro", "secret", "swap"):
        (tables / name).write_text(f"alice {name}-alice\nbob {name}-bob\n")
        assert inst.postmap(f"hash:{tables}/{name}").returncode == 0
    t = {n: f"hash:{tables}/{n}" for n in ("rw", "ro", "secret", "swap")}
    t["union"] = f"unionmap:{{{t['ro']}, {t['rw']}}}"
    t["bare_union"] = f"unionmap:{{proxy:{t['ro']}, proxy:{t['rw']}}}"
    inst.write_main_cf(
        read_maps=f"proxy:{t['rw']} proxy:{t['ro']} proxy:{t['swap']} proxy:{t['union']} "
                  f"{t['bare_union']}"
                  " proxy:hash:${config_directory}/aliases",
        write_maps=f"proxy:{t['rw']}")
    inst.start("proxymap")
    inst.start("proxywrite")
    inst.tables = t
    inst.dir = tables
    try:
        yield inst
    finally:
        inst.stop()


def client(site, service="proxymap"):
    return RawClient(site.socket_path(service), timeout=10)


@pytest.mark.parametrize("layout", [37, 311])
@pytest.mark.parametrize("service", ["proxymap", "proxywrite"])
@pytest.mark.parametrize("name", list(REQUESTS))
def test_unlisted_table_is_denied_for_every_request(site, name, service, layout):
    c = client(site, service)
    assert ask(c, name, site.tables["secret"], layout)[b"status"] == b"4"


@pytest.mark.parametrize("name", list(REQUESTS))
def test_read_only_table_is_denied_on_proxywrite(site, name):
    """`ro` is listed only in proxy_read_maps: proxywrite refuses it for
    every request; proxymap refuses only the writes."""
    assert ask(client(site, "proxywrite"), name, site.tables["ro"])[b"status"] == b"4"
    status = ask(client(site), name, site.tables["ro"])[b"status"]
    assert status == (b"4" if name in ("update", "delete") else b"0")


@pytest.mark.parametrize("trick", [
    "relative", "dot", "dotdot", "double-slash", "case", "trailing-blank", "type-swap",
    "dollar", "braced-dollar", "nul-free-unicode"])
@pytest.mark.parametrize("name", ["open", "lookup", "delete"])
def test_path_and_name_tricks_are_denied(site, trick, name):
    """The allow-list matches the literal name: any other spelling of a
    listed file, and `$name` text (never expanded at request time), is
    DENY on both services."""
    d = str(site.dir)
    base = os.path.basename(d)
    table = {
        "relative": "hash:rw",
        "dot": f"hash:{d}/./rw",
        "dotdot": f"hash:{d}/../{base}/rw",
        "double-slash": f"hash:{d}//rw",
        "case": f"HASH:{d}/rw",
        "trailing-blank": f"hash:{d}/rw ",
        "type-swap": f"btree:{d}/rw",
        "dollar": "hash:$config_directory/aliases",
        "braced-dollar": "hash:${config_directory}/aliases",
        "nul-free-unicode": f"hash:{d}/r\u0077\u200b",
    }[trick]
    for service in ("proxymap", "proxywrite"):
        assert ask(client(site, service), name, table)[b"status"] == b"4", (service, table)


def test_dollar_names_are_expanded_in_main_cf_only(site):
    """`proxy:hash:${config_directory}/aliases` in main.cf authorises the
    expanded path (the file is missing: RETRY, not DENY)."""
    c = client(site)
    assert ask(c, "lookup", f"hash:{site.config_dir}/aliases")[b"status"] == b"2"


def test_proxy_prefixes_are_dropped_before_matching(site):
    """`proxy:proxy:type:name` is the listed table (Postfix strips every
    prefix on both sides too): served, not proxied again, not refused."""
    c = client(site)
    r = ask(c, "lookup", "proxy:proxy:" + site.tables["ro"])
    assert r == {b"status": b"0", b"value": b"ro-alice"}
    assert ask(c, "lookup", "proxy:proxy:" + site.tables["secret"])[b"status"] == b"4"


def test_unionmap_members_must_be_listed_as_written(site):
    c = client(site)
    union = site.tables["union"]
    assert ask(c, "lookup", union) == {b"status": b"0", b"value": b"ro-alice,rw-alice"}
    # the same members in another order, or a member swapped for an unlisted one
    other = f"unionmap:{{{site.tables['rw']}, {site.tables['ro']}}}"
    sneaky = f"unionmap:{{{site.tables['ro']}, {site.tables['secret']}}}"
    for table in (other, sneaky, "pipemap:" + union[len("unionmap:"):]):
        assert ask(c, "lookup", table)[b"status"] == b"4", table
    # an unquoted composite in the list authorises its proxied members only
    assert ask(c, "lookup", site.tables["bare_union"])[b"status"] == b"4"
    assert ask(client(site, "proxywrite"), "lookup", union)[b"status"] == b"4"


@pytest.mark.parametrize("table", ["unix:passwd.byname", "hash:/etc/shadow",
                                   "texthash:/etc/shadow", "environ:", "pcre:/etc/shadow",
                                   "pipemap:{unix:passwd.byname}"])
def test_privileged_and_system_tables_are_denied_unless_listed(site, table):
    for service in ("proxymap", "proxywrite"):
        assert ask(client(site, service), "lookup", table)[b"status"] == b"4"


def test_symlink_swapped_in_for_a_listed_file_is_followed(site):
    """Documented behaviour (docs/security.md): the allow-list names a
    file, not an inode; whoever can replace a listed table's file (the
    table directory is the administrator's) can point it anywhere the
    server may read. Postfix behaves the same way."""
    c = client(site)
    assert ask(c, "lookup", site.tables["swap"]) == {b"status": b"0", b"value": b"swap-alice"}
    swap_db = f"{site.dir}/swap.db"
    os.replace(swap_db, f"{site.dir}/swap-orig.db")
    os.symlink(f"{site.dir}/secret.db", swap_db)
    # the worker notices the changed file and reopens it through the link
    assert ask(c, "lookup", site.tables["swap"]) == {b"status": b"0", b"value": b"secret-alice"}
    # the secret table itself stays unlisted
    assert ask(c, "lookup", site.tables["secret"])[b"status"] == b"4"


def test_read_service_never_holds_an_open_lock(site):
    """OPEN_LOCK from a proxymap client is ignored (fix in dispatch.py):
    otherwise a reader could lock a listed file exclusively for good and
    freeze every writer of it."""
    c = client(site)
    assert ask(c, "open", site.tables["ro"], flags=F.OPEN_LOCK)[b"status"] == b"0"
    assert ask(c, "lookup", site.tables["ro"], flags=F.OPEN_LOCK)[b"status"] == b"0"
    fd = os.open(f"{site.dir}/ro.db", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises if the worker held it
    finally:
        os.close(fd)


def test_instance_flags_cannot_multiply_open_tables(site):
    """A listed table is opened once per distinct value of the instance
    bits that matter (dispatch.INSTANCE_KEY_BITS), not once per flags
    value a client invents: the worker's descriptors stay bounded."""
    import psutil
    c = client(site)
    worker = psutil.Process(site.procs[0].pid)
    ask(c, "lookup", site.tables["ro"])
    before = worker.num_fds()
    for i in range(300):
        flags = (i << 22) | (i % 2) << 9   # unused high bits and DEBUG
        assert ask(c, "lookup", site.tables["ro"], flags=flags)[b"status"] in (b"0", b"1")
    assert worker.num_fds() <= before + 2


# -- the client's view: real Postfix postmap ------------------------------------------------

def test_real_postmap_is_refused_unlisted_and_read_only_tables(site):
    ok = site.postmap("-q", "alice", f"proxy:{site.tables['ro']}")
    assert ok.returncode == 0 and ok.stdout == b"ro-alice\n"
    for args in (("-q", "alice", f"proxy:{site.tables['secret']}"),
                 ("-q", "alice", f"proxy:hash:{site.dir}/../{os.path.basename(site.dir)}/ro"),
                 ("-d", "alice", f"proxy:{site.tables['ro']}"),
                 ("-q", "alice", "proxy:hash:$config_directory/aliases")):
        r = site.postmap(*args)
        assert r.returncode != 0 and r.stdout == b"", args
        assert b"not approved" in r.stderr or b"fatal" in r.stderr, (args, r.stderr)
    # the secret entries are untouched and proxywrite still writes the rw table
    assert site.postmap("-q", "alice", f"hash:{site.dir}/secret").stdout == b"secret-alice\n"
    d = site.postmap("-d", "bob", f"proxy:{site.tables['rw']}")
    assert d.returncode == 0, d.stderr
    assert site.postmap("-q", "bob", f"proxy:{site.tables['rw']}").returncode == 1
