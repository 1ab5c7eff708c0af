"""Instructions per lookup, ours and the C proxymap, counted by callgrind.

Wall times on a shared machine wander; instruction counts do not. Each
server runs under `valgrind --tool=callgrind`: ours as one standalone
worker (`proxymap --listen`), Postfix's C proxymap under a private Postfix
master whose daemon_directory holds a small wrapper that starts the real
binary under valgrind. Each server is run twice: one client connection
sends WARMUP lookups in the first run and WARMUP + LOOKUPS in the second,
then the server is stopped and callgrind writes the process's instruction
total. Instructions per lookup = (second total - first total) / LOOKUPS:
start-up and shutdown cancel out, the event loop's turns stay in.
(callgrind_control --dump cannot reach the C proxymap once it has dropped
privileges, hence two runs; PYTHONHASHSEED is fixed so that our two runs
start alike.)

Ours runs twice over: on the compiled hot path ("ours", proxymap/_hotpath.c
where pip built it) and on the pure-Python one ("ours-pure",
PROXYMAP_PURE_PYTHON=1).

Workloads: "hot" cycles over 100 keys (answer cache hits for us), "cold"
over 1000 keys with our answer cache off (every lookup reads the file, as
the C proxymap always does). Both ask `hash:` with flags 64 (LOCK: a shared
flock around each read), as Postfix daemons do. "update" goes to proxywrite:
each unit is one durable update of a new key and the delete of that key (a
`btree:` table of 1000 keys, the flags benchmarks/loadgen.py's writers send:
UTF8_REQUEST, LOCK, DUP_WARN), so its figure is instructions per
update+delete pair.

"churn" counts instructions per session, as `make bench`'s churn
scenario runs one: connect, greeting, open, one lookup, close, one
session after the other. Here the master is part of the cost, so each
side runs whole under callgrind: ours as `proxymap-master run` (its
workers are forked, not exec'd, so callgrind follows them into their own
files), the C side as Postfix's master (the daemon directory's `master`
is a wrapper too) with its proxymap processes. The figure is the sum over
every process's file: master, the workers or proxymap processes that
served and those started when `max_use` (100, the default on both sides)
retired one, so a retirement's fork and start-up are spread over the
sessions as they are in production. The sessions per second are lower
under valgrind, so the loops' timer turns (ours: 0.5 s master, 1 s
worker) weigh a little more than on a bare machine; they are a small
part (see docs/performance.md).

    .venv/bin/python benchmarks/instructions.py [--lookups N] [--sessions N]
                                                [--workload hot|cold|update|churn] [--json FILE]

Needs valgrind (Debian package `valgrind`) and root (the C proxymap's
master). Processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loadgen import LOOKUP_FLAGS  # noqa: E402
from benchmarks.realpostfix import RealPostfix, wait_for_socket  # noqa: E402
from benchmarks.servers import stop_process  # noqa: E402
from proxymap.client import OK, ProxyClient  # noqa: E402
from benchmarks.servers import MASTER_CF  # noqa: E402
from proxymap.server import standalone_command  # noqa: E402

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"
POSTMAP = "/usr/sbin/postmap"
WARMUP = 300
#: churn sessions of the base run (at least one max_use retirement: 100)
WARMUP_SESSIONS = 150
KEYS = 1000
TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.M)


def callgrind_total(path: str) -> int:
    """The instruction (Ir) total of one callgrind output file."""
    with open(path, errors="replace") as f:
        match = TOTALS.search(f.read())
    if match is None:
        raise RuntimeError(f"{path}: no totals line")
    return int(match.group(1))


def run_total(out_dir: str, prefix: str, timeout: float = 120) -> int:
    """The instruction total of the callgrind file `prefix`.* that a
    stopped server left in out_dir (written at its exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in glob.glob(os.path.join(out_dir, f"{prefix}.*")):
            try:
                return callgrind_total(path)
            except (RuntimeError, OSError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind totals in {out_dir}/{prefix}.*")


def sessions(sock: str, table: str, count: int) -> None:
    """`count` churn sessions, one after the other: connect, greeting,
    open, one lookup, close."""
    keys = _keys("cold")
    for n in range(count):
        with ProxyClient(sock, timeout=120, retries=0) as client:
            client.connect()
            client.open(table, 64)
            status, value = client.lookup(table, 64, keys[n % len(keys)].encode())
            if status != OK:
                raise RuntimeError(f"lookup: status {status} {value!r}")


def run_totals(out_dir: str, prefix: str, timeout: float = 120) -> int:
    """The sum of the instruction totals of every callgrind file
    `prefix`.* in out_dir, once no process that writes one is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sum(callgrind_total(path)
                       for path in glob.glob(os.path.join(out_dir, f"{prefix}.*")))
        except (RuntimeError, OSError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


#: the workload whose units are update+delete pairs through proxywrite
UPDATE = "update"


def drive(sock: str, table: str, workload: str, count: int) -> None:
    """`count` units of `workload` over one connection: lookups cycling
    over the workload's keys, or update+delete pairs of new keys."""
    with ProxyClient(sock, timeout=120, retries=0) as client:
        client.connect()
        if workload == UPDATE:
            for n in range(count):
                key = f"bench-{n}".encode()
                for status in (client.update(table, LOOKUP_FLAGS, key, b"updated " + key)[0],
                               client.delete(table, LOOKUP_FLAGS, key)[0]):
                    if status != OK:
                        raise RuntimeError(f"update/delete {key!r}: status {status}")
            return
        keys = _keys(workload)
        for n in range(count):
            key = keys[n % len(keys)]
            status, value = client.lookup(table, 64, key.encode())
            if status != OK:
                raise RuntimeError(f"lookup {key}: status {status} {value!r}")


def write_table(etc: str, name: str, workload: str = "hot") -> str:
    """A table of KEYS keys, built by the real postmap (main.cf exists):
    hash for lookups, btree (owned by mail_owner, who writes it) for
    updates."""
    path = os.path.join(etc, name)
    kind = "btree" if workload == UPDATE else "hash"
    with open(path, "w") as f:
        f.writelines(f"key{n}@example.com value{n}\n" for n in range(KEYS))
    subprocess.run([POSTMAP, "-c", etc, f"{kind}:{path}"], check=True, timeout=120)
    if workload == UPDATE:
        shutil.chown(f"{path}.db", "postfix", "postfix")
    return f"{kind}:{path}"


def main_cf(root: str, table: str, extra: str = "") -> None:
    with open(os.path.join(root, "etc", "main.cf"), "w") as f:
        f.write(f"compatibility_level = 3.6\nqueue_directory = {root}/queue\n"
                f"data_directory = {root}/data\nmail_owner = postfix\n"
                f"myhostname = bench.localdomain\nproxy_read_maps = proxy:{table}\n"
                f"proxy_write_maps = proxy:{table}\nmaillog_file =\n{extra}")


def make_root(parent: str, name: str) -> str:
    root = os.path.join(parent, name)
    for d in ("etc", "queue/private", "queue/pid", "data", "cg"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "cg"), 0o1777)
    shutil.chown(os.path.join(root, "data"), "postfix")
    return root


def ours_environment(pure: bool) -> dict:
    """Our processes' environment: a fixed hash seed (both runs start
    alike), the compiled or the pure-Python hot path."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    if pure:
        env["PROXYMAP_PURE_PYTHON"] = "1"
    else:
        env.pop("PROXYMAP_PURE_PYTHON", None)
    return env


def ours(parent: str, workload: str, count: int, run: str, pure: bool = False) -> int:
    """Our worker's instruction total for `count` units of `workload`
    (`pure`: on the pure-Python hot path)."""
    root = make_root(parent, f"ours{'-pure' if pure else ''}-{workload}-{run}")
    extra = "proxymap_answer_cache_entries = 0\n" if workload == "cold" else ""
    kind = "btree" if workload == UPDATE else "hash"
    main_cf(root, f"{kind}:{root}/etc/map", extra)
    table = write_table(os.path.join(root, "etc"), "map", workload)
    service = "proxywrite" if workload == UPDATE else "proxymap"
    sock = os.path.join(root, "queue", "private", service)
    env = ours_environment(pure)
    with open(os.path.join(root, "worker.log"), "wb") as log:
        proc = subprocess.Popen(
            [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={root}/cg/ours.%p",
             *standalone_command(os.path.join(root, "etc"), service, sock)],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        if not wait_for_socket(sock, 300):
            raise RuntimeError(f"our worker under valgrind did not greet: see {root}/worker.log")
        drive(sock, table, workload, count)
    finally:
        stop_process(proc, grace=120)
    return run_total(os.path.join(root, "cg"), "ours")


def daemons_under_callgrind(root: str, wrapped: dict[str, str]) -> tuple[str, str]:
    """(callgrind output directory, daemon_directory) under `root`: the
    daemon directory links Postfix's daemons, except those named in
    `wrapped`, which are scripts that start the real one under callgrind
    writing to cg/PREFIX.PID (prefix: the value)."""
    cg = os.path.join(root, "cg")
    daemons = os.path.join(root, "daemons")
    for d in (cg, daemons):
        os.makedirs(d, exist_ok=True)
    os.chmod(cg, 0o777)
    for name in os.listdir(POSTFIX_DAEMONS):
        if name not in wrapped:
            os.symlink(os.path.join(POSTFIX_DAEMONS, name), os.path.join(daemons, name))
    for name, prefix in wrapped.items():
        wrapper = os.path.join(daemons, name)
        with open(wrapper, "w") as f:
            # callgrind opens its file at start (as root) and again at exit,
            # after a daemon has become mail_owner: that user must own it
            # (the exec keeps the pid, so $$ is valgrind's %p); valgrind's
            # own messages go to a file, not to the stderr that `postfix
            # start` waits on
            f.write(f"#!/bin/sh\n: > {cg}/{prefix}.$$ && chown postfix {cg}/{prefix}.$$\n"
                    f"exec {VALGRIND} --tool=callgrind --callgrind-out-file={cg}/{prefix}.%p"
                    f" --log-file={cg}/{prefix}-log.%p {POSTFIX_DAEMONS}/{name} \"$@\"\n")
        os.chmod(wrapper, 0o755)
    return cg, daemons


def c_proxymap(parent: str, workload: str, count: int, run: str) -> int:
    """The C proxymap's (proxywrite's, for UPDATE) instruction total for
    `count` units of `workload`."""
    root = os.path.join(parent, f"c-{workload}-{run}")
    cg, daemons = daemons_under_callgrind(root, {"proxymap": "c"})
    table = f"{'btree' if workload == UPDATE else 'hash'}:{root}/etc/map"
    # max_use 1: the proxymap exits by itself once our one client is done
    # (a clean exit, at which callgrind writes its file)
    server = RealPostfix(root, [table], [table] if workload == UPDATE else [],
                         extra={"daemon_directory": daemons, "max_use": "1",
                                "max_idle": "3600s"})
    write_table(server.config_dir, "map", workload)
    server.start()
    try:
        # start() greeted on proxymap only (proxywrite starts on demand):
        # one process that exits (max_use 1) and leaves its file; our
        # client gets a fresh one
        deadline = time.monotonic() + 120
        while not glob.glob(os.path.join(cg, "c.*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)       # both files complete
        for path in glob.glob(os.path.join(cg, "c.*")):
            os.unlink(path)
        drive(server.socket_path("proxywrite" if workload == UPDATE else "proxymap"), table,
              workload, count)
        return run_total(cg, "c")
    finally:
        server.stop()


def ours_churn(parent: str, count: int, run: str, pure: bool = False) -> int:
    """Instructions of our master and all its workers for `count` sessions."""
    root = make_root(parent, f"ours{'-pure' if pure else ''}-churn-{run}")
    main_cf(root, f"hash:{root}/etc/map")
    table = write_table(os.path.join(root, "etc"), "map")
    with open(os.path.join(root, "etc", "master.cf"), "w") as f:
        f.write(MASTER_CF)
    sock = os.path.join(root, "queue", "private", "proxymap")
    env = ours_environment(pure)
    master = os.path.join(os.path.dirname(sys.executable), "proxymap-master")
    with open(os.path.join(root, "master.log"), "wb") as log:
        proc = subprocess.Popen(
            [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={root}/cg/ours.%p",
             # a forked worker's file starts at the fork: without this it
             # would repeat the master's counts up to then
             "--zero-before=PyOS_AfterFork_Child",
             master, "-c", os.path.join(root, "etc"), "run", "--stderr"],
            stdout=subprocess.DEVNULL, stderr=log, env=env, stdin=subprocess.DEVNULL)
    try:
        if not wait_for_socket(sock, 300):
            raise RuntimeError(f"our master under valgrind did not greet: see {root}/master.log")
        sessions(sock, table, count)
    finally:
        stop_process(proc, grace=300)
    return run_totals(os.path.join(root, "cg"), "ours")


def c_churn(parent: str, count: int, run: str) -> int:
    """Instructions of Postfix's master and its proxymap processes for
    `count` sessions."""
    root = os.path.join(parent, f"c-churn-{run}")
    cg, daemons = daemons_under_callgrind(root, {"proxymap": "c", "master": "m"})
    table = f"hash:{root}/etc/map"
    server = RealPostfix(root, [table], [], extra={"daemon_directory": daemons})
    write_table(server.config_dir, "map")
    server.start()
    try:
        sessions(server.socket_path(), table, count)
    finally:
        server.stop()
    return run_totals(cg, "c") + run_totals(cg, "m")


def pure_ours(parent: str, workload: str, count: int, run: str) -> int:
    return ours(parent, workload, count, run, pure=True)


def _keys(workload: str) -> list[str]:
    count = 100 if workload == "hot" else KEYS
    return [f"key{n}@example.com" for n in range(count)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lookups", type=int, default=2000,
                   help="lookups per lookup workload (update: pairs, a quarter of this)")
    p.add_argument("--sessions", type=int, default=400, help="churn sessions (default 400)")
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["ours", "ours-pure", "c"], default=None)
    p.add_argument("--workload", choices=["hot", "cold", UPDATE, "churn"], action="append",
                   default=None, help="repeatable (default: all four)")
    args = p.parse_args(argv)
    parent = tempfile.mkdtemp(prefix="pm-instructions-", dir="/tmp")
    os.chmod(parent, 0o755)
    results = {}
    per_session = {"ours": ours_churn, "ours-pure": lambda *a: ours_churn(*a, pure=True),
                   "c": c_churn}
    try:
        for workload in args.workload or ("hot", "cold", UPDATE, "churn"):
            count = max(1, args.lookups // 4) if workload == UPDATE else args.lookups
            for kind, run in (("ours", ours), ("ours-pure", pure_ours), ("c", c_proxymap)):
                if args.only not in (None, kind):
                    continue
                if workload == "churn":
                    base = per_session[kind](parent, WARMUP_SESSIONS, "base")
                    more = per_session[kind](parent, WARMUP_SESSIONS + args.sessions, "more")
                    results[f"{kind} churn"] = (more - base) / args.sessions
                else:
                    base = run(parent, workload, WARMUP, "base")
                    more = run(parent, workload, WARMUP + count, "more")
                    results[f"{kind} {workload}"] = (more - base) / count
                print(f"{kind} {workload}: {results[f'{kind} {workload}']:,.0f}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    units = {"churn": "session", UPDATE: "update+delete pair"}
    for name, value in results.items():
        unit = units.get(name.split()[-1], "lookup")
        print(f"{name:17} {value:12,.0f} instructions per {unit}")
    for kind in ("ours", "ours-pure"):
        for workload in ("hot", "cold", UPDATE, "churn"):
            if f"{kind} {workload}" in results and f"c {workload}" in results:
                print(f"{kind}/C {workload}: "
                      f"{results[f'{kind} {workload}'] / results[f'c {workload}']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
