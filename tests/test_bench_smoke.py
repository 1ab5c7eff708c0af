"""Smoke run of the benchmark (`benchmarks/run.py --quick`): it must work,
whatever the numbers are. Checks that the JSON and PNG are written, that
both the real Postfix proxymap and ours answered every scenario with
sensible statuses, that ours/C ratios were computed, and that no process
of either server outlives the run. Needs root and real Postfix.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from benchmarks import report, scenarios, tables
from benchmarks.profile import collapse, parse_strace_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")

needs_postfix = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="real Postfix's master needs root"),
    pytest.mark.skipif(not shutil.which("postfix", path="/usr/sbin"),
                       reason="real Postfix is not installed"),
]


def smoke(func):
    for mark in needs_postfix:
        func = mark(func)
    return func


def bench_processes(parent: str) -> set[int]:
    """Pids of processes whose command line or cwd mentions `parent`, the
    directory this test's benchmark run makes its instances in (never those
    of another run on the same machine)."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        text = " ".join(proc.info.get("cmdline") or []) + " " + (proc.info.get("cwd") or "")
        if parent in text:
            found.add(proc.info["pid"])
    return found


def run_quick(script: str, out) -> tuple[subprocess.CompletedProcess, set[int]]:
    """`script --quick --out OUT` in a parent directory of its own; the
    result and the pids of its processes still alive afterwards (killed)."""
    # a parent of our own, searchable by mail_owner (pytest's are root-only)
    parent = tempfile.mkdtemp(prefix="pmbench-smoke-", dir="/tmp")
    os.chmod(parent, 0o755)
    try:
        result = subprocess.run([sys.executable, script, "--quick", "--out", str(out)],
                                capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env={**os.environ, "PMBENCH_PARENT": parent})
        leftover = bench_processes(parent)
        for pid in leftover:      # never leave a server behind, even if the test fails
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    return result, leftover


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result, leftover = run_quick(RUN, out)
    return result, out, leftover


@smoke
def test_run_succeeds_and_writes_outputs(quick_run):
    result, out, _ = quick_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(glob.glob(str(out / "bench-quick-*.json"))) == 1
    pngs = glob.glob(str(out / "bench-quick-*.png"))
    assert len(pngs) == 1
    with open(pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "ours/C" in result.stdout
    assert "null server" in result.stdout


@smoke
def test_both_servers_answered_every_scenario(quick_run):
    result, out, _ = quick_run
    data = json.load(open(glob.glob(str(out / "bench-quick-*.json"))[0]))
    scenarios = {r["scenario"] for r in data["rows"]}
    assert {"postmap -q - hash p1", "lookup hash c1", "churn hash c1",
            "update+delete w1", "verify mix c1"} <= scenarios
    for rec in data["records"]:
        where = f"{rec['server']} {rec['scenario']}"
        assert rec["requests"] > 0, where
        assert rec["errors"] == [], where
        statuses = rec["statuses"]
        # only OK and NOKEY: never BAD, DENY, RETRY or CONFIG
        assert set(statuses) <= {"0", "1"}, (where, statuses)
        assert statuses.get("0", 0) > 0, where
        if rec["scenario"].startswith("update+delete"):
            # every update stores, every delete finds what was just stored
            assert statuses.get("1", 0) == 0, (where, statuses)
        assert rec["server_cpu"] >= 0, where     # psutil ticks: a tiny run may read 0
        assert rec["peak_rss_mb"] > 0 and rec["peak_procs"] >= 2, where
    assert {r["server"] for r in data["records"]} == {"c", "ours"}


@smoke
def test_ratios_computed(quick_run):
    result, out, _ = quick_run
    data = json.load(open(glob.glob(str(out / "bench-quick-*.json"))[0]))
    for row in data["rows"]:
        assert row["ratio_rate"] > 0, row["scenario"]
        assert row["ratio_peak_rss_mb"] > 0, row["scenario"]
        if row["c_cpu_per_10k"]:
            assert row["ratio_cpu_per_10k"] == row["ours_cpu_per_10k"] / row["c_cpu_per_10k"]
        if row["client"] != "postmap":
            assert row["ratio_p99_ms"] > 0, row["scenario"]
    assert any(row["ratio_cpu_per_10k"] for row in data["rows"])
    assert data["calibration"] and all(c["rate"] > 0 for c in data["calibration"])


@smoke
def test_no_server_process_left_behind(quick_run):
    _, _, leftover = quick_run
    assert leftover == set()


# -- the small pure parts, directly --------------------------------------------------

def test_percentile_picks_nearest_rank():
    values = list(range(1, 1001))
    assert scenarios.percentile(values, 50) == 501
    assert scenarios.percentile(values, 99.9) == 999
    assert scenarios.percentile(values, 100) == 1000
    assert scenarios.percentile([], 50) is None


def test_aggregate_takes_medians_per_server_and_ratios():
    def rec(server, rate, p99):
        return {"server": server, "scenario": "s", "group": "g", "conns": 1,
                "client": "lookup", "rate": rate, "p99_ms": p99, "errors": [],
                "requests": 10}
    records = [rec("c", 100, 1.0), rec("ours", 10, 4.0), rec("c", 300, 3.0),
               rec("ours", 30, 2.0), rec("c", 200, 2.0), rec("ours", 20, 3.0)]
    (row,) = report.aggregate(records, ["s", "missing"])
    assert (row["c_rate"], row["ours_rate"]) == (200, 20)
    assert row["ratio_rate"] == 0.1 and row["ratio_p99_ms"] == 1.5
    assert row["ratio_cpu_per_10k"] is None          # not measured: no ratio
    assert row["reps"] == {"c": 3, "ours": 3}
    assert "s" in report.table([row])


def test_parse_strace_summary():
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.004000           2      2000           flock
 30.00    0.003000           1      3000        12 read
------ ----------- ----------- --------- --------- ----------------
100.00    0.007000           1      5000        12 total
"""
    assert parse_strace_summary(text) == {"flock": 2000, "read": 3000}


def test_collapse_counts_self_and_inclusive_samples():
    raw = ("main (a.py:1);run (b.py:2);send (c.py:3) 3\n"
           "main (a.py:1);run (b.py:9) 1\n")
    own, incl, total = collapse(raw)
    assert total == 4
    assert own["send (c.py)"] == 3 and own["run (b.py)"] == 1
    assert incl["main (a.py)"] == 4 and incl["run (b.py)"] == 4


def test_hit_keys_match_the_rules_they_were_made_for():
    import ipaddress
    import re
    ts = tables.TableSet("/nonexistent", entries=1000, cidr_rules=300, regexp_rules=200)
    keys = ts.lookup_keys("regexp", 200, miss=0.0)
    rules = [re.compile(tables.regexp_rule(n)[0].strip("/")) for n in range(200)]
    for key in keys:
        assert sum(1 for r in rules if r.search(key.decode())) == 1, key
    nets = [ipaddress.ip_network(tables.cidr_rule(n)[0]) for n in range(300)]
    assert len(set(nets)) == 300                  # no rule shadows another
    for key in ts.lookup_keys("cidr", 200, miss=0.0):
        assert any(ipaddress.ip_address(key.decode()) in net for net in nets), key
    for key in ts.lookup_keys("hash", 200, miss=1.0):
        assert int(key.split(b"@")[0][4:]) >= 1000        # a miss is outside the table
    assert ts.lookup_keys("hash", 50, seed=3) == ts.lookup_keys("hash", 50, seed=3)


REMOTE = os.path.join(ROOT, "benchmarks", "remote.py")


@smoke
@pytest.mark.skipif(not glob.glob("/usr/lib/postgresql/*/bin/postgres")
                    or not shutil.which("slapd", path="/usr/sbin:/usr/bin"),
                    reason="needs PostgreSQL and slapd")
def test_remote_tables_bench_quick(tmp_path):
    """`benchmarks/remote.py --quick`: both proxymaps answered every pgsql
    and ldap scenario with OK and NOKEY only, ratios with the cache off and
    on were computed, each side's database connections were counted at 64
    clients, and no process of the run outlives it."""
    result, leftover = run_quick(REMOTE, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not leftover
    data = json.load(open(glob.glob(str(tmp_path / "bench-remote-quick-*.json"))[0]))
    assert {(r["table"], r["conns"]) for r in data["rows"]} == \
        {("pgsql", 1), ("pgsql", 64), ("ldap", 1), ("ldap", 64)}
    for rec in data["records"]:
        where = (rec["table"], rec["conns"], rec["side"], rec["cached"])
        assert rec["requests"] > 0 and rec["errors"] == [], where
        assert set(rec["statuses"]) <= {"0", "1"} and rec["statuses"].get("0"), where
        if rec["conns"] == 64:
            assert rec["db_connections"] >= 1, where
    for row in data["rows"]:
        assert row["ratio_off"] > 0 and row["ratio_on"] > 0, row
    assert "ours+cache" in result.stdout
