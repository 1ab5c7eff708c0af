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
flock around each read), as Postfix daemons do.

    .venv/bin/python benchmarks/instructions.py [--lookups N] [--json FILE]

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

from benchmarks.realpostfix import RealPostfix, wait_for_socket  # noqa: E402
from benchmarks.servers import stop_process  # noqa: E402
from proxymap.client import OK, ProxyClient  # noqa: E402
from proxymap.server import standalone_command  # noqa: E402

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"
POSTMAP = "/usr/sbin/postmap"
WARMUP = 300
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


def lookups(sock: str, table: str, workload: str, count: int) -> None:
    """`count` lookups over one connection, cycling over the workload's keys."""
    keys = _keys(workload)
    with ProxyClient(sock, timeout=120, retries=0) as client:
        client.connect()
        for n in range(count):
            key = keys[n % len(keys)]
            status, value = client.lookup(table, 64, key.encode())
            if status != OK:
                raise RuntimeError(f"lookup {key}: status {status} {value!r}")


def write_table(etc: str, name: str) -> str:
    """A hash table of KEYS keys, built by the real postmap (main.cf exists)."""
    path = os.path.join(etc, name)
    with open(path, "w") as f:
        f.writelines(f"key{n}@example.com value{n}\n" for n in range(KEYS))
    subprocess.run([POSTMAP, "-c", etc, f"hash:{path}"], check=True, timeout=120)
    return f"hash:{path}"


def main_cf(root: str, table: str, extra: str = "") -> None:
    with open(os.path.join(root, "etc", "main.cf"), "w") as f:
        f.write(f"compatibility_level = 3.6\nqueue_directory = {root}/queue\n"
                f"data_directory = {root}/data\nmail_owner = postfix\n"
                f"myhostname = bench.localdomain\nproxy_read_maps = proxy:{table}\n"
                f"maillog_file =\n{extra}")


def make_root(parent: str, name: str) -> str:
    root = os.path.join(parent, name)
    for d in ("etc", "queue/private", "queue/pid", "data", "cg"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "cg"), 0o1777)
    shutil.chown(os.path.join(root, "data"), "postfix")
    return root


def ours(parent: str, workload: str, count: int, run: str, pure: bool = False) -> int:
    """Our worker's instruction total for `count` lookups of `workload`
    (`pure`: on the pure-Python hot path)."""
    root = make_root(parent, f"ours{'-pure' if pure else ''}-{workload}-{run}")
    extra = "proxymap_answer_cache_entries = 0\n" if workload == "cold" else ""
    main_cf(root, f"hash:{root}/etc/map", extra)
    table = write_table(os.path.join(root, "etc"), "map")
    sock = os.path.join(root, "queue", "private", "proxymap")
    env = dict(os.environ, PYTHONHASHSEED="0")
    if pure:
        env["PROXYMAP_PURE_PYTHON"] = "1"
    else:
        env.pop("PROXYMAP_PURE_PYTHON", None)
    with open(os.path.join(root, "worker.log"), "wb") as log:
        proc = subprocess.Popen(
            [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={root}/cg/ours.%p",
             *standalone_command(os.path.join(root, "etc"), "proxymap", sock)],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        if not wait_for_socket(sock, 300):
            raise RuntimeError(f"our worker under valgrind did not greet: see {root}/worker.log")
        lookups(sock, table, workload, count)
    finally:
        stop_process(proc, grace=120)
    return run_total(os.path.join(root, "cg"), "ours")


def c_proxymap(parent: str, workload: str, count: int, run: str) -> int:
    """The C proxymap's instruction total for `count` lookups of `workload`."""
    root = os.path.join(parent, f"c-{workload}-{run}")
    cg = os.path.join(root, "cg")
    daemons = os.path.join(root, "daemons")
    for d in (cg, daemons):
        os.makedirs(d, exist_ok=True)
    os.chmod(cg, 0o777)
    for name in os.listdir(POSTFIX_DAEMONS):
        if name != "proxymap":
            os.symlink(os.path.join(POSTFIX_DAEMONS, name), os.path.join(daemons, name))
    wrapper = os.path.join(daemons, "proxymap")
    with open(wrapper, "w") as f:
        # callgrind opens its file at start (as root) and again at exit,
        # after proxymap has become mail_owner: that user must own it (the
        # exec keeps the pid, so $$ is valgrind's %p)
        f.write(f"#!/bin/sh\n: > {cg}/c.$$ && chown postfix {cg}/c.$$\n"
                f"exec {VALGRIND} --tool=callgrind --callgrind-out-file={cg}/c.%p"
                f" {POSTFIX_DAEMONS}/proxymap \"$@\"\n")
    os.chmod(wrapper, 0o755)
    table = f"hash:{root}/etc/map"
    # max_use 1: the proxymap exits by itself once our one client is done
    # (a clean exit, at which callgrind writes its file)
    server = RealPostfix(root, [table], [], extra={"daemon_directory": daemons,
                                                   "max_use": "1", "max_idle": "3600s"})
    write_table(server.config_dir, "map")
    server.start()
    try:
        # start() greeted on proxymap and proxywrite: two processes that
        # exit (max_use 1) and leave their files; our client gets a fresh one
        deadline = time.monotonic() + 120
        while len(glob.glob(os.path.join(cg, "c.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)       # both files complete
        for path in glob.glob(os.path.join(cg, "c.*")):
            os.unlink(path)
        lookups(server.socket_path(), table, workload, count)
        return run_total(cg, "c")
    finally:
        server.stop()


def pure_ours(parent: str, workload: str, count: int, run: str) -> int:
    return ours(parent, workload, count, run, pure=True)


def _keys(workload: str) -> list[str]:
    count = 100 if workload == "hot" else KEYS
    return [f"key{n}@example.com" for n in range(count)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lookups", type=int, default=2000)
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["ours", "ours-pure", "c"], default=None)
    args = p.parse_args(argv)
    parent = tempfile.mkdtemp(prefix="pm-instructions-", dir="/tmp")
    os.chmod(parent, 0o755)
    results = {}
    try:
        for workload in ("hot", "cold"):
            for kind, run in (("ours", ours), ("ours-pure", pure_ours), ("c", c_proxymap)):
                if args.only in (None, kind):
                    base = run(parent, workload, WARMUP, "base")
                    more = run(parent, workload, WARMUP + args.lookups, "more")
                    results[f"{kind} {workload}"] = (more - base) / args.lookups
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    for name, value in results.items():
        print(f"{name:15} {value:12,.0f} instructions per lookup")
    for kind in ("ours", "ours-pure"):
        if f"{kind} cold" in results and "c cold" in results:
            print(f"{kind}/C: hot {results[f'{kind} hot'] / results['c hot']:.2f},"
                  f" cold {results[f'{kind} cold'] / results['c cold']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
