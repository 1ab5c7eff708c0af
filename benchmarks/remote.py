"""`make bench`, remote tables: proxy:pgsql: and proxy:ldap: through ours and through Postfix's C proxymap.

Starts one PostgreSQL and one slapd with the test suite's helpers
(tests/servers.py: a temporary directory each, stopped by pid), fills them
with the same records, and serves them through Postfix 3.7's C proxymap
(Debian's postfix-pgsql and postfix-ldap) and through ours, each under its
own master (benchmarks/realpostfix.py, benchmarks/ours.py). The raw
protocol load generator (benchmarks/loadgen.py) sends lookups of known and
unknown keys, skewed as real traffic is (a few hot keys), over 1 and 64
connections, alternating C and ours for each
repetition. Ours is measured twice: with the answer cache off (main.cf's
default) and on, set in the table's own file (`proxymap_cache_ttl`), a
file that the C proxymap is given too and reads the same (Postfix ignores
names it does not know).

While the 64-client runs go on, the database connections each side holds
are counted on the server side, and the largest count is reported:
PostgreSQL's pg_stat_activity (each side queries its own copy of the
database, so the counts cannot mix), and slapd's established TCP
connections by the process at the other end (psutil), the processes of
each service told apart by pid.

    .venv/bin/python benchmarks/remote.py [--quick] [--duration S] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))     # the suite's server helpers

import psutil  # noqa: E402

from benchmarks import loadgen, report  # noqa: E402
from benchmarks.ours import OurService  # noqa: E402
from benchmarks.realpostfix import (  # noqa: E402
    RealPostfix, StartError, failure_status, refuse_without_root, stop_all)
from benchmarks.scenarios import summarize, zipf_sequence  # noqa: E402
from servers import PostgresServer, SlapdServer  # noqa: E402

#: in the cached variant's parameter file (ours only; the C proxymap ignores it)
CACHE_SETTINGS = "proxymap_cache_ttl = 1h\nproxymap_cache_negative_ttl = 1h\n"
PEOPLE = "ou=people," + SlapdServer.SUFFIX
#: every this many seconds, the connection counter looks again
COUNT_INTERVAL = 0.25


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/remote.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few records, short runs (smoke test)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per measurement (default 5, quick 0.5)")
    p.add_argument("--reps", type=int, default=None,
                   help="alternating repetitions (default 2, quick 1)")
    p.add_argument("--records", type=int, default=None,
                   help="records per database (default 1000, quick 200)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="directory for the JSON (default benchmarks/results)")
    return p.parse_args(argv)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def address(i: int) -> str:
    return f"user{i}@example.com"


def lookup_keys(records: int) -> list[bytes]:
    """Every known key and one unknown key in ten, asked with a Zipf-like
    skew (benchmarks/scenarios.py: a few hot keys, a long tail), seeded:
    the same sequence for both sides."""
    keys = []
    for i in range(records):
        keys.append(address(i).encode())
        if i % 10 == 0:
            keys.append(f"nobody{i}@example.com".encode())
    return zipf_sequence(keys, len(keys), seed=11)


# -- the servers and their records ----------------------------------------------------

def fill_postgres(pg: PostgresServer, records: int) -> None:
    """Table t (k, v) in a database per side: address(i) -> mailbox{i}."""
    assert address(7) == "user7@example.com"     # what the SQL below makes
    for db in ("bench_c", "bench_ours"):
        pg.psql(f"CREATE DATABASE {db}")
        pg.psql("CREATE TABLE t (k text PRIMARY KEY, v text); INSERT INTO t SELECT"
                " 'user' || i || '@example.com', 'mailbox' || i"
                f" FROM generate_series(0, {records - 1}) AS i", db=db)


def fill_slapd(slapd: SlapdServer, records: int) -> None:
    entries = [f"dn: {SlapdServer.SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
               f"dc: example\no: example\n",
               f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"]
    entries += [f"dn: uid=user{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: user{i}\n"
                f"cn: user {i}\nsn: {i}\nmail: {address(i)}\n" for i in range(records)]
    slapd.add("\n".join(entries))


def write_table_files(directory: str, pg: PostgresServer, slapd: SlapdServer) -> dict:
    """{(table, side, cached): spec}: each side's pgsql files name its own
    database; the LDAP files are the same for both sides."""
    specs = {}
    for side in ("c", "ours"):
        for cached in (False, True):
            extra = CACHE_SETTINGS if cached else ""
            suffix = f"{side}{'-cached' if cached else ''}"
            pg_cf = os.path.join(directory, f"pgsql-{suffix}.cf")
            with open(pg_cf, "w") as f:
                f.write(f"hosts = unix:{pg.socket_dir}\nuser = postgres\ndbname = bench_{side}\n"
                        f"query = SELECT v FROM t WHERE k='%s'\n{extra}")
            ldap_cf = os.path.join(directory, f"ldap-{suffix}.cf")
            with open(ldap_cf, "w") as f:
                f.write(f"server_host = {slapd.tcp_url}\nversion = 3\nsearch_base = {PEOPLE}\n"
                        f"query_filter = (mail=%s)\nresult_attribute = uid\n{extra}")
            specs["pgsql", side, cached] = f"pgsql:{pg_cf}"
            specs["ldap", side, cached] = f"ldap:{ldap_cf}"
    return specs


# -- counting the database connections ----------------------------------------------

def pg_connections(pg: PostgresServer, side: str) -> int:
    return pg.connections(f"bench_{side}")


def slapd_connections(slapd: SlapdServer, service) -> int:
    """Established TCP connections to slapd's port from the service's processes."""
    pids = {p.pid for p in service.processes()}
    count = 0
    try:
        for conn in psutil.Process(slapd.proc.pid).net_connections("tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == slapd.port \
                    and conn.raddr:
                peer = conn.raddr.port
                count += any(c.laddr and c.laddr.port == peer
                             for pid in pids for c in _tcp_of(pid))
    except psutil.Error:
        return 0
    return count


def _tcp_of(pid: int) -> list:
    try:
        return psutil.Process(pid).net_connections("tcp")
    except psutil.Error:
        return []


class PeakCounter:
    """Context manager: the largest value count() gave while it ran (a
    sampling thread, every COUNT_INTERVAL seconds, and once at the end)."""

    def __init__(self, count):
        self.count = count
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(COUNT_INTERVAL):
            self.peak = max(self.peak, self.count())

    def __enter__(self) -> "PeakCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


# -- the runs -------------------------------------------------------------------------

def variants() -> list[tuple[str, bool]]:
    """(side, cached) in the order they are measured."""
    return [("c", False), ("ours", False), ("ours", True)]


def measure(service, spec: str, keys: list[bytes], conns: int, duration: float,
            count_connections) -> dict:
    wl = loadgen.Workload("lookup", spec, keys)
    with PeakCounter(count_connections) as peak:
        res = loadgen.run(service.socket_path("proxymap"), wl, conns, duration)
    record = summarize(res)
    record.pop("client_cpu", None)
    record["db_connections"] = peak.peak
    return record


def summary_rows(records: list[dict]) -> list[dict]:
    """Medians per (table, conns): each variant's rate and connections, and
    ours/C ratios with the cache off and on."""
    rows = []
    for table in ("pgsql", "ldap"):
        for conns in sorted({r["conns"] for r in records}):
            row = {"table": table, "conns": conns}
            for side, cached in variants():
                mine = [r for r in records if (r["table"], r["conns"], r["side"],
                                               r["cached"]) == (table, conns, side, cached)]
                name = side + ("_cached" if cached else "")
                row[f"{name}_rate"] = report.median_or_none([r["rate"] for r in mine])
                row[f"{name}_p99_ms"] = report.median_or_none([r["p99_ms"] for r in mine])
                row[f"{name}_db_connections"] = max((r["db_connections"] for r in mine),
                                                    default=None)
                row[f"{name}_errors"] = sorted({e for r in mine for e in r["errors"]})[:3]
            row["ratio_off"] = report.ratio(row["ours_rate"], row["c_rate"])
            row["ratio_on"] = report.ratio(row["ours_cached_rate"], row["c_rate"])
            rows.append(row)
    return rows


def text_table(rows: list[dict]) -> str:
    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)
    lines = [f"{'table':<6} {'conns':>5} {'C req/s':>9} {'ours':>9} {'ratio':>6} "
             f"{'ours+cache':>10} {'ratio':>6}   db connections C / ours / ours+cache"]
    for r in rows:
        lines.append(f"{r['table']:<6} {r['conns']:>5} {num(r['c_rate']):>9} "
                     f"{num(r['ours_rate']):>9} {num(r['ratio_off'], '{:.2f}'):>6} "
                     f"{num(r['ours_cached_rate']):>10} {num(r['ratio_on'], '{:.2f}'):>6}   "
                     f"{num(r['c_db_connections'])} / {num(r['ours_db_connections'])} / "
                     f"{num(r['ours_cached_db_connections'])}")
    return "\n".join(lines)


def log_warnings(path: str, limit: int = 2000) -> list[str]:
    """The last `limit` warning, error and fatal lines of a maillog file."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip("\n") for line in f
                     if any(word in line for word in (" warning: ", " error: ", " fatal: "))]
    except OSError:
        return []
    return lines[-limit:]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if refuse_without_root("bench"):
        return 1
    quick = args.quick
    duration = args.duration or (0.5 if quick else 5.0)
    reps = args.reps or (1 if quick else 2)
    records_n = args.records or (200 if quick else 1000)
    conns_list = [1, 64]

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    base = tempfile.mkdtemp(prefix="pmbench-remote-", dir=os.environ.get("PMBENCH_PARENT",
                                                                          "/tmp"))
    os.chmod(base, 0o755)
    started = []      # everything with a stop(), stopped in reverse order
    t_begin = time.monotonic()
    try:
        log(f"bench: starting PostgreSQL and slapd, {records_n} records each")
        pg = PostgresServer()
        started.append(pg)
        slapd = SlapdServer(database="index mail eq")   # as a directory of addresses has
        started.append(slapd)
        fill_postgres(pg, records_n)
        fill_slapd(slapd, records_n)
        files = os.path.join(base, "tables")
        os.makedirs(files)
        os.chmod(files, 0o755)
        specs = write_table_files(files, pg, slapd)
        services = {}
        for side, cls in (("c", RealPostfix), ("ours", OurService)):
            maps = [spec for (_, s, _), spec in specs.items() if s == side]
            # ours logs to a file of the run, whose warnings go into the JSON
            extra = {"maillog_file": os.path.join(base, "ours.maillog"),
                     "maillog_file_prefixes": base} if side == "ours" else {}
            service = cls(os.path.join(base, side), maps, [], extra=extra)
            started.append(service)
            log(f"bench: starting {service.label}")
            service.start()
            services[side] = service
        keys = lookup_keys(records_n)
        counters = {
            "pgsql": lambda side: (lambda: pg_connections(pg, side)),
            "ldap": lambda side: (lambda: slapd_connections(slapd, services[side])),
        }
        records = []
        for rep in range(reps):
            for table in ("pgsql", "ldap"):
                for conns in conns_list:
                    for side, cached in variants():
                        spec = specs[table, side, cached]
                        rec = measure(services[side], spec, keys, conns, duration,
                                      counters[table](side))
                        rec.update({"table": table, "conns": conns, "side": side,
                                    "cached": cached, "rep": rep})
                        records.append(rec)
                        log(f"bench: rep {rep + 1}/{reps} {table:<5} c{conns:<3} "
                            f"{side + (' +cache' if cached else ''):<11} {rec['rate']:8.0f}/s"
                            f"  db connections {rec['db_connections']}"
                            + (f"  errors: {rec['errors'][:2]}" if rec["errors"] else ""))
        rows = summary_rows(records)
        print(f"remote tables, {records_n} records, {reps} rep(s) x {duration:g} s, medians;"
              f" C: {services['c'].label}, ours: {services['ours'].label}")
        print(text_table(rows))
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"bench-remote-{'quick' if quick else 'full'}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump({"records_per_db": records_n, "duration": duration, "reps": reps,
                       "elapsed_s": round(time.monotonic() - t_begin, 1), "rows": rows,
                       "records": records,
                       "ours_log_warnings": log_warnings(os.path.join(base, "ours.maillog"))},
                      f, indent=1)
        print(f"\nresults: {path}")
        return 0
    except (StartError, KeyboardInterrupt) as exc:
        return failure_status(exc)
    finally:
        stop_all(reversed(started),
                 lambda thing: thing.cleanup() if hasattr(thing, "cleanup") else thing.stop())
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
