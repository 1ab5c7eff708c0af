"""mysql: through our proxy against Postfix's own C client on one server.

The suite starts its own MariaDB (mariadb-install-db in a temporary
directory, a UNIX socket only, stopped by pid; tests/servers.py). Real
`postmap -q` (Debian's postfix-mysql) queries each parameter file directly
(`mysql:FILE`) and through our worker (`proxy:mysql:FILE`): same output,
same exit codes. Then: 64 clients of one worker hold at most
proxymap_backend_threads connections; the server stopped under load
answers RETRY while a file table keeps answering, and lookups recover once
it is back, with the same worker.
"""

import pytest

from servers import MariadbServer, find_mariadb
from sqldata import (KEYS, NUMBERS, ROWS, SQL_CONFIGS, assert_same_answers, both,
                     check_outage_and_recovery, check_pool_bound, sql_literal)
from worker_fixture import WorkerInstance

pytestmark = pytest.mark.skipif(find_mariadb() is None,
                                reason="MariaDB is not installed (apt-get install mariadb-server)")

CONFIGS = dict(SQL_CONFIGS, nullcols="query = SELECT v, NULL FROM t WHERE k='%s'\n",
               noresult="query = DO 1\n",
               noresult_ok="query = DO 1\nrequire_result_set = no\n")


@pytest.fixture(scope="module")
def my():
    with MariadbServer() as server:
        server.sql("CREATE DATABASE mail; CREATE USER 'postfix'@'localhost' IDENTIFIED BY"
                   " 'secret'; GRANT SELECT ON mail.* TO 'postfix'@'localhost';"
                   " CREATE USER 'pool'@'localhost' IDENTIFIED BY 'secret';"
                   " GRANT SELECT ON mail.* TO 'pool'@'localhost'")
        server.sql("CREATE TABLE t (k varchar(200), u varchar(200), d varchar(200),"
                   " v varchar(200)) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;"
                   " CREATE TABLE n (k varchar(200), x varchar(200)) CHARACTER SET utf8mb4",
                   db="mail")
        server.sql("INSERT INTO t VALUES " + ",".join(sql_literal(r) for r in ROWS), db="mail")
        server.sql("INSERT INTO n VALUES " + ",".join(sql_literal((k, str(x)))
                                                      for k, x in NUMBERS), db="mail")
        yield server


def write_cfs(inst, my, configs, extra="", user="postfix"):
    specs = {}
    for name, body in configs.items():
        cf = f"{inst.config_dir}/my-{name}.cf"
        with open(cf, "w", encoding="utf-8") as f:
            f.write(f"hosts = unix:{my.socket}\nuser = {user}\npassword = secret\n"
                    f"dbname = mail\n{extra}{body}")
        specs[name] = f"mysql:{cf}"
    return specs


@pytest.fixture(scope="module")
def inst(my, tmp_path_factory):
    i = WorkerInstance(tmp_path_factory.mktemp("mysql"))
    i.cfs = write_cfs(i, my, CONFIGS)
    i.write_main_cf(read_maps=" ".join(f"proxy:{s}" for s in i.cfs.values()))
    i.start("proxymap")
    yield i
    i.stop()


@pytest.mark.parametrize("table", sorted(CONFIGS))
def test_every_key_answers_like_postfix(inst, table):
    keys = KEYS if table not in ("noresult", "noresult_ok") else KEYS[:3]
    assert_same_answers(inst, inst.cfs[table], keys, expect_found=not table.startswith("noresult"))


def test_known_answers(inst):
    _, p = both(inst, "bob@example.com", inst.cfs["whole"])
    assert p.stdout == b"bob1,bob2,bob3\n"
    _, p = both(inst, "alice@example.com", inst.cfs["columns"])
    assert p.stdout == b"[alice],[example.com]\n"
    _, p = both(inst, "' OR '1'='1", inst.cfs["whole"])
    assert p.returncode == 1
    d, p = both(inst, "x@example.com", inst.cfs["noresult"])
    assert b"query error" in d.stderr and b"query error" in p.stderr


def test_64_clients_share_a_few_connections(my, tmp_path):
    i = WorkerInstance(tmp_path)
    specs = write_cfs(i, my, {"pool": CONFIGS["whole"]}, user="pool")
    held = check_pool_bound(i, specs["pool"], lambda: my.connections("pool"))
    print(f"FIGURES mysql: 64 clients x 3 lookups through one worker held {held}"
          f" database connections (proxymap_backend_threads = 3)")


def test_database_down_under_load_answers_retry_and_recovers(my, tmp_path):
    i = WorkerInstance(tmp_path)
    specs = write_cfs(i, my, {"fault": CONFIGS["whole"]}, extra="retry_interval = 1\n")
    check_outage_and_recovery(i, specs["fault"], my, "no MySQL server answered")
