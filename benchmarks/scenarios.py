"""The benchmark's scenarios and how one measurement of one is taken.

A scenario names a client (real `postmap -q -` streams, or the raw
protocol load generator with a workload), the service socket it talks to,
the table and the concurrency. `measure()` runs it once against one
server while metering the server's CPU and memory, and returns a flat
record for the report.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass

from benchmarks import loadgen
from benchmarks.servers import UsageMeter
from benchmarks.tables import POSTMAP, TableSet


@dataclass
class Scenario:
    name: str            # unique, e.g. "lookup hash c16"
    group: str           # rows with the same group are plotted against conns
    client: str          # "postmap" or a loadgen workload kind
    service: str         # proxymap or proxywrite
    table: str           # hash, btree, cidr, regexp, pcre, write, verify
    conns: int
    keys: str = ""       # the key mix: "" uniform over the table's keys, "zipf" skewed


def plan(quick: bool) -> list[Scenario]:
    """Every scenario of a run, in the order they are measured."""
    if quick:
        lookup_conns, postmap_procs, churn, writers, verify = [1, 4], [1], [1], [1], [1]
        other_tables, other_conns = ["cidr"], 1
    else:
        lookup_conns, postmap_procs, churn, writers, verify = \
            [1, 4, 16, 64], [1, 4, 16], [1, 16], [1, 4], [1, 4]
        other_tables, other_conns = ["btree", "cidr", "regexp", "pcre"], 16
    out = [Scenario(f"postmap -q - hash p{p}", "postmap", "postmap", "proxymap", "hash", p)
           for p in postmap_procs]
    out += [Scenario(f"lookup hash c{c}", "lookup hash", "lookup", "proxymap", "hash", c)
            for c in lookup_conns]
    out += [Scenario(f"lookup hash zipf c{c}", "lookup hash zipf", "lookup", "proxymap",
                     "hash", c, "zipf") for c in lookup_conns]
    out += [Scenario(f"lookup {t} c{other_conns}", f"lookup {t}", "lookup", "proxymap", t,
                     other_conns) for t in other_tables]
    out += [Scenario(f"churn hash c{c}", "churn", "churn", "proxymap", "hash", c)
            for c in churn]
    out += [Scenario(f"update+delete w{c}", "write", "write", "proxywrite", "write", c)
            for c in writers]
    out += [Scenario(f"verify mix c{c}", "verify", "verify", "proxywrite", "verify", c)
            for c in verify]
    return out


class Context:
    """What measure() needs besides the server: tables, keys, durations."""

    def __init__(self, tables: TableSet, duration: float, postmap_keys: int,
                 gen_procs: int | None, workdir: str):
        self.tables = tables
        self.duration = duration
        self.postmap_keys = postmap_keys
        self.gen_procs = gen_procs
        self.workdir = workdir
        self._keys: dict[str, list[bytes]] = {}

    def keys(self, kind: str, mix: str = "") -> list[bytes]:
        if (kind, mix) not in self._keys:
            base = "hash" if kind in ("write", "verify") else kind
            keys = self.tables.lookup_keys(base, 20000, seed=7)
            if mix == "zipf":
                keys = zipf_sequence(keys, len(keys), seed=11)
            self._keys[kind, mix] = keys
        return self._keys[kind, mix]


def zipf_sequence(pool: list, count: int, seed: int, s: float = 1.0) -> list:
    """`count` picks from `pool` where the r-th key is asked with weight
    1/r**s (a Zipf-like skew: a few hot keys, a long tail), seeded."""
    import random
    rng = random.Random(seed)
    return rng.choices(pool, weights=[1 / (r + 1) ** s for r in range(len(pool))], k=count)


def cache_counts(server) -> tuple[int, int] | None:
    """(hits, misses) of our workers' answer caches, from the master's
    status file; None for the C proxymap (or no status)."""
    import json
    path = os.path.join(server.queue_dir, "pid", "proxymap-master.status")
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    hits = misses = 0
    for service in status.get("services", {}).values():
        for worker in service.get("workers", []):
            hits += worker.get("cache_hits", 0)
            misses += worker.get("cache_misses", 0)
    return hits, misses


def table_spec(server, ctx: Context, table: str) -> str:
    if table in ("write", "verify"):
        return server.write_tables[table]
    return ctx.tables.specs[table]


def measure(server, sc: Scenario, ctx: Context) -> dict:
    """One run of `sc` against `server`; a flat dict for the report."""
    spec = table_spec(server, ctx, sc.table)
    record = {"server": server.kind, "scenario": sc.name, "group": sc.group,
              "conns": sc.conns, "client": sc.client}
    before = cache_counts(server) if server.kind == "ours" else None
    with UsageMeter(server) as usage:
        if sc.client == "postmap":
            out = postmap_streams(server.config_dir, spec, ctx, sc.conns)
        else:
            wl = loadgen.Workload(sc.client, spec, ctx.keys(sc.table, sc.keys))
            res = loadgen.run(server.socket_path(sc.service), wl, sc.conns, ctx.duration,
                              ctx.gen_procs)
            out = summarize(res)
    record.update(out)
    after = cache_counts(server) if before is not None else None
    if after is not None:
        # status travels every 0.5 s: a close estimate, not an exact count
        hits, misses = after[0] - before[0], after[1] - before[1]
        record["cache_hit_rate"] = hits / (hits + misses) if hits + misses > 0 else None
    n = record["requests"]
    record["server_cpu"] = usage.cpu
    record["cpu_per_10k"] = usage.cpu / n * 10000 if n else None
    record["client_cpu_per_10k"] = record.pop("client_cpu") / n * 10000 if n else None
    record["peak_rss_mb"] = usage.peak_rss / 2 ** 20
    record["peak_pss_mb"] = usage.peak_pss / 2 ** 20
    record["peak_procs"] = usage.peak_procs
    return record


def percentile(sorted_values, q: float):
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[idx]


def summarize(res: loadgen.LoadResult) -> dict:
    lat = sorted(res.latencies)
    ms = 1000.0
    return {
        "requests": res.requests, "rate": res.rate, "duration": res.duration,
        "p50_ms": percentile(lat, 50) * ms if lat else None,
        "p99_ms": percentile(lat, 99) * ms if lat else None,
        "p999_ms": percentile(lat, 99.9) * ms if lat else None,
        "statuses": dict(res.statuses), "errors": res.errors[:10],
        "client_cpu": res.client_cpu, "gen_procs": res.procs,
    }


def postmap_streams(config_dir: str, spec: str, ctx: Context, procs: int) -> dict:
    """`procs` real `postmap -c DIR -q - proxy:SPEC` processes, each reading
    its share of ctx.postmap_keys hit keys from a file; all start together,
    the rate is keys answered over the wall time until the last exits."""
    keys = ctx.tables.lookup_keys("hash", ctx.postmap_keys, seed=11, miss=0.0)
    share = max(1, len(keys) // procs)
    files, running = [], []
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for i in range(procs):
            path_in = os.path.join(ctx.workdir, f"keys-{i}")
            with open(path_in, "wb") as f:
                f.write(b"\n".join(keys[i * share:(i + 1) * share]) + b"\n")
            fin = open(path_in, "rb")
            fout = open(os.path.join(ctx.workdir, f"out-{i}"), "w+b")
            ferr = open(os.path.join(ctx.workdir, f"err-{i}"), "w+b")
            files += [fin, fout, ferr]
        t0 = time.perf_counter()
        for i in range(procs):
            fin, fout, ferr = files[3 * i:3 * i + 3]
            running.append(subprocess.Popen([POSTMAP, "-c", config_dir, "-q", "-",
                                             f"proxy:{spec}"],
                                            stdin=fin, stdout=fout, stderr=ferr))
        errors = []
        deadline = time.monotonic() + 600
        for p in running:
            try:
                p.wait(max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
                errors.append("postmap timed out")
        elapsed = time.perf_counter() - t0
        answered = 0
        for i, p in enumerate(running):
            fout, ferr = files[3 * i + 1], files[3 * i + 2]
            fout.seek(0)
            answered += fout.read().count(b"\n")
            ferr.seek(0)
            err = ferr.read().decode(errors="replace").strip()
            if err:
                errors.append(err.splitlines()[-1])
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for f in files:
            f.close()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"requests": answered, "rate": answered / elapsed if elapsed else 0.0,
            "duration": elapsed, "p50_ms": None, "p99_ms": None, "p999_ms": None,
            "statuses": {"0": answered}, "errors": errors[:10],
            "client_cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "gen_procs": procs}
