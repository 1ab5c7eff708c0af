"""sqlite: through our proxy against Postfix's own C client on the same file.

Real `postmap -q` (Debian's postfix-sqlite) reads each parameter file
directly (`sqlite:FILE`) and through our worker (`proxy:sqlite:FILE`); the
answers and exit codes must be the same for keys that exercise every
template expansion, quoting, the domain filter, legacy queries, several
rows, NULL and empty rows, non-text columns and the expansion limit.
"""

import sqlite3

import pytest

from sqldata import KEYS, NUMBERS, ROWS, SQL_CONFIGS, assert_same_answers, both
from worker_fixture import WorkerInstance, RawClient
from proxymap.tables.dbcommon import Templates, expand, unquoted_expansions

CONFIGS = dict(SQL_CONFIGS,
               resultparts="query = SELECT v FROM t WHERE k='%s'\nresult_format = %u / %d / %%\n",
               first="query = SELECT v FROM t WHERE k='%s'; SELECT 'second'\n")


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlite")
    i = WorkerInstance(root)
    db = root / "data" / "maps.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (k TEXT, u TEXT, d TEXT, v TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", ROWS)
        conn.execute("CREATE TABLE n (k TEXT, x)")
        conn.executemany("INSERT INTO n VALUES (?, ?)", NUMBERS + [("blob@n", b"raw bytes")])
    os_db = str(db)
    db.chmod(0o644)
    (root / "data").chmod(0o755)
    i.cfs = {}
    for name, body in CONFIGS.items():
        cf = root / "etc" / f"{name}.cf"
        cf.write_text(f"# sqlite table {name}\ndbpath = {os_db}\n{body}", encoding="utf-8")
        i.cfs[name] = f"sqlite:{cf}"
    i.write_main_cf(read_maps=" ".join(f"proxy:{spec}" for spec in i.cfs.values()))
    i.start("proxymap")
    yield i
    i.stop()


@pytest.mark.parametrize("table", sorted(CONFIGS))
def test_every_key_answers_like_postfix(inst, table):
    assert_same_answers(inst, inst.cfs[table], KEYS)


def test_batch_queries_match(inst):
    stdin = ("\n".join(k for k in KEYS if "'" not in k) + "\n").encode()
    for spec in (inst.cfs["whole"], inst.cfs["parts"], inst.cfs["domain"]):
        direct = inst.postmap("-q", "-", spec, input=stdin)
        proxied = inst.postmap("-q", "-", f"proxy:{spec}", input=stdin)
        assert direct.returncode == proxied.returncode == 0
        assert proxied.stdout == direct.stdout and direct.stdout


def test_known_answers(inst):
    _, p = both(inst, "bob@example.com", inst.cfs["whole"])
    assert p.stdout == b"bob1,bob2,bob3\n"
    _, p = both(inst, "alice@example.com", inst.cfs["parts"])
    assert p.stdout == b"<alice.local@mail.example.com> for alice at example.com\n"
    _, p = both(inst, "bob@example.com", inst.cfs["legacy"])
    assert p.stdout == b"bob1,bob3\n"
    _, p = both(inst, "' OR '1'='1", inst.cfs["whole"])
    assert p.returncode == 1   # the quote is doubled: no injection


def test_expansion_limit_is_a_temporary_error(inst):
    direct, proxied = both(inst, "bob@example.com", inst.cfs["labels"])
    assert direct.returncode != 0 and proxied.returncode != 0
    assert b"bob1" not in proxied.stdout
    assert "Expansion limit exceeded for key 'bob@example.com'" in inst.log()


def test_bad_files_answer_retry_with_file_and_line_then_recover(tmp_path):
    i = WorkerInstance(tmp_path)
    broken = tmp_path / "etc" / "broken.cf"
    broken.write_text("dbpath = /nonexistent\nquery SELECT 1\n")
    late = tmp_path / "etc" / "late.cf"
    db = tmp_path / "data" / "late.sqlite"
    late.write_text(f"dbpath = {db}\nquery = SELECT 'found ' || '%s'\n")
    i.write_main_cf(read_maps=f"proxy:sqlite:{broken} proxy:sqlite:{late}")
    i.start("proxymap")
    try:
        r = i.postmap("-q", "k", f"proxy:sqlite:{broken}")
        assert b"query error" in r.stderr, r   # a temporary error, not "not found"
        assert f"{broken}, line 2: missing '=' after attribute name" in i.log()
        r = i.postmap("-q", "k", f"proxy:sqlite:{late}")
        assert b"query error" in r.stderr, r
        assert f"open database {db}" in i.log()
        sqlite3.connect(db).close()   # the database appears: served without a restart
        for _ in range(100):          # bounded: the surrogate is retried after 1 s
            r = i.postmap("-q", "k", f"proxy:sqlite:{late}")
            if r.returncode == 0:
                break
        assert r.stdout == b"found k\n"
        c = RawClient(i.socket_path("proxymap"))
        assert c.request(request=b"lookup", table=f"sqlite:{broken}".encode(),
                         flags=b"0", key=b"k")[b"status"] == b"2"   # RETRY
        c.close()
    finally:
        i.stop()
    assert "Traceback" not in i.log()


def test_templates_unit():
    t = Templates.parse("t", "SELECT '%u' '%d' '%1'", "%s")
    assert t.expand_query("a@b.c", lambda s: s) == "SELECT 'a' 'b.c' 'c'"
    assert t.expand_query("nodomain", lambda s: s) is None
    assert t.expand_query("@b.c", lambda s: s) is None
    assert expand("%S:%U:%D:%u", "res@x.y", "k@d.e", 0xF, 0, None) == "k@d.e:k:d.e:res"
    assert unquoted_expansions("SELECT %s FROM t WHERE a='%u' AND b=\"%d\" AND %%") == ["%s", "%d"]
    with pytest.raises(Exception):
        Templates.parse("t", "SELECT %x", "%s")
