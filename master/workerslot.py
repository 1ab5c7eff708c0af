"""One worker process as the master sees it: an explicit state machine.

Postfix's master keeps per child only {pid, generation, available,
use_count}. Our pre-forking master needs a little more (load reports,
hand-off counts, liveness), so each worker is a `WorkerSlot` whose state
moves only forward:

    STARTING --first status--> READY --retire()--> RETIRING --exit--> EXITED
        \\______________________ kill() ___________> KILLED ---exit--> EXITED

Only READY workers receive connections. The pure bookkeeping lives here;
the decisions are master/policy.py's; forking, signalling and I/O are
done by master/supervisor.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxymap.handoff import Status

STARTING, READY, RETIRING, KILLED, EXITED = "starting", "ready", "retiring", "killed", "exited"
ALIVE_STATES = (STARTING, READY, RETIRING, KILLED)


@dataclass
class WorkerSlot:
    pid: int
    service: str
    generation: int          # configuration generation (0 at start, +1 per reload)
    chan: object = None      # the master end of the control channel
    state: str = STARTING
    status: Status = field(default_factory=Status)
    handed: int = 0          # connections passed to this worker
    handoffs: int = 0        # messages they went in (several connections to one)
    started: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    retired_at: float | None = None
    stop_sent: bool = False
    ping_sent: float | None = None
    pings: int = 0           # pings sent (liveness checks while busy)
    exit_status: int | None = None
    reported: bool = False   # sent at least one status: start-up succeeded
    #: the worker's request counters by table, as last reported
    #: (proxymap.metrics.TableCounters)
    tables: dict = field(default_factory=dict)

    # -- load ------------------------------------------------------------------

    @property
    def in_transit(self) -> int:
        """Connections handed over that the worker has not reported yet."""
        return max(0, self.handed - self.status.accepted)

    @property
    def load(self) -> int:
        """Open connections, counting those still on their way."""
        return self.status.clients + self.in_transit

    @property
    def active_load(self) -> int:
        """Active connections (see proxymap.server.Worker.active_clients),
        counting those still on their way: what decides whether another
        worker is needed."""
        return self.status.busy + self.in_transit

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def has_work(self) -> bool:
        return self.load > 0

    # -- transitions -------------------------------------------------------------

    def on_status(self, status: Status, now: float) -> None:
        """A load report arrived: the worker is alive and making progress."""
        self.status = status
        self.last_heard = now
        self.ping_sent = None
        self.reported = True
        if self.state == STARTING:
            self.state = READY
        if self.load == 0:
            if self.idle_since is None:
                self.idle_since = now
        else:
            self.idle_since = None

    def on_handed(self, now: float, count: int = 1) -> None:
        """`count` connections went to this worker in one message."""
        self.handed += count
        self.handoffs += 1
        self.idle_since = None
        if self.status.clients == 0 and self.in_transit == count:
            # the first connection after an idle spell: progress is expected
            # from now on, not from the last (idle) report
            self.last_heard = now

    def retire(self, now: float) -> bool:
        """READY/STARTING -> RETIRING; False when already on its way out."""
        if self.state in (STARTING, READY):
            self.state = RETIRING
            self.retired_at = now
            return True
        return False

    def on_ping(self, now: float) -> None:
        """A ping went out: no other until the worker reports."""
        self.ping_sent = now
        self.pings += 1

    def on_stop(self) -> None:
        """STOP went out (or need not: the channel is gone)."""
        self.stop_sent = True

    def on_channel_lost(self, now: float) -> None:
        """The control channel closed: the worker is on its way out."""
        self.retire(now)
        self.stop_sent = True

    def kill(self) -> None:
        if self.alive:
            self.state = KILLED

    def on_exit(self, status: int) -> None:
        self.state = EXITED
        self.exit_status = status

    # -- questions the supervisor asks ------------------------------------------------

    def idle_for(self, now: float) -> float:
        return 0.0 if self.idle_since is None or self.load else now - self.idle_since

    def silent_for(self, now: float) -> float:
        """Seconds without a report while the worker had work to do."""
        return now - self.last_heard if self.has_work else 0.0

    def snapshot(self) -> dict:
        return {"pid": self.pid, "service": self.service, "generation": self.generation,
                "state": self.state, "clients": self.status.clients,
                "busy": self.status.busy, "requests": self.status.requests,
                "accepted": self.status.accepted, "handed": self.handed,
                "handoffs": self.handoffs,
                "pings": self.pings, "cache_hits": self.status.cache_hits,
                "cache_misses": self.status.cache_misses,
                "cache_invalidations": self.status.cache_invalidations}


def pick_worker(slots, generation: int | None = None):
    """The least-loaded READY slot, preferring `generation`; None if none is
    READY. Ties go to the worker that was handed the most connections in
    total: it is used up first, while a successor started ahead of its
    retirement (policy.successor_due) waits, and an idle extra worker stays
    idle until max_idle retires it."""
    ready = [s for s in slots if s.state == READY]
    if generation is not None:
        current = [s for s in ready if s.generation == generation]
        ready = current or ready
    if not ready:
        return None
    return min(ready, key=lambda s: (s.load, -s.handed))
