"""What the master decides about its workers, kept apart from doing it.

Postfix's master decides in master_spawn.c and master_avail.c when a
service gets another process and when one is thrown away; ours decides
the same things for its workers: which worker gets a connection
(workerslot.pick_worker), when another worker is started (all current
ones busy, fewer than the service's minimum, not throttled, under
maxproc), when the master itself watches a service's socket so that a
connection starts its first worker (watch_for_first_client: Postfix's
master forks a service's process only once a client waits and none is
free, and throttles a service whose process died at start-up; we do that
for a service whose minimum is 0, proxywrite by default), when one is
pinged (busy and silent), stopped (an old one that keeps a new one from
starting, for longer than the grace), killed (no first report, no
progress for daemon_timeout) or retired (max_use, max_idle down to the
minimum, an older configuration), and which changed parameters a reload
ignores.

A retired worker is never stopped or killed for taking its time: as
Postfix's multi-server (src/master/multi_server.c, whose loop runs while
clients are connected even past its use limit) it serves the connections
it has until their clients close them, and exits when none is left; only
a hung worker (daemon_timeout) is killed. Two Postfix rules follow from
that loop. A worker that has used up max_use while its service is at its
process limit (proxywrite: one process) keeps taking connections until it
has none, then is retired; otherwise the service could not serve anyone
until the old worker's clients leave. And where an old worker does keep
the new generation from starting (a reload of a service at its process
limit, or a removed service), it is told to stop after RETIRE_GRACE, as
Postfix's reload and service removal end the old processes at once.

The decisions are plain functions of a `ServiceState` and its
`WorkerSlot`s and the time. They act only through `WorkerControl`, the
small interface the real master (master/supervisor.py) implements with
fork, kill and the control channel, and tests/test_policy.py fakes: the
policy is tested without processes.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Protocol

from master.master_cf import Service
from master.workerslot import READY, RETIRING, STARTING, WorkerSlot
from proxymap import handoff, metrics
from proxymap.conventions import maillog
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.parameters import PARAMETERS

#: seconds an old worker that keeps the new configuration's worker from
#: starting (a service at its process limit, reloaded) or whose service
#: was removed may wait for its clients to leave before it is told to stop
RETIRE_GRACE = 5.0
#: seconds a stopping master waits for workers before SIGKILL
STOP_GRACE = 5.0
#: seconds a new worker may take to send its first report
STARTUP_TIMEOUT = 60.0
#: below this max_use no successor is started ahead (successor_due)
SUCCESSOR_MIN_USE = 20


@dataclass
class Settings:
    """The per-service limits, after the service's -o overrides."""
    max_use: int
    max_idle: int
    daemon_timeout: int
    throttle_time: int
    maxproc: int
    #: a worker with this many active connections (a request in the last
    #: second; idle ones cost little and are not counted) counts as busy:
    #: when every worker of a service is busy the master starts another (up
    #: to maxproc).
    #: One event loop serves many clients; a worker per core or so is what
    #: helps throughput, a worker per handful of clients only costs memory.
    busy_clients: int
    #: workers kept even when idle (proxymap_read_min_workers,
    #: proxymap_write_min_workers); 0: the first worker starts when a
    #: client connects and the last one leaves after max_idle
    min_workers: int = 1


class ServiceState:
    """One listening socket and its workers."""

    def __init__(self, service: Service, settings: Settings, path: str, generation: int):
        self.service = service
        self.settings = settings
        self.path = path
        self.generation = generation
        self.listener: socket.socket | None = None
        self.listening = False
        self.slots: list[WorkerSlot] = []
        #: accepted connections (descriptors) waiting for a worker
        self.pending: deque[int] = deque()
        self.throttled_until = 0.0
        self.removed = False
        #: (st_dev, st_ino) of the socket file we bound
        self.inode: tuple[int, int] | None = None
        self.taken_over = False
        #: request counters of the workers that have exited, by table
        self.exited_tables: dict[str, metrics.TableCounters] = {}
        #: connections handed to its workers since the master started
        self.handed = 0

    def tables(self) -> dict[str, metrics.TableCounters]:
        """Request counters by table: exited workers' and live ones' totals."""
        return metrics.sum_tables(self.exited_tables, *(s.tables for s in self.slots))

    @property
    def name(self) -> str:
        return self.service.name

    def alive(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.alive]

    def current(self) -> list[WorkerSlot]:
        """Workers of the current generation that are not on their way out."""
        return [s for s in self.slots
                if s.generation == self.generation and s.state in (STARTING, READY)]

    def under_limit(self) -> bool:
        limit = self.settings.maxproc
        return limit == 0 or len(self.alive()) < limit

    def throttled(self, now: float) -> bool:
        return now < self.throttled_until

    def throttle(self, now: float) -> None:
        """No new worker for service_throttle_time (a fork failed, a worker
        died before its first report)."""
        self.throttled_until = now + self.settings.throttle_time


class WorkerControl(Protocol):
    """The effects the policy asks for."""

    def spawn(self, state: ServiceState) -> WorkerSlot | None:
        """Start a worker of the service (None: it could not be started)."""

    def kill(self, slot: WorkerSlot, signum: int = ...) -> None:
        """Signal the worker (SIGKILL unless told otherwise)."""

    def send(self, slot: WorkerSlot, command: bytes) -> None:
        """Send a control-channel command (handoff.PING, STOP, ...)."""

    def retire(self, slot: WorkerSlot, now: float, why: str) -> None:
        """Let the worker finish its clients and exit."""


def used_up(slot: WorkerSlot, settings: Settings) -> bool:
    """max_use: the worker was handed as many connections as it may serve."""
    return slot.handed >= settings.max_use


def use_limit(state: ServiceState) -> int | None:
    """The max_use to share connections out by (plan_hand_over): none
    while the service is at its process limit, where no successor could
    start: there, as in Postfix's multi-server, a worker past its use
    limit keeps taking clients until it has none left."""
    return state.settings.max_use if state.under_limit() else None


def retire_used_up(state: ServiceState, slot: WorkerSlot) -> bool:
    """A READY worker that has used up max_use is retired now when a
    successor may start, or once it has no client at all (the master's
    count: reported open plus in transit)."""
    return slot.state == READY and used_up(slot, state.settings) \
        and (state.under_limit() or slot.load == 0)


def holds_back(state: ServiceState, slot: WorkerSlot) -> bool:
    """A retiring worker that must go for the service to go on as
    configured: its service was removed, or it is of an older
    configuration while no worker of the current one can start (the
    process limit is reached). Only such a worker is told to stop after
    RETIRE_GRACE; any other retiring worker serves its clients until they
    leave."""
    if state.removed:
        return True
    return slot.generation != state.generation and not state.current() \
        and not state.under_limit()


def plan_hand_over(slots, count: int, generation: int, max_use: int | None,
                   per_message: int = handoff.MAX_FDS) -> list[tuple[WorkerSlot, int]]:
    """How `count` connections accepted at once are shared out: a list of
    (worker, n) messages with 1 <= n <= per_message, in the order to send.

    Each connection goes where pick_worker() would send it if the ones
    before it had already been handed (the least-loaded READY worker, of
    `generation` while one has room, ties to the most handed in total),
    and no worker is given more than max_use connections in all (it is
    retired after its last one, as when they come one by one; None: no
    limit, see use_limit()). The connections that find no worker are not
    in the plan: they wait."""
    given: dict[int, int] = {}
    slot_of: dict[int, WorkerSlot] = {}
    order: list[int] = []
    for _ in range(count):
        best = None
        best_key = None
        for slot in slots:
            if slot.state != READY:
                continue
            extra = given.get(id(slot), 0)
            if max_use is not None and slot.handed + extra >= max_use:
                continue
            key = (slot.generation != generation, slot.load + extra, -(slot.handed + extra))
            if best_key is None or key < best_key:
                best, best_key = slot, key
        if best is None:
            break
        if id(best) not in given:
            given[id(best)] = 0
            slot_of[id(best)] = best
            order.append(id(best))
        given[id(best)] += 1
    plan = []
    for ident in order:
        left = given[ident]
        while left:
            n = min(left, per_message)
            plan.append((slot_of[ident], n))
            left -= n
    return plan


def successor_margin(max_use: int) -> int:
    """How close to max_use the workers of a service may come before the
    next one is started: a quarter of max_use, none below SUCCESSOR_MIN_USE
    (a worker that short-lived is not worth a spare)."""
    return max_use // 4 if max_use >= SUCCESSOR_MIN_USE else 0


def successor_due(state: ServiceState, now: float) -> bool:
    """The current workers have room for at most successor_margin() more
    connections in all (max_use) and none is starting: start the next one
    now, so that it is ready when the last of them is retired, instead of
    clients waiting for a fresh worker at every retirement."""
    current = state.current()
    if not current or any(s.state == STARTING for s in current):
        return False
    max_use = state.settings.max_use
    margin = successor_margin(max_use)
    room = sum(max(0, max_use - s.handed) for s in current)
    return 0 < margin and room <= margin and state.under_limit() \
        and not state.throttled(now) and not state.removed


def needs_another_worker(state: ServiceState, now: float) -> bool:
    """Every current worker is busy (none is still starting), and the
    service may have one more."""
    current = state.current()
    if any(s.state == STARTING for s in current):
        return False
    if current and min(s.active_load for s in current) < state.settings.busy_clients:
        return False
    return state.under_limit() and not state.throttled(now) and not state.removed


def watch_for_first_client(state: ServiceState, now: float) -> bool:
    """The service has no worker that can take a connection, and a
    connection would start one: the master watches the socket itself,
    accepts the client, and it waits for the fork (needs_another_worker).
    Not while a worker is starting (the client would only wait for that
    one), nor while the service is throttled after a failed start (clients
    wait in the listen backlog until service_throttle_time has passed, as
    with Postfix's master: no fork per connection), nor at maxproc, nor
    for a removed service."""
    return (not state.current() and state.under_limit() and not state.throttled(now)
            and not state.removed)


def no_room_for_new_generation(state: ServiceState) -> bool:
    """After a reload: the service is at maxproc (proxywrite), so its old
    workers must go before a worker of the new configuration can start."""
    maxproc = state.settings.maxproc
    return bool(maxproc) and len(state.alive()) >= maxproc


def fixed_values(main: MainConfig) -> dict[str, str]:
    """The values, at start, of the parameters declared not to change on
    reload (proxymap/conventions/parameters.py: reload=False)."""
    return {p.name: main.get(p.name) for p in PARAMETERS.values() if not p.reload}


def ignored_changes(fixed: Mapping[str, str], main: MainConfig) -> list[str]:
    """Postfix's warning lines for each such parameter whose value a reload
    would change: the running master keeps the value it started with."""
    lines = []
    for name, old in fixed.items():
        new = main.get(name)
        if new != old:
            lines += [f"ignoring {name} parameter value change",
                      f"old value: \"{old}\", new value: \"{new}\"",
                      f"to change {name}, stop and start the proxymap master"]
    return lines


def manage_workers(state: ServiceState, now: float, control: WorkerControl) -> None:
    """One pass over a service's workers: kill the hung, ping the silent,
    stop and kill the old ones that hold the service back and outstay
    (holds_back()), retire the superseded, the used-up (retire_used_up())
    and the idle ones above the minimum, then start workers up to the
    minimum."""
    settings = state.settings
    ping_every = max(0.2, min(settings.daemon_timeout / 3, 60.0))
    current_ready = [s for s in state.current() if s.state == READY]
    for slot in list(state.slots):
        if not slot.alive:
            continue
        if slot.state == STARTING and now - slot.started > STARTUP_TIMEOUT:
            maillog.warning(f"worker pid {slot.pid}: no report {STARTUP_TIMEOUT:g}s "
                            f"after start -- killing it")
            control.kill(slot)
            continue
        if slot.state in (READY, RETIRING) and slot.has_work:
            silent = slot.silent_for(now)
            if silent > settings.daemon_timeout:
                maillog.warning(f"service {state.name}: worker pid {slot.pid} made no "
                                f"progress for {silent:.0f}s (daemon_timeout "
                                f"{settings.daemon_timeout}s) -- killing it")
                control.kill(slot)
                continue
            if silent >= ping_every and slot.ping_sent is None:
                slot.on_ping(now)
                control.send(slot, handoff.PING)
        if slot.state == RETIRING:
            # one with clients is left alone (unless it holds the service
            # back); one without that is still there after the grace missed
            # its retire command (a full channel) and is told again, firmly
            if holds_back(state, slot) or not slot.has_work:
                since = now - (slot.retired_at or now)
                if since > RETIRE_GRACE and not slot.stop_sent:
                    slot.on_stop()
                    control.send(slot, handoff.STOP)
                elif since > RETIRE_GRACE + settings.daemon_timeout + STOP_GRACE:
                    control.kill(slot)
            continue
        if slot.generation != state.generation and (current_ready or not settings.min_workers):
            # a service started on demand does not start a worker of the
            # new configuration just to replace an old one: the next
            # client does
            control.retire(slot, now, "configuration reloaded")
        elif retire_used_up(state, slot):
            control.retire(slot, now, "max_use reached")
            if slot in current_ready:
                current_ready.remove(slot)
        elif (slot.state == READY and slot.generation == state.generation
              and len(current_ready) > settings.min_workers
              and slot.idle_for(now) > settings.max_idle):
            control.retire(slot, now, "max_idle reached")
            current_ready.remove(slot)
    if state.removed or state.throttled(now):
        return
    while len(state.current()) < settings.min_workers and state.under_limit():
        if control.spawn(state) is None:
            break
