"""pgsql: through our proxy against Postfix's own C client on one server.

The suite starts its own PostgreSQL (initdb in a temporary directory, a
UNIX socket only, stopped by pid; tests/servers.py). Real `postmap -q`
(Debian's postfix-pgsql) queries each parameter file directly
(`pgsql:FILE`) and through our worker (`proxy:pgsql:FILE`): same output,
same exit codes. Then: 64 clients of one worker hold at most
proxymap_backend_threads database connections; the database stopped under
load answers RETRY while a file table keeps answering, and lookups recover
once it is back, with the same worker.
"""

import pytest

from servers import PostgresServer, find_postgres
from sqldata import (KEYS, NUMBERS, ROWS, SQL_CONFIGS, assert_same_answers, both,
                     check_outage_and_recovery, check_pool_bound, sql_literal)
from worker_fixture import WorkerInstance

pytestmark = pytest.mark.skipif(find_postgres() is None,
                                reason="PostgreSQL is not installed (apt-get install postgresql)")

CONFIGS = dict(SQL_CONFIGS, function="select_function = lookup_v\n",
               latin1="query = SELECT v FROM t WHERE k='%s'\nencoding = LATIN1\n")


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    try:
        server.psql("CREATE DATABASE mail")
        server.psql("CREATE TABLE t (k text, u text, d text, v text);"
                    "CREATE TABLE n (k text, x text);"
                    "CREATE FUNCTION lookup_v(text) RETURNS SETOF text AS"
                    " 'SELECT v FROM t WHERE k = $1' LANGUAGE sql;", db="mail")
        server.psql("INSERT INTO t VALUES " + ",".join(sql_literal(r) for r in ROWS), db="mail")
        server.psql("INSERT INTO n VALUES " + ",".join(sql_literal((k, str(x)))
                                                       for k, x in NUMBERS), db="mail")
        yield server
    finally:
        server.cleanup()


def write_cfs(inst, pg, configs, extra="", dbname="mail"):
    specs = {}
    for name, body in configs.items():
        cf = f"{inst.config_dir}/pg-{name}.cf"
        with open(cf, "w", encoding="utf-8") as f:
            f.write(f"hosts = unix:{pg.socket_dir}\nuser = postgres\ndbname = {dbname}\n"
                    f"{extra}{body}")
        specs[name] = f"pgsql:{cf}"
    return specs


@pytest.fixture(scope="module")
def inst(pg, tmp_path_factory):
    i = WorkerInstance(tmp_path_factory.mktemp("pgsql"))
    i.cfs = write_cfs(i, pg, CONFIGS)
    i.write_main_cf(read_maps=" ".join(f"proxy:{s}" for s in i.cfs.values()))
    i.start("proxymap")
    yield i
    i.stop()


@pytest.mark.parametrize("table", sorted(set(CONFIGS) - {"latin1"}))
def test_every_key_answers_like_postfix(inst, table):
    ascii_keys = [k for k in KEYS if k.isascii()]   # 3.7 sends LATIN1, see below
    assert_same_answers(inst, inst.cfs[table], ascii_keys)


def test_non_ascii_keys_with_postfix_37s_encoding(inst):
    assert_same_answers(inst, inst.cfs["latin1"], KEYS)


def test_known_answers(inst):
    _, p = both(inst, "bob@example.com", inst.cfs["whole"])
    assert p.stdout == b"bob1,bob2,bob3\n"
    _, p = both(inst, "alice@example.com", inst.cfs["columns"])
    assert p.stdout == b"[alice],[example.com]\n"
    _, p = both(inst, "bob@example.com", inst.cfs["function"])
    assert p.stdout == b"bob1,bob2,bob3\n"
    _, p = both(inst, "' OR '1'='1", inst.cfs["whole"])
    assert p.returncode == 1
    # UTF-8 (current Postfix's default) finds the UTF-8 key that 3.7 cannot
    p = inst.postmap("-q", "Müller@例え.jp", f"proxy:{inst.cfs['whole']}")
    assert p.stdout == b"umlaut\n"


def test_expansion_limit_is_a_temporary_error(inst):
    direct, proxied = both(inst, "bob@example.com", inst.cfs["labels"])
    assert direct.returncode != 0 and proxied.returncode != 0
    assert b"bob1" not in proxied.stdout


def test_64_clients_share_a_few_connections(pg, tmp_path):
    pg.psql("CREATE DATABASE pooltest")   # its own: other workers hold connections to mail
    pg.psql("CREATE TABLE t (k text, v text); INSERT INTO t VALUES"
            " ('alice@example.com', 'alice.local@mail.example.com')", db="pooltest")
    i = WorkerInstance(tmp_path)
    specs = write_cfs(i, pg, {"pool": CONFIGS["whole"]}, dbname="pooltest")
    held = check_pool_bound(i, specs["pool"], lambda: pg.connections("pooltest"))
    print(f"FIGURES pgsql: 64 clients x 3 lookups through one worker held {held}"
          f" database connections (proxymap_backend_threads = 3)")


def test_database_down_under_load_answers_retry_and_recovers(pg, tmp_path):
    i = WorkerInstance(tmp_path)
    specs = write_cfs(i, pg, {"fault": CONFIGS["whole"]}, extra="retry_interval = 1\n")
    check_outage_and_recovery(i, specs["fault"], pg, "no PostgreSQL server answered")
