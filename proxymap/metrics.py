"""Request counters of a worker, per table: what `status --json` and the
Prometheus listener show (master/exporter.py).

Postfix's proxymap keeps no such counters (an admin counts log lines);
this is ours. Each worker counts, per table of its allow-list, requests by
type (open/lookup/update/delete/sequence) and status (OK, NOKEY, RETRY,
BAD, DENY, CONFIG), reopens after a file change, table errors and a
latency histogram, with plain integer increments in the request path
(Dispatcher.handle: one clock read per request). Requests that name no
table of the allow-list (malformed, unapproved) are counted under
NO_TABLE, so a client cannot make the counters grow without bound.

The worker sends the counters of the tables that changed to its master
with its load reports (proxymap/handoff.py, one b"M" record per table:
`encode_record`/`decode_record`); the master keeps each worker's latest
totals, adds those of exited workers, and writes the sums per service and
table into its status file (`TableCounters.as_json`).

Tables served off the loop (proxymap/offload.py) also carry their pool
figures (`pool`, POOL_FIELDS): the lane's threads, busy threads and
requests waiting for one now, requests that waited and how long in all,
and their connection pools' size, open and busy connections and waits.
The worker refreshes them before each report (Dispatcher.note_pools); the
master adds them over its workers, and those that are a current state
(POOL_GAUGES) are left out of an exited worker's totals (`ended`).

Only the standard library is used here: the worker runs under Postfix's
master too (proxymap/multiserver.py), where no exporter is involved.
"""

from __future__ import annotations

import json

from proxymap.protocol import STATUS_NAMES

#: request types, in the order of the counter layout ("unknown": a request
#: name the protocol does not have, answered BAD)
OPERATIONS = ("open", "lookup", "update", "delete", "sequence", "unknown")
OPERATION_INDEX = {name: index for index, name in enumerate(OPERATIONS)}
UNKNOWN_OPERATION = OPERATION_INDEX["unknown"]
#: statuses per request type (protocol.OK .. protocol.CONFIG)
STATUS_COUNT = len(STATUS_NAMES)
#: The latency histogram's buckets: powers of four nanoseconds, from 2**14
#: ns (16 us) to 2**34 ns (17 s), and one more for the rest (+Inf). A
#: latency in nanoseconds finds its bucket by its bit length
#: (LATENCY_BUCKET[ns.bit_length()]): no comparisons in the request path.
LATENCY_BITS = tuple(range(14, 35, 2))
LATENCY_BOUNDS = tuple(2 ** bits / 1e9 for bits in LATENCY_BITS)    # seconds
LATENCY_BUCKET = tuple(next((i for i, bits in enumerate(LATENCY_BITS) if length <= bits),
                            len(LATENCY_BITS)) for length in range(129))
#: where requests are counted that name no table of the allow-list; its
#: `errors` are the worker's connection errors (protocol errors, timeouts,
#: too many bad requests, failed reads and writes)
NO_TABLE = "-"
#: every encoded reply starts with b"status\0" and the status digit
REPLY_STATUS_OFFSET = len(b"status\0")
#: requests[REQUEST_BASE[name] + reply[REPLY_STATUS_OFFSET]] counts a reply
#: (the status digit is ASCII: "0" is 48)
REQUEST_BASE = {name: index * STATUS_COUNT - 48 for index, name in enumerate(OPERATIONS)}


#: a backend table's pool figures, in the order of TableCounters.pool
#: (wait_ns: nanoseconds waited for a thread by the requests of `waits`)
POOL_FIELDS = ("threads", "busy", "waiting", "waits", "wait_ns", "completed", "timeouts",
               "rejected", "connections", "connections_open", "connections_in_use",
               "connection_waits")
#: those of POOL_FIELDS that are a state, not a count: an exited worker's are 0
POOL_GAUGES = frozenset(("threads", "busy", "waiting", "connections", "connections_open",
                         "connections_in_use"))
POOL_INDEX = {name: index for index, name in enumerate(POOL_FIELDS)}
#: the fields of connpool.Pool.stats() summed into the connection fields
CONNECTION_FIELDS = {"connections": "size", "connections_open": "open",
                     "connections_in_use": "in_use", "connection_waits": "waits"}


def pool_figures(lane: dict, connections: list[dict]) -> list[int]:
    """TableCounters.pool from a lane's figures (Offloader.stats_by_table)
    and the table's connection pools (BackendTable.connection_stats)."""
    figures = [int(lane.get(name, 0)) for name in POOL_FIELDS]
    for field, key in CONNECTION_FIELDS.items():
        figures[POOL_INDEX[field]] = sum(int(c.get(key, 0)) for c in connections)
    return figures


def reply_status(reply: bytes) -> int:
    """The status of an encoded reply (protocol.encode_reply)."""
    return reply[REPLY_STATUS_OFFSET] - 48


class TableCounters:
    """The counters of one table in one worker (or their sums in the master).

    `requests[OPERATION_INDEX[op] * STATUS_COUNT + status]`, `latency[i]`
    the requests answered within LATENCY_BOUNDS[i] (and above the bound
    before; the last one: above every bound), `latency_ns` their sum in
    nanoseconds. `cache_hits` / `cache_misses` are for an answer cache in
    front of the table (the code that answers from it increments them; the
    master sums them and the listener exports them). `pool` holds the
    POOL_FIELDS of a table served off the loop (empty for the others).
    `reported` is the
    number of requests at the last report (take_changed); `changed` marks a
    change that counts no request (a connection error)."""

    __slots__ = ("requests", "latency", "latency_ns", "reopens", "errors", "cache_hits",
                 "cache_misses", "pool", "reported", "changed")

    def __init__(self):
        self.requests = [0] * (len(OPERATIONS) * STATUS_COUNT)
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_ns = 0
        self.reopens = 0
        self.errors = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.pool: list[int] = []
        self.reported = 0
        self.changed = False

    def add(self, other: "TableCounters") -> None:
        for i, n in enumerate(other.requests):
            self.requests[i] += n
        for i, n in enumerate(other.latency):
            self.latency[i] += n
        self.latency_ns += other.latency_ns
        self.reopens += other.reopens
        self.errors += other.errors
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        if other.pool:
            if not self.pool:
                self.pool = [0] * len(POOL_FIELDS)
            for i, n in enumerate(other.pool):
                self.pool[i] += n

    def ended(self) -> "TableCounters":
        """A copy for the totals of an exited worker: its pool's current
        state (POOL_GAUGES) went with it."""
        copy = TableCounters()
        copy.add(self)
        if copy.pool:
            for name in POOL_GAUGES:
                copy.pool[POOL_INDEX[name]] = 0
        return copy

    def count(self, operation: str, status: int) -> int:
        return self.requests[OPERATION_INDEX[operation] * STATUS_COUNT + status]

    def as_json(self) -> dict:
        """The form of the status file: requests by type and status (zeros
        left out), the cumulative histogram as Prometheus has it."""
        requests: dict[str, dict[str, int]] = {}
        for op_index, op in enumerate(OPERATIONS):
            for status, status_name in STATUS_NAMES.items():
                n = self.requests[op_index * STATUS_COUNT + status]
                if n:
                    requests.setdefault(op, {})[status_name] = n
        buckets, total = [], 0
        for bound, n in zip((*LATENCY_BOUNDS, "+Inf"), self.latency):
            total += n
            buckets.append([bound, total])
        form = {"requests": requests, "reopens": self.reopens, "errors": self.errors,
                "latency_seconds": {"buckets": buckets, "sum": self.latency_ns / 1e9,
                                    "count": total}}
        if self.cache_hits or self.cache_misses:    # only where a cache answers
            form["cache"] = {"hits": self.cache_hits, "misses": self.cache_misses}
        if self.pool:                               # only for tables served off the loop
            figures = dict(zip(POOL_FIELDS, self.pool))
            form["pool"] = {
                **{name: figures[name] for name in ("threads", "busy", "waiting", "waits",
                                                    "completed", "timeouts", "rejected")},
                "wait_seconds": figures["wait_ns"] / 1e9,
                "connections": {key: figures[field]
                                for field, key in CONNECTION_FIELDS.items()}}
        return form


def sum_tables(*groups: dict) -> dict[str, TableCounters]:
    """{table: TableCounters} added up over several such mappings."""
    total: dict[str, TableCounters] = {}
    for group in groups:
        for spec, counters in group.items():
            total.setdefault(spec, TableCounters()).add(counters)
    return total


def encode_record(spec: str, counters: TableCounters) -> bytes:
    """The body of one b"M" record: one table's totals in this worker."""
    return json.dumps([spec, counters.requests, counters.latency, counters.latency_ns,
                       counters.reopens, counters.errors, counters.cache_hits,
                       counters.cache_misses, counters.pool], separators=(",", ":")).encode()


def decode_record(body: bytes) -> tuple[str, TableCounters]:
    """Inverse of encode_record(); ValueError when malformed."""
    try:
        spec, requests, latency, latency_ns, reopens, errors, hits, misses, pool = \
            json.loads(body)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad metrics record: {exc}") from None
    counters = TableCounters()
    if not (isinstance(spec, str) and len(requests) == len(counters.requests)
            and len(latency) == len(counters.latency)
            and isinstance(pool, list) and len(pool) in (0, len(POOL_FIELDS))
            and all(type(n) is int for n in (*requests, *latency, latency_ns, reopens, errors,
                                             hits, misses, *pool))):
        raise ValueError("bad metrics record: wrong layout")
    counters.pool = pool
    counters.requests, counters.latency = requests, latency
    counters.latency_ns, counters.reopens, counters.errors = latency_ns, reopens, errors
    counters.cache_hits, counters.cache_misses = hits, misses
    return spec, counters


class WorkerMetrics:
    """The counters of one worker process, by table."""

    __slots__ = ("tables",)

    def __init__(self):
        self.tables: dict[str, TableCounters] = {}

    def table(self, spec: str) -> TableCounters:
        counters = self.tables.get(spec)
        if counters is None:
            counters = self.tables[spec] = TableCounters()
        return counters

    def connection_error(self) -> None:
        """A connection closed on an error (counted under NO_TABLE)."""
        counters = self.table(NO_TABLE)
        counters.errors += 1
        counters.changed = True

    def take_changed(self) -> list[tuple[str, TableCounters]]:
        """The tables counted since the last call (`mark_changed` puts them
        back when the report could not be sent). A reopen or a table error
        always comes with the request that met it, so counting requests
        (sum(), once per report, not once per request) finds every change."""
        changed = []
        for spec, counters in self.tables.items():
            total = sum(counters.requests)
            if counters.changed or total != counters.reported:
                counters.reported = total
                counters.changed = False
                changed.append((spec, counters))
        return changed

    @staticmethod
    def mark_changed(tables) -> None:
        for _, counters in tables:
            counters.changed = True
