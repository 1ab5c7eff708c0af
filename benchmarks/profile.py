"""Where our server's time goes, next to the C proxymap.

Starts both servers like run.py, then for one workload (default: hash
lookups over 16 connections):
  1. `strace -c -f` attached to every process of each server in turn:
     system calls per request, C vs ours;
  2. `py-spy record` (raw collapsed stacks, all our processes): the
     functions with the most samples, on their own (self) and with what
     they call (inclusive).
strace and py-spy are stopped by pid. Numbers under strace are slow; only
the call counts matter.

    .venv/bin/python benchmarks/profile.py [--workload lookup|churn|verify|write]

"write" is run.py's update+delete scenario (proxywrite, a btree table).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import loadgen, scenarios  # noqa: E402
from benchmarks.run import log, setup  # noqa: E402
from benchmarks.servers import stop_process  # noqa: E402

PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """{syscall: calls} from the table `strace -c` prints."""
    calls = {}
    for line in text.splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def collapse(raw: str) -> tuple[collections.Counter, collections.Counter, int]:
    """(self samples, inclusive samples, total) per function from py-spy's
    raw format: `frame;frame;... COUNT` per line, frames `func (file:line)`."""
    own, incl = collections.Counter(), collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        frames = [f.replace(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/",
                            "") for f in frames]
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return own, incl, total


def drive(server, sc, ctx):
    wl = loadgen.Workload(sc.client, scenarios.table_spec(server, ctx, sc.table),
                          ctx.keys(sc.table))
    return loadgen.run(server.socket_path(sc.service), wl, sc.conns, ctx.duration)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/profile.py")
    p.add_argument("--workload", choices=("lookup", "churn", "verify", "write"), default="lookup")
    p.add_argument("--table", choices=("hash", "btree", "cidr", "regexp"), default="hash",
                   help="table for the lookup and churn workloads")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--entries", type=int, default=100000)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    base = tempfile.mkdtemp(prefix="pmbench-", dir="/tmp")
    os.chmod(base, 0o755)
    servers = []
    try:
        ts = setup(base, (args.entries, 2000, 200), "auto", servers)
        c, ours = servers
        work = os.path.join(base, "work")
        os.makedirs(work)
        ctx = scenarios.Context(ts, args.duration, 0, None, work)
        writes = args.workload in ("verify", "write")
        service = "proxywrite" if writes else "proxymap"
        table = args.workload if writes else args.table
        sc = scenarios.Scenario("profile", "profile", args.workload, service, table, args.conns)
        for server in (c, ours):                     # warm up: open tables, spawn workers
            drive(server, sc, scenarios.Context(ts, 1.0, 0, None, work))
        print(f"# workload {args.workload} ({table}), {args.conns} connections, "
              f"{args.duration:g} s")
        print("\n## system calls per request (strace -c -f)\n")
        per_req = {}
        for server in (c, ours):
            out = os.path.join(base, f"strace-{server.kind}")
            pids = [str(pr.pid) for pr in server.processes()]
            cmd = ["strace", "-c", "-f", "-o", out] + [a for pid in pids for a in ("-p", pid)]
            tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.0)
                res = drive(server, sc, ctx)
            finally:
                stop_process(tracer, signal.SIGINT)
            with open(out) as f:
                calls = parse_strace_summary(f.read())
            per_req[server.kind] = ({k: v / max(1, res.total) for k, v in calls.items()},
                                    res.total)
        names = sorted(set(per_req["c"][0]) | set(per_req["ours"][0]),
                       key=lambda k: -(per_req["ours"][0].get(k, 0) + per_req["c"][0].get(k, 0)))
        print(f"{'syscall':<16} {'C':>8} {'ours':>8}   (calls per request; "
              f"requests: C {per_req['c'][1]}, ours {per_req['ours'][1]})")
        for name in names[:20]:
            print(f"{name:<16} {per_req['c'][0].get(name, 0):8.2f} "
                  f"{per_req['ours'][0].get(name, 0):8.2f}")
        print(f"{'total':<16} {sum(per_req['c'][0].values()):8.2f} "
              f"{sum(per_req['ours'][0].values()):8.2f}")
        print("\n## py-spy: our processes\n")
        raw = os.path.join(base, "pyspy.txt")
        root = ours.root_pids()[0]
        spy = subprocess.Popen([PY_SPY, "record", "-p", str(root), "--subprocesses",
                                "--nonblocking", "-r", "250", "-f", "raw", "-o", raw],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            res = drive(ours, sc, ctx)
        finally:
            stop_process(spy, signal.SIGINT)
        with open(raw) as f:
            own, incl, total = collapse(f.read())
        print(f"{total} samples, {res.total} requests\n")
        print("self time:")
        for name, n in own.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
        print("\ninclusive time:")
        for name, n in incl.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
        kept = os.path.join(tempfile.gettempdir(), f"pmbench-pyspy-{args.workload}-{table}.txt")
        shutil.copyfile(raw, kept)
        print(f"\nraw py-spy stacks (for a flame graph): {kept}")
        return 0
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"profile: warning: stopping {server.kind}: {exc}")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
