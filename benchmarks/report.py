"""Turning measurements into the report: medians over repetitions, the
ours/C ratios, a text table for stdout, a JSON file and a PNG plot
(throughput and p99 latency against concurrency, both servers).
"""

from __future__ import annotations

import json
import statistics

METRICS = ("rate", "p50_ms", "p99_ms", "p999_ms", "cpu_per_10k", "peak_rss_mb",
           "peak_pss_mb", "peak_procs", "client_cpu_per_10k", "cache_hit_rate")


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, c):
    if ours is None or c is None or c == 0:
        return None
    return ours / c


def aggregate(records: list[dict], order: list[str]) -> list[dict]:
    """One row per scenario: per-server medians of every metric and ratios."""
    rows = []
    for name in order:
        mine = [r for r in records if r["scenario"] == name]
        if not mine:
            continue
        row = {"scenario": name, "group": mine[0]["group"], "conns": mine[0]["conns"],
               "client": mine[0]["client"], "reps": {}}
        for server in ("c", "ours"):
            runs = [r for r in mine if r["server"] == server]
            row["reps"][server] = len(runs)
            for m in METRICS:
                row[f"{server}_{m}"] = median_or_none([r.get(m) for r in runs])
            row[f"{server}_errors"] = sorted({e for r in runs for e in r.get("errors", [])})[:5]
            row[f"{server}_answered"] = sum(r.get("requests", 0) for r in runs)
        for m in METRICS:
            row[f"ratio_{m}"] = ratio(row[f"ours_{m}"], row[f"c_{m}"])
        rows.append(row)
    return rows


def _fmt(value, spec=".0f"):
    if value is None:
        return "-"
    return format(value, spec)


def table(rows: list[dict]) -> str:
    """Two plain-text tables: speed/latency, then cost."""
    lines = []
    head = (f"{'scenario':<24} {'C req/s':>9} {'ours':>9} {'ours/C':>6}  "
            f"{'p50 C':>6} {'ours':>6}  {'p99 C':>6} {'ours':>6} {'ours/C':>6}  "
            f"{'p99.9 C':>7} {'ours':>6}")
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['scenario']:<24} {_fmt(r['c_rate']):>9} {_fmt(r['ours_rate']):>9} "
            f"{_fmt(r['ratio_rate'], '.2f'):>6}  "
            f"{_fmt(r['c_p50_ms'], '.3f'):>6} {_fmt(r['ours_p50_ms'], '.3f'):>6}  "
            f"{_fmt(r['c_p99_ms'], '.3f'):>6} {_fmt(r['ours_p99_ms'], '.3f'):>6} "
            f"{_fmt(r['ratio_p99_ms'], '.2f'):>6}  "
            f"{_fmt(r['c_p999_ms'], '.3f'):>7} {_fmt(r['ours_p999_ms'], '.3f'):>6}")
    lines.append("")
    head = (f"{'scenario':<24} {'CPU s/10k C':>11} {'ours':>7} {'ours/C':>6}  "
            f"{'RSS MB C':>8} {'ours':>7} {'ours/C':>6}  {'PSS MB C':>8} {'ours':>6} "
            f"{'ours/C':>6}  {'procs C':>7} {'ours':>4}  "
            f"{'client CPU s/10k':>16}")
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['scenario']:<24} {_fmt(r['c_cpu_per_10k'], '.3f'):>11} "
            f"{_fmt(r['ours_cpu_per_10k'], '.3f'):>7} {_fmt(r['ratio_cpu_per_10k'], '.2f'):>6}  "
            f"{_fmt(r['c_peak_rss_mb'], '.1f'):>8} {_fmt(r['ours_peak_rss_mb'], '.1f'):>7} "
            f"{_fmt(r['ratio_peak_rss_mb'], '.2f'):>6}  "
            f"{_fmt(r['c_peak_pss_mb'], '.1f'):>8} {_fmt(r['ours_peak_pss_mb'], '.1f'):>6} "
            f"{_fmt(r['ratio_peak_pss_mb'], '.2f'):>6}  {_fmt(r['c_peak_procs']):>7} "
            f"{_fmt(r['ours_peak_procs']):>4}  "
            f"{_fmt(r['c_client_cpu_per_10k'], '.3f'):>7} / "
            f"{_fmt(r['ours_client_cpu_per_10k'], '.3f')}")
    hit_rates = [r for r in rows if r.get("ours_cache_hit_rate") is not None]
    if hit_rates:
        lines += ["", "our answer cache: hit rate per scenario (from status, approximate)"]
        lines += [f"{r['scenario']:<24} {r['ours_cache_hit_rate']:.3f}" for r in hit_rates]
    return "\n".join(lines)


def calibration_table(cal: list[dict]) -> str:
    if not cal:
        return ""
    lines = ["load generator against a null server (its own ceiling):",
             f"{'conns':>6} {'gen procs':>9} {'req/s':>9} {'p99 ms':>7} "
             f"{'gen CPU s/10k':>13} {'gen CPU %':>9}"]
    for c in cal:
        lines.append(f"{c['conns']:>6} {c['gen_procs']:>9} {_fmt(c['rate']):>9} "
                     f"{_fmt(c['p99_ms'], '.3f'):>7} {_fmt(c['client_cpu_per_10k'], '.3f'):>13} "
                     f"{_fmt(c['gen_cpu_pct']):>9}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)


def plot(path: str, rows: list[dict], cal: list[dict], title: str) -> bool:
    """Throughput and p99 of the lookup scenarios against concurrency.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lookups = [r for r in rows if r["group"] == "lookup hash"]
    churn = [r for r in rows if r["group"] == "churn"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"c": ("Postfix 3.7 (C)", "tab:blue"), "ours": ("ours (Python)", "tab:orange")}
    for server, (label, color) in styles.items():
        for data, ls, what in ((lookups, "-", "lookups"), (churn, ":", "churn sessions")):
            pts = [(r["conns"], r[f"{server}_rate"], r[f"{server}_p99_ms"]) for r in data
                   if r[f"{server}_rate"] is not None]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax1.plot(xs, [p[1] for p in pts], ls, marker="o", color=color,
                     label=f"{label}, {what}")
            ax2.plot(xs, [p[2] for p in pts], ls, marker="o", color=color,
                     label=f"{label}, {what}")
    if cal:
        ax1.plot([c["conns"] for c in cal], [c["rate"] for c in cal], "--", color="grey",
                 label="generator vs null server")
    for ax, ylabel in ((ax1, "requests/s"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections (one request outstanding each)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax1.set_title("throughput, hash lookups")
    ax2.set_title("p99 latency")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
