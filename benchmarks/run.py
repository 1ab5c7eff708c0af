"""`make bench`: our proxymap service against Postfix 3.7's C proxymap, side by side.

Sets up, under one temporary directory, identical tables built with real
postmap, a private real-Postfix instance (proxymap + proxywrite only) and
our service on its own queue_directory; calibrates the load generator on a
null server; then runs every scenario against both servers, alternating
(C, ours, C, ours, ...) for each repetition, and reports medians and the
ours/C ratios as a table, a JSON file under benchmarks/results/ and a PNG.
Every process started is stopped by pid at the end, also on Ctrl-C.

    .venv/bin/python benchmarks/run.py [--quick] [--duration S] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import loadgen, report, scenarios, tables  # noqa: E402
from benchmarks.ours import OurService  # noqa: E402
from benchmarks.realpostfix import (  # noqa: E402
    RealPostfix, StartError, failure_status, refuse_without_root, stop_all)

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny tables, 1 repetition, short runs (the smoke test)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per load-generator measurement (default 5, quick 0.5)")
    p.add_argument("--reps", type=int, default=None,
                   help="alternating repetitions per scenario (default 3, quick 1)")
    p.add_argument("--ours", choices=("auto", "master", "workers"), default="auto",
                   help="run our service under proxymap-master, as standalone workers, "
                        "or the master if it starts (default)")
    p.add_argument("--gen-procs", type=int, default=None,
                   help="load-generator processes (default: min(conns, nproc))")
    p.add_argument("--ours-param", action="append", default=[], metavar="NAME=VALUE",
                   help="extra main.cf setting for our service only (experiments)")
    p.add_argument("--only", default=None, help="only scenarios whose name contains this")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="directory for the JSON and PNG (default benchmarks/results)")
    p.add_argument("--keep", action="store_true", help="keep the temporary instance directory")
    return p.parse_args(argv)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        postfix = subprocess.run(["/usr/sbin/postconf", "-d", "mail_version"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        postfix = ""
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "postfix": postfix.partition("= ")[2]}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def calibrate(base: str, ctx: scenarios.Context, conns_list, gen_procs) -> list[dict]:
    """The generator against a null server: its own ceiling and CPU."""
    null = loadgen.NullServer(os.path.join(base, "null.sock"), procs=os.cpu_count() or 1)
    out = []
    try:
        for conns in conns_list:
            wl = loadgen.Workload("lookup", ctx.tables.hash, ctx.keys("hash"))
            res = loadgen.run(null.path, wl, conns, ctx.duration, gen_procs)
            s = scenarios.summarize(res)
            n = s["requests"]
            out.append({"conns": conns, "gen_procs": res.procs, "rate": s["rate"],
                        "p99_ms": s["p99_ms"], "errors": s["errors"],
                        "client_cpu_per_10k": s["client_cpu"] / n * 10000 if n else None,
                        "gen_cpu_pct": 100 * s["client_cpu"] / ctx.duration})
    finally:
        null.stop()
    return out


def start_ours(root, read_maps, write_maps, mode: str, extra=None) -> OurService:
    modes = ["master", "workers"] if mode == "auto" else [mode]
    problem = None
    for m in modes:
        ours = OurService(root, read_maps, write_maps, mode=m, extra=extra)
        try:
            ours.start()
            return ours
        except (StartError, OSError, subprocess.SubprocessError) as exc:
            problem = exc
            log(f"bench: warning: our service in {m} mode did not start: {exc}")
            ours.stop()
    raise StartError(str(problem))


def setup(base: str, sizes: tuple, ours_mode: str, servers: list,
          ours_extra: dict | None = None) -> tables.TableSet:
    """Build the tables under base and start both servers, appending each
    to `servers` as soon as it exists (so the caller can always stop it)."""
    log(f"bench: building tables in {base} ({sizes[0]} entries, {sizes[1]} cidr rules, "
        f"{sizes[2]} regexps)")
    build_etc = os.path.join(base, "build-etc")
    os.makedirs(build_etc)
    with open(os.path.join(build_etc, "main.cf"), "w") as f:
        f.write(f"compatibility_level = 3.6\nqueue_directory = {base}/build-queue\n"
                f"data_directory = {base}/build-data\nmail_owner = postfix\n")
    ts = tables.build(os.path.join(base, "tables"), *sizes, config_dir=build_etc)
    read_maps = [ts.hash, ts.btree, ts.cidr, ts.regexp, ts.pcre]
    for name in ("c", "ours"):
        wdir = os.path.join(base, f"wtables-{name}")
        write_tables = {t: tables.copy_btree(ts, wdir, t) for t in ("write", "verify")}
        root = os.path.join(base, name)
        if name == "c":
            server = RealPostfix(root, read_maps, list(write_tables.values()))
            server.write_tables = write_tables
            servers.append(server)
            log("bench: starting real Postfix (postfix -c ... start)")
            server.start()
        else:
            log(f"bench: starting our service (--ours {ours_mode})")
            server = start_ours(root, read_maps, list(write_tables.values()), ours_mode,
                                ours_extra)
            server.write_tables = write_tables
            servers.append(server)
    return ts


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if refuse_without_root("bench"):
        return 1
    quick = args.quick
    duration = args.duration or (0.5 if quick else 5.0)
    reps = args.reps or (1 if quick else 3)
    sizes = (2000, 100, 20) if quick else (100000, 2000, 200)
    postmap_keys = 1000 if quick else 20000

    interrupted = []

    def on_term(signum, frame):
        # Raise to cut a wait short; remember it too, because an exception
        # raised while a finalizer runs is swallowed by Python, and the
        # loop below checks the record between measurements.
        interrupted.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)       # even when started with SIGINT ignored

    # PMBENCH_PARENT lets a caller (the smoke test) keep each run's
    # processes apart from any other run's on the same machine
    base = tempfile.mkdtemp(prefix="pmbench-", dir=os.environ.get("PMBENCH_PARENT", "/tmp"))
    os.chmod(base, 0o755)
    servers = []
    t_begin = time.monotonic()
    try:
        extra = {}
        for item in args.ours_param:
            name, sep, value = item.partition("=")
            if not sep:
                print(f"bench: fatal: --ours-param {item!r}: need NAME=VALUE", file=sys.stderr)
                return 1
            extra[name.strip()] = value.strip()
        ts = setup(base, sizes, args.ours, servers, extra)
        c, ours = servers
        workdir = os.path.join(base, "work")
        os.makedirs(workdir)
        ctx = scenarios.Context(ts, duration, postmap_keys, args.gen_procs, workdir)
        plan = [s for s in scenarios.plan(quick) if not args.only or args.only in s.name]
        lookup_conns = sorted({s.conns for s in plan if s.group == "lookup hash"})
        log(f"bench: calibrating the load generator on a null server ({lookup_conns})")
        cal = calibrate(base, ctx, lookup_conns, args.gen_procs)
        records = []
        for rep in range(reps):
            for sc in plan:
                for server in (c, ours):
                    if interrupted:
                        raise KeyboardInterrupt
                    rec = scenarios.measure(server, sc, ctx)
                    rec["rep"] = rep
                    records.append(rec)
                    log(f"bench: rep {rep + 1}/{reps} {sc.name:<24} {server.kind:<4} "
                        f"{rec['rate']:9.0f}/s" + (f"  errors: {rec['errors'][:2]}"
                                                   if rec["errors"] else ""))
        rows = report.aggregate(records, [s.name for s in plan])
        info = machine()
        info.update({"ours_mode": ours.mode, "ours_params": extra, "duration": duration, "reps": reps,
                     "quick": quick, "table_sizes": dict(zip(("entries", "cidr", "regexp"),
                                                             sizes)),
                     "elapsed_s": round(time.monotonic() - t_begin, 1)})
        print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
              f"Postfix {info['postfix']}; ours: {ours.label}; {reps} rep(s) x "
              f"{duration:g} s; medians")
        print(report.table(rows))
        print()
        print(report.calibration_table(cal))
        os.makedirs(args.out, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        tag = "quick" if quick else "full"
        json_path = os.path.join(args.out, f"bench-{tag}-{stamp}.json")
        png_path = os.path.join(args.out, f"bench-{tag}-{stamp}.png")
        report.write_json(json_path, {"machine": info, "rows": rows, "records": records,
                                      "calibration": cal})
        title = (f"{info['nproc']} CPUs {info['cpu_model']}, Python {info['python']}, "
                 f"Postfix {info['postfix']}, ours: {ours.label}")
        plotted = report.plot(png_path, rows, cal, title)
        print(f"\nresults: {json_path}" + (f"\nplot:    {png_path}" if plotted else
                                             "\nplot:    skipped (matplotlib not installed)"))
        return 0
    except (StartError, KeyboardInterrupt) as exc:
        return failure_status(exc)
    finally:
        stop_all(servers, lambda server: server.stop())
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"bench: kept {base}")


if __name__ == "__main__":
    sys.exit(main())
