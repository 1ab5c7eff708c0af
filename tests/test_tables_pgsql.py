"""pgsql: through our proxy against Postfix's own C client on one server.

The suite starts its own PostgreSQL (initdb in a temporary directory, a
UNIX socket only, stopped by pid; tests/servers.py). Real `postmap -q`
(Debian's postfix-pgsql) queries each parameter file directly
(`pgsql:FILE`) and through our worker (`proxy:pgsql:FILE`): same output,
same exit codes. Then: 64 clients of one worker hold at most
proxymap_backend_threads database connections; the database stopped under
load answers RETRY while a file table keeps answering, and lookups recover
once it is back, with the same worker; `status` shows the lane and the
connection pool with exact figures while 64 clients wait on a held lock.
"""

import pytest

from servers import PostgresServer, find_postgres
from sqldata import (KEYS, NUMBERS, ROWS, SQL_CONFIGS, assert_same_answers, both,
                     check_outage_and_recovery, check_pool_bound, lookup_request,
                     sql_literal)
from tests.instance import temporary_instance, wait_for
from worker_fixture import RawClient, WorkerInstance

pytestmark = pytest.mark.skipif(find_postgres() is None,
                                reason="PostgreSQL is not installed (apt-get install postgresql)")

CONFIGS = dict(SQL_CONFIGS, function="select_function = lookup_v\n",
               latin1="query = SELECT v FROM t WHERE k='%s'\nencoding = LATIN1\n",
               # ours: the answer cache's settings, which Postfix's pgsql table ignores
               cached=SQL_CONFIGS["whole"] + "proxymap_cache_ttl = 1h\n"
                      "proxymap_cache_negative_ttl = 3600\nproxymap_cache_entries = 100\n")


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        server.psql("CREATE DATABASE mail")
        server.psql("CREATE TABLE t (k text, u text, d text, v text);"
                    "CREATE TABLE n (k text, x text);"
                    "CREATE FUNCTION lookup_v(text) RETURNS SETOF text AS"
                    " 'SELECT v FROM t WHERE k = $1' LANGUAGE sql;", db="mail")
        server.psql("INSERT INTO t VALUES " + ",".join(sql_literal(r) for r in ROWS), db="mail")
        server.psql("INSERT INTO n VALUES " + ",".join(sql_literal((k, str(x)))
                                                       for k, x in NUMBERS), db="mail")
        yield server


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


POOL_MASTER_CF = """\
proxymap    unix  -       -       n       -       1       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
"""


def test_status_shows_the_pool_and_its_waits(pg, tmp_path):
    """64 clients on a query that the test holds up with a table lock, one
    worker of 4 lane threads: while blocked, `status --json` shows 4 busy
    threads, 60 requests waiting and 4 connections open (PostgreSQL's own
    count agrees); once released, 60 waits with their time, 0 busy, 64 OK.
    Every figure is exact: no request can finish before the lock goes."""
    import psycopg
    pg.psql("CREATE DATABASE waittest")
    pg.psql("CREATE TABLE t (k text, v text); INSERT INTO t VALUES"
            " ('alice@example.com', 'alice.local@mail.example.com')", db="waittest")
    with temporary_instance(tmp_path, master_cf=POOL_MASTER_CF) as inst:
        spec = write_cfs(inst, pg, {"wait": CONFIGS["whole"]}, dbname="waittest")["wait"]
        inst.write_main_cf(proxy_read_maps=f"proxy:{spec} proxy:{inst.read_table}",
                           proxymap_backend_threads="4", proxymap_backend_queue="64",
                           proxymap_backend_timeout="300s",
                           proxymap_worker_busy_clients="100")
        inst.start()
        holder = psycopg.connect(host=pg.socket_dir, user="postgres", dbname="waittest")
        clients = []
        try:
            holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")   # a transaction: held
            clients = [RawClient(inst.socket_path(), timeout=120) for _ in range(64)]
            for c in clients:
                c.send(lookup_request(spec, b"alice@example.com"))

            def pool():
                table = inst.raw_status().get("services", {}).get("proxymap", {}) \
                    .get("tables", {}).get(spec, {})
                return table.get("pool")
            blocked = wait_for(lambda: (p := pool()) and p["waiting"] == 60 and p,
                               60, what="60 requests waiting")
            assert (blocked["threads"], blocked["busy"], blocked["waits"]) == (4, 4, 60)
            # psycopg_pool counts a wait for each connection it had to make
            # (min_size 0: the 4 first requests); none waited for a busy one
            assert blocked["connections"] == {"size": 4, "open": 4, "in_use": 4, "waits": 4}
            assert pg.connections("waittest") == 4 + 1      # the lane's, and the holder
            text = inst.control("status").stdout
            assert f"table {spec}: threads 4 busy 4 waiting 60, waits 60" in text, text
        finally:
            holder.rollback()
            holder.close()
        for c in clients:
            assert dict(c.read())[b"value"] == b"alice.local@mail.example.com"
            c.close()
        done = wait_for(lambda: (p := pool()) and p["completed"] == 64 and p,
                        60, what="64 requests completed")
        assert (done["busy"], done["waiting"], done["waits"]) == (0, 0, 60)
        assert done["wait_seconds"] > 0 and done["timeouts"] == done["rejected"] == 0
        assert done["connections"]["open"] == 4 and done["connections"]["in_use"] == 0
        table = inst.status()["services"]["proxymap"]["tables"][spec]
        assert table["requests"]["lookup"] == {"OK": 64}
        assert table["pool"]["waits"] == 60
