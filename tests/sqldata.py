"""Rows and probe keys shared by the SQL table tests (sqlite, pgsql, mysql).

Table `t (k, u, d, v)`: the whole key, its local part, its domain, a
value; table `n (k, x)`: values of other column types. The keys exercise
every template expansion, quoting, the domain filter and several rows.
"""

import os
import threading
import time

from worker_fixture import RawClient
from proxymap import dictflags as F
from proxymap.protocol import encode

ROWS = [
    ("alice@example.com", "alice", "example.com", "alice.local@mail.example.com"),
    ("bob@example.com", "bob", "example.com", "bob1"),
    ("bob@example.com", "bob", "example.com", "bob2"),
    ("bob@example.com", "bob", "example.com", "bob3"),
    ("o'hara@example.com", "o'hara", "example.com", "quoted"),
    ("carol@sub.example.org", "carol", "sub.example.org", "carol@elsewhere.net"),
    ("null@example.com", "null", "example.com", None),
    ("empty@example.com", "empty", "example.com", ""),
    ("mixed@example.com", "mixed", "example.com", ""),
    ("mixed@example.com", "mixed", "example.com", "kept"),
    ("plain", "plain", "", "no domain here"),
    ("grüße@例え.jp", "grüße", "例え.jp", "unicode"),
    ("upper@example.com", "upper", "example.com", "Upper Case Value"),
    ("dave@example.net", "dave", "example.net", "dave value"),
    ("müller@例え.jp", "müller", "例え.jp", "umlaut"),
]

NUMBERS = [("int@n", 42), ("real@n", 1.5), ("big@n", 1e20), ("text@n", "text")]

KEYS = ["alice@example.com", "ALICE@Example.COM", "bob@example.com", "o'hara@example.com",
        "carol@sub.example.org", "null@example.com", "empty@example.com", "mixed@example.com",
        "plain", "@example.com", "nobody@", "x@com", "x@a..example.com", "grüße@例え.jp",
        "upper@example.com", "' OR '1'='1", "int@n", "real@n", "blob@n", "text@n",
        "big@n", "missing@example.com", "dave@example.net", "Dave@Sub.Example.NET",
        "Müller@例え.jp"]




def both(inst, key, spec):
    """Real postmap -q on spec directly and through our proxy."""
    direct = inst.postmap("-q", key, spec)
    proxied = inst.postmap("-q", key, f"proxy:{spec}")
    return direct, proxied


def assert_same_answers(inst, spec, keys, expect_found=True):
    """Same output and exit code for every key; at least one key found."""
    found = 0
    for key in keys:
        direct, proxied = both(inst, key, spec)
        assert (proxied.returncode, proxied.stdout) == (direct.returncode, direct.stdout), \
            (spec, key, direct, proxied, inst.log()[-2000:])
        found += direct.returncode == 0
    assert found > 0 or not expect_found, \
        f"{spec}: no key found at all, the comparison proves nothing"

#: parameter files every SQL type understands alike (hosts etc. added per type)
SQL_CONFIGS = {
    "whole": "query = SELECT v FROM t WHERE k='%s'\n",
    "parts": ("query = SELECT v FROM t WHERE u='%u'\n"
              "   AND d='%d'\n"
              "result_format = <%s> for %U at %D\n"),
    "labels": "query = SELECT v FROM t WHERE d = '%2.%1'\nexpansion_limit = 2\n",
    "domain": ("query = SELECT v FROM t WHERE k='%s'\n"
               "domain = example.com, !sub.example.org, EXAMPLE.NET\n"),
    "legacy": ("table = t\nselect_field = v\nwhere_field = k\n"
               "additional_conditions = AND v <> 'bob2'\n"),
    "columns": "query = SELECT u, d FROM t WHERE k='%s'\nresult_format = [%s]\n",
    "types": "query = SELECT x FROM n WHERE k='%s'\n",
}


def sql_literal(row) -> str:
    """A row as an SQL VALUES tuple (NULL, quotes doubled)."""
    return "(" + ",".join("NULL" if c is None else "'" + c.replace("'", "''") + "'"
                          for c in row) + ")"


def lookup_request(table: str, key: bytes) -> bytes:
    return encode([(b"request", b"lookup"), (b"table", table.encode()),
                   (b"flags", str(F.FOLD_FIX).encode()), (b"key", key)])


def check_pool_bound(inst, spec, count_connections, threads=3) -> int:
    """64 clients x 3 rounds of lookups through one worker; returns the
    server's connection count, asserted to be within the lane's threads."""
    inst.write_main_cf(read_maps=f"proxy:{spec}", extra=f"proxymap_backend_threads = {threads}")
    inst.start("proxymap")
    try:
        clients = [RawClient(inst.socket_path(), timeout=60) for _ in range(64)]
        for _ in range(3):
            for c in clients:
                c.send(lookup_request(spec, b"alice@example.com"))
            for c in clients:
                reply = dict(c.read())
                assert reply[b"value"] == b"alice.local@mail.example.com", reply
        held = count_connections()
        assert 1 <= held <= threads
        for c in clients:
            c.close()
        return held
    finally:
        inst.stop()


def check_outage_and_recovery(inst, spec, server, message):
    """The server stopped under load: every lookup answered RETRY, a file
    table served all along, recovery once it is back, same worker."""
    src = os.path.join(inst.config_dir, "files")
    with open(src, "w") as f:
        f.write("file-key file value\n")
    assert inst.postmap(f"hash:{src}").returncode == 0
    inst.write_main_cf(read_maps=f"proxy:{spec} proxy:hash:{src}",
                       extra="proxymap_backend_timeout = 5s")
    proc = inst.start("proxymap")
    stop = threading.Event()
    file_answers, errors = [], []

    def file_load():   # a file-table client that must never notice
        c = RawClient(inst.socket_path(), timeout=60)
        while not stop.is_set():
            try:
                reply = c.request(request=b"lookup", table=f"hash:{src}".encode(),
                                  flags=str(F.FOLD_FIX).encode(), key=b"file-key")
            except (OSError, EOFError) as exc:
                errors.append(exc)
                return
            file_answers.append(reply[b"status"])
        c.close()

    threads = [threading.Thread(target=file_load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        db = RawClient(inst.socket_path(), timeout=60)

        def status():
            db.send(lookup_request(spec, b"alice@example.com"))
            return dict(db.read())[b"status"]
        assert status() == b"0"
        server.stop()
        statuses = [status() for _ in range(20)]      # each one answered, none lost
        assert set(statuses) == {b"2"}, statuses        # RETRY while it is down
        seen = len(file_answers)
        for _ in range(600):                          # bounded: file lookups go on meanwhile
            if len(file_answers) > seen or errors:
                break
            time.sleep(0.05)
        during = len(file_answers) - seen
        server.start()
        for _ in range(900):                          # bounded: until it is seen again
            if status() == b"0":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no recovery after the server came back")
        assert proc.poll() is None                    # same worker, no restart
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        inst.stop()
    assert not errors
    assert during > 0 and set(file_answers) == {b"0"}
    log = inst.log()
    assert message in log and "Traceback" not in log
    print(f"FIGURES {spec.partition(':')[0]} outage: 20 lookups answered RETRY while the"
          f" server was down; {len(file_answers)} file-table lookups, all OK")
