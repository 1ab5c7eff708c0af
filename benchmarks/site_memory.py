"""Memory of the sample site: every process of our master, from smaps_rollup.

The sample configuration (`make run`'s: etc/postfix/main.cf and
master.cf, a hash: table through proxymap, a btree: verify cache through
proxywrite) is copied into a temporary directory, `proxymap-master start`
runs it, a few real `postmap -q` ask the read service (as a read-only
site's daemons would), and then each process's Rss, Pss and private
pages (Private_Clean + Private_Dirty) are read from
/proc/PID/smaps_rollup and printed with their sums. The master is stopped
by its pid file (`proxymap-master stop`) and the directory removed.

    .venv/bin/python benchmarks/site_memory.py [--lookups N] [-o NAME=VALUE ...]

`-o` adds main.cf lines: `-o proxymap_write_min_workers=1` pre-forks
proxywrite as the master did before workers were started on demand.
Needs root (the sample's mail_owner is postfix) and /usr/sbin/postmap.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import psutil

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER = os.path.join(os.path.dirname(sys.executable), "proxymap-master")
POSTMAP = "/usr/sbin/postmap"
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup that FIELDS names."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0])
    return values


def site(root: str, extra: list[str]) -> str:
    """The sample configuration under `root`; returns its directory."""
    etc = os.path.join(root, "etc")
    os.makedirs(etc)
    with open(os.path.join(TOP, "etc", "postfix", "main.cf")) as f:
        text = f.read().replace("@RUN@", root)
    with open(os.path.join(etc, "main.cf"), "w") as f:
        f.write(text + "".join(f"{line}\n" for line in extra))
    for name in ("master.cf", "virtual"):
        shutil.copy(os.path.join(TOP, "etc", "postfix", name), etc)
    os.chmod(root, 0o755)
    os.chmod(etc, 0o755)
    subprocess.run([POSTMAP, "-c", etc, f"hash:{etc}/virtual"], check=True)
    return etc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/site_memory.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--lookups", type=int, default=3, help="postmap -q runs before measuring")
    p.add_argument("-o", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="a main.cf line to add")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="proxymap-site-", dir="/tmp")
    etc = site(root, [param.replace("=", " = ", 1) for param in args.params])
    control = [MASTER, "-c", etc]
    try:
        subprocess.run(control + ["start"], check=True)
        for _ in range(args.lookups):
            subprocess.run([POSTMAP, "-c", etc, "-q", "postmaster@example.com",
                            f"proxy:hash:{etc}/virtual"], check=True, capture_output=True)
        with open(os.path.join(root, "queue", "pid", "proxymap-master.pid")) as f:
            master = int(f.read().split()[0])
        total = dict.fromkeys(("Rss", "Pss", "Private"), 0)
        procs = [psutil.Process(master)] + psutil.Process(master).children(recursive=True)
        print(f"{'process':<40} {'RSS MB':>7} {'PSS MB':>7} {'private MB':>10}")
        for proc in procs:
            m = smaps_rollup(proc.pid)
            private = m["Private_Clean"] + m["Private_Dirty"]
            title = " ".join(proc.cmdline())[:40]
            print(f"{title:<40} {m['Rss'] / 1024:7.1f} {m['Pss'] / 1024:7.1f} "
                  f"{private / 1024:10.1f}")
            total["Rss"] += m["Rss"]
            total["Pss"] += m["Pss"]
            total["Private"] += private
        print(f"{f'all ({len(procs)} processes)':<40} {total['Rss'] / 1024:7.1f} "
              f"{total['Pss'] / 1024:7.1f} {total['Private'] / 1024:10.1f}")
    finally:
        subprocess.run(control + ["stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
