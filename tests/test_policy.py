"""The master's decisions (master/policy.py) without processes: a fake
WorkerControl records what the policy asks for, WorkerSlots are set up in
the state each rule is about, and the time is passed in."""

from __future__ import annotations

import pytest

from master import policy
from master.master_cf import Service
from master.policy import (RETIRE_GRACE, STARTUP_TIMEOUT, STOP_GRACE, ServiceState,
                           Settings, manage_workers, needs_another_worker,
                           no_room_for_new_generation, used_up, watch_for_first_client)
from master.workerslot import READY, RETIRING, STARTING, WorkerSlot
from proxymap import handoff
from proxymap.handoff import Status

NOW = 1000.0


class FakeControl:
    """WorkerControl that only records; spawn() adds a STARTING slot."""

    def __init__(self, state: ServiceState | None = None, can_fork: bool = True):
        self.calls: list[tuple] = []
        self.state = state
        self.can_fork = can_fork
        self.next_pid = 900

    def spawn(self, state):
        self.calls.append(("spawn", state.name))
        if not self.can_fork:
            return None
        self.next_pid += 1
        slot = WorkerSlot(self.next_pid, state.name, state.generation, started=NOW,
                          last_heard=NOW, idle_since=NOW)
        state.slots.append(slot)
        return slot

    def kill(self, slot, signum=9):
        slot.kill()
        self.calls.append(("kill", slot.pid))

    def send(self, slot, command):
        self.calls.append(("send", slot.pid, command))

    def retire(self, slot, now, why):
        slot.retire(now)
        self.calls.append(("retire", slot.pid, why))


def settings(**changes) -> Settings:
    values = dict(max_use=100, max_idle=100, daemon_timeout=30, throttle_time=60, maxproc=4,
                  busy_clients=2)
    values.update(changes)
    return Settings(**values)


def service_state(generation: int = 1, **changes) -> ServiceState:
    service = Service(name="proxymap", type="unix", private=True, unpriv=True, chroot=False,
                      wakeup=0, maxproc=4, command="proxymap", args=[], overrides={},
                      filename="master.cf", line=1)
    return ServiceState(service, settings(**changes), "/q/private/proxymap", generation)


def slot(state: ServiceState, pid: int, status: str = READY, generation: int | None = None,
         clients: int = 0, busy: int = 0, heard: float = NOW, idle_since: float | None = NOW,
         started: float = NOW - 1, retired_at: float | None = None) -> WorkerSlot:
    s = WorkerSlot(pid, state.name, state.generation if generation is None else generation,
                   state=status, status=Status(busy=busy, clients=clients, accepted=clients),
                   handed=clients, started=started, last_heard=heard,
                   idle_since=idle_since if not clients else None, retired_at=retired_at)
    s.reported = status != STARTING
    state.slots.append(s)
    return s


def test_a_worker_silent_since_start_is_killed():
    state = service_state()
    slot(state, 1, STARTING, started=NOW - STARTUP_TIMEOUT - 1)
    slot(state, 2, READY)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [("kill", 1)]


def test_a_busy_silent_worker_is_pinged_once_then_killed_after_daemon_timeout():
    state = service_state(daemon_timeout=30)
    busy = slot(state, 1, clients=3, heard=NOW - 10)        # ping every 10 s
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [("send", 1, handoff.PING)]
    assert busy.pings == 1 and busy.ping_sent == NOW
    manage_workers(state, NOW + 5, control)                 # no second ping
    assert control.calls == [("send", 1, handoff.PING)]
    manage_workers(state, NOW + 21, control)               # 31 s without a report
    assert control.calls[1:] == [("kill", 1), ("spawn", "proxymap")]   # and a replacement


def test_an_idle_worker_is_never_pinged():
    state = service_state()
    slot(state, 1, heard=NOW - 1000)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == []


def answer_pings(control: FakeControl, worker: WorkerSlot, now: float) -> None:
    """The worker is alive: a ping sent to it is answered by a report."""
    if ("send", worker.pid, handoff.PING) in control.calls and worker.ping_sent is not None:
        worker.on_status(worker.status, now)


def test_a_retired_worker_with_a_client_is_never_stopped_for_its_age():
    """max_use (or a reload where a current worker runs beside it): the
    retiring worker keeps its client as long as the client stays, hours
    past the old grace, as Postfix's multi-server does."""
    state = service_state(daemon_timeout=30)
    slot(state, 1, READY)
    old = slot(state, 2, RETIRING, clients=1, retired_at=NOW)
    control = FakeControl()
    for t in range(0, 4 * 3600, 7):
        manage_workers(state, NOW + t, control)
        answer_pings(control, old, NOW + t)
    assert old.state == RETIRING and not old.stop_sent
    assert ("send", 2, handoff.STOP) not in control.calls
    assert ("kill", 2) not in control.calls
    assert control.calls.count(("send", 2, handoff.PING)) > 100     # its liveness is checked


def test_a_retired_worker_that_stops_reporting_is_killed_after_daemon_timeout():
    state = service_state(daemon_timeout=30)
    slot(state, 1, READY)
    slot(state, 2, RETIRING, clients=1, retired_at=NOW, heard=NOW)
    control = FakeControl()
    manage_workers(state, NOW + 29, control)
    assert ("kill", 2) not in control.calls
    manage_workers(state, NOW + 31, control)
    assert ("kill", 2) in control.calls


def test_a_retired_worker_without_clients_is_stopped_after_the_grace():
    """Its retire command was lost (a full channel): told to stop, then
    killed if it still does not go."""
    state = service_state(daemon_timeout=30)
    slot(state, 1, READY)
    old = slot(state, 2, RETIRING, retired_at=NOW)
    control = FakeControl()
    manage_workers(state, NOW + RETIRE_GRACE - 0.5, control)
    assert ("send", 2, handoff.STOP) not in control.calls
    manage_workers(state, NOW + RETIRE_GRACE + 0.5, control)
    assert control.calls.count(("send", 2, handoff.STOP)) == 1 and old.stop_sent
    manage_workers(state, NOW + RETIRE_GRACE + 30 + STOP_GRACE + 1, control)
    assert control.calls[-1] == ("kill", 2)


@pytest.mark.parametrize("how", ["reloaded at the process limit", "service removed"])
def test_an_old_worker_holding_the_service_back_gets_stop_after_the_grace(how):
    state = service_state(generation=2, daemon_timeout=30, maxproc=1)
    old = slot(state, 2, RETIRING, generation=1, clients=1, retired_at=NOW)
    if how == "service removed":
        state.generation = 1
        state.removed = True
    assert policy.holds_back(state, old)
    control = FakeControl()
    manage_workers(state, NOW + RETIRE_GRACE - 0.5, control)
    assert ("send", 2, handoff.STOP) not in control.calls
    old.on_status(Status(clients=1, accepted=1), NOW + RETIRE_GRACE)   # still reporting
    manage_workers(state, NOW + RETIRE_GRACE + 0.5, control)
    assert control.calls.count(("send", 2, handoff.STOP)) == 1 and old.stop_sent
    old.on_status(Status(clients=1, accepted=1), NOW + RETIRE_GRACE + 30)
    manage_workers(state, NOW + RETIRE_GRACE + 30 + STOP_GRACE + 1, control)
    assert control.calls[-1] == ("kill", 2)


def test_an_old_worker_beside_a_current_one_does_not_hold_the_service_back():
    state = service_state(generation=2, maxproc=4)
    slot(state, 1, READY)
    old = slot(state, 2, RETIRING, generation=1, clients=1, retired_at=NOW)
    assert not policy.holds_back(state, old)
    state.settings.maxproc = 2          # at the limit, but a current worker runs
    assert not policy.holds_back(state, old)


def test_a_used_up_worker_at_the_process_limit_serves_on_until_it_has_no_client():
    """proxywrite (one process): as Postfix's multi-server past its use
    limit, the worker keeps taking connections while it has clients, and
    is retired at its first moment without one; with room for a
    successor it is retired at once."""
    state = service_state(max_use=3, maxproc=1)
    writer = slot(state, 1, READY, clients=2)
    writer.handed = 3
    writer.status = Status(clients=2, accepted=3)
    assert used_up(writer, state.settings)
    assert policy.use_limit(state) is None
    assert policy.plan_hand_over(state.slots, 2, state.generation,
                                 policy.use_limit(state)) == [(writer, 2)]
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert writer.state == READY and control.calls == []
    writer.status = Status(clients=0, accepted=3)
    writer.handed = 4                       # one more still on its way
    manage_workers(state, NOW + 1, control)
    assert writer.state == READY
    writer.status = Status(clients=0, accepted=4)
    manage_workers(state, NOW + 2, control)
    assert control.calls == [("retire", 1, "max_use reached")]
    # with room for a successor, retired at once however many clients it has
    state = service_state(max_use=3, maxproc=4)
    reader = slot(state, 1, READY, clients=3)
    assert policy.use_limit(state) == 3 and policy.retire_used_up(state, reader)


def test_old_generation_is_retired_only_once_a_current_worker_is_ready():
    state = service_state(generation=2)
    slot(state, 1, READY, generation=1)
    new = slot(state, 2, STARTING, generation=2)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == []
    new.on_status(Status(), NOW)
    manage_workers(state, NOW, control)
    assert control.calls == [("retire", 1, "configuration reloaded")]


def test_idle_extras_retire_after_max_idle_but_the_minimum_stays():
    state = service_state(max_idle=100)
    for pid in (1, 2, 3):
        slot(state, pid, READY, idle_since=NOW - 101)
    control = FakeControl()
    manage_workers(state, NOW, control)
    retired = [c for c in control.calls if c[0] == "retire"]
    assert retired == [("retire", 1, "max_idle reached"), ("retire", 2, "max_idle reached")]
    assert len([s for s in state.slots if s.state == READY]) == 1      # the minimum


def test_minimum_workers_started_unless_throttled_removed_or_at_maxproc():
    state = service_state()
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [("spawn", "proxymap")]                   # the minimum, 1

    for blocked in ("throttled", "removed", "maxproc"):
        state = service_state(maxproc=1)
        if blocked == "throttled":
            state.throttle(NOW - 1)
        elif blocked == "removed":
            state.removed = True
        else:
            slot(state, 5, RETIRING, retired_at=NOW)   # the one allowed process is leaving
        control = FakeControl()
        manage_workers(state, NOW, control)
        assert ("spawn", "proxymap") not in control.calls, blocked


def test_a_failed_start_is_not_retried_in_the_same_pass():
    state = service_state()
    control = FakeControl(can_fork=False)
    manage_workers(state, NOW, control)
    assert control.calls == [("spawn", "proxymap")]


@pytest.mark.parametrize("busy, starting, maxproc, wanted", [
    ((2, 2), False, 4, True),      # every worker busy: one more
    ((2, 1), False, 4, False),     # one below busy_clients can take it
    ((2, 2), True, 4, False),      # one is still starting
    ((2, 2), False, 2, False),     # at maxproc
    ((2, 2), False, 0, True),      # maxproc 0: unlimited
])
def test_needs_another_worker(busy, starting, maxproc, wanted):
    state = service_state(maxproc=maxproc, busy_clients=2)
    for pid, active in enumerate(busy, 1):
        slot(state, pid, READY, clients=active, busy=active)
    if starting:
        slot(state, 9, STARTING)
        state.settings.maxproc = maxproc and maxproc + 1
    assert needs_another_worker(state, NOW) is wanted


def test_needs_another_worker_waits_out_a_throttle():
    state = service_state()
    slot(state, 1, READY, clients=2, busy=2)
    state.throttle(NOW)
    assert not needs_another_worker(state, NOW + 59)
    assert needs_another_worker(state, NOW + 61)


def test_max_use_and_the_single_writer_at_reload():
    state = service_state(max_use=3, maxproc=1)
    s = slot(state, 1, READY)
    s.handed = 2
    assert not used_up(s, state.settings)
    s.handed = 3
    assert used_up(s, state.settings)
    assert no_room_for_new_generation(state)
    state.settings.maxproc = 2
    assert not no_room_for_new_generation(state)


def test_the_real_master_is_a_worker_control():
    from master.supervisor import Master
    for name in ("spawn", "kill", "send", "retire"):
        assert callable(getattr(Master, name)), name
    assert policy.WorkerControl.__doc__


def test_a_reload_ignores_a_new_queue_directory(tmp_path):
    from proxymap.conventions.main_cf import load_main_cf
    (tmp_path / "main.cf").write_text("queue_directory = /q/one\nmail_owner = a\n")
    at_start = policy.fixed_values(load_main_cf(str(tmp_path), warn=lambda m: None))
    assert at_start == {"queue_directory": "/q/one"}
    (tmp_path / "main.cf").write_text("queue_directory = /q/two\nmail_owner = b\n")
    reloaded = load_main_cf(str(tmp_path), warn=lambda m: None)
    assert policy.ignored_changes(at_start, reloaded) == [
        "ignoring queue_directory parameter value change",
        'old value: "/q/one", new value: "/q/two"',
        "to change queue_directory, stop and start the proxymap master"]
    (tmp_path / "main.cf").write_text("queue_directory = /q/one\nmail_owner = b\n")
    assert policy.ignored_changes(at_start, load_main_cf(str(tmp_path), warn=lambda m: None)) == []


# -- services started on demand (min_workers 0: proxywrite by default) ------------------

def test_a_service_started_on_demand_gets_no_worker_until_a_client_comes():
    state = service_state(min_workers=0)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [] and state.slots == []
    assert watch_for_first_client(state, NOW)           # the master watches the socket
    assert needs_another_worker(state, NOW)             # and a client makes it fork
    control.spawn(state)
    assert not watch_for_first_client(state, NOW)       # that one is starting: wait for it
    assert not needs_another_worker(state, NOW)


def test_a_read_service_with_a_minimum_is_not_watched_for_a_first_client():
    state = service_state(min_workers=2)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [("spawn", "proxymap")] * 2
    for s in state.slots:
        s.on_status(Status(), NOW)
    assert not watch_for_first_client(state, NOW)


def test_the_last_idle_worker_of_an_on_demand_service_leaves_after_max_idle():
    state = service_state(min_workers=0, max_idle=10)
    only = slot(state, 1, READY, idle_since=NOW - 5)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == []                          # idle 5 s of 10
    manage_workers(state, NOW + 6, control)
    assert control.calls == [("retire", 1, "max_idle reached")]   # and no replacement
    assert only.state == RETIRING
    # a client arriving while it leaves starts a new one (under maxproc:
    # a retiring worker takes no new client)
    assert watch_for_first_client(state, NOW + 6)
    state.slots.remove(only)                            # it exited
    manage_workers(state, NOW + 7, control)
    assert control.calls == [("retire", 1, "max_idle reached")]   # back to "no worker"
    assert watch_for_first_client(state, NOW + 7)


def test_a_busy_worker_of_an_on_demand_service_is_not_retired_for_idleness():
    state = service_state(min_workers=0, max_idle=10)
    slot(state, 1, READY, clients=1, heard=NOW + 99)       # and reporting
    control = FakeControl()
    manage_workers(state, NOW + 100, control)
    assert control.calls == []


def test_a_failed_on_demand_start_throttles_the_socket_watch():
    state = service_state(min_workers=0, throttle_time=60)
    state.throttle(NOW)                                 # the worker died before its report
    assert not watch_for_first_client(state, NOW + 1)   # clients wait in the backlog
    assert not needs_another_worker(state, NOW + 1)     # no fork per connection
    control = FakeControl()
    manage_workers(state, NOW + 1, control)
    assert control.calls == []
    assert watch_for_first_client(state, NOW + 61)      # throttle over: the next client forks


def test_on_demand_watch_stops_at_maxproc_and_for_a_removed_service():
    state = service_state(min_workers=0, maxproc=1)
    slot(state, 1, RETIRING, retired_at=NOW)            # the single writer, leaving
    assert not watch_for_first_client(state, NOW)
    state = service_state(min_workers=0)
    state.removed = True
    assert not watch_for_first_client(state, NOW)


def test_an_on_demand_service_retires_its_old_generation_without_a_successor():
    state = service_state(generation=2, min_workers=0)
    slot(state, 1, READY, generation=1)
    control = FakeControl()
    manage_workers(state, NOW, control)
    assert control.calls == [("retire", 1, "configuration reloaded")]
    assert watch_for_first_client(state, NOW)           # the next client starts generation 2
