"""Connection hand-off in batches (issue 11, item 5).

The master accepts every connection waiting before it hands any over and
passes a worker's share in one SCM_RIGHTS message; the worker greets each
at once; a worker reports when clients leave, not when they arrive. The
pure decisions (master/policy.plan_hand_over, handoff.report_due) are
tested directly; the rest with a real master, real clients and real
postmap. Connections are made to arrive "at once" by stopping the master
(SIGSTOP, by pid) while they connect: they wait in the listen queue until
it continues. Every wait is bounded; every process is stopped by pid.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from master.policy import (SUCCESSOR_MIN_USE, ServiceState, Settings, plan_hand_over,
                           successor_due)
from master.workerslot import READY, RETIRING, STARTING, WorkerSlot
from proxymap import handoff
from proxymap.client import read_greeting
from tests.instance import gone, lookup_on, needs_postmap, temporary_instance, wait_for


def slot(pid: int, clients: int = 0, handed: int = 0, generation: int = 0,
         state: str = READY) -> WorkerSlot:
    s = WorkerSlot(pid=pid, service="proxymap", generation=generation, state=state)
    s.status = handoff.Status(clients=clients, accepted=handed)
    s.handed = handed
    return s


def shares(plan) -> list[tuple[int, int]]:
    return [(s.pid, n) for s, n in plan]


# -- the batching decision --------------------------------------------------------------

def test_plan_gives_each_connection_to_the_least_loaded_worker():
    a, b = slot(1, clients=5, handed=5), slot(2, clients=1, handed=1)
    # b until it is as loaded as a, then alternately (ties: fewest handed)
    assert shares(plan_hand_over([a, b], 10, 0, 100)) == [(2, 7), (1, 3)]
    assert shares(plan_hand_over([a, b], 1, 0, 100)) == [(2, 1)]


def test_plan_splits_a_share_into_messages_of_at_most_per_message():
    a = slot(1)
    assert shares(plan_hand_over([a], 40, 0, 1000, per_message=16)) == \
        [(1, 16), (1, 16), (1, 8)]
    assert sum(n for _, n in plan_hand_over([a], 40, 0, 1000)) == 40
    assert all(n <= handoff.MAX_FDS for _, n in plan_hand_over([a], 40, 0, 1000))


def test_plan_never_takes_a_worker_past_max_use():
    a, b = slot(1, handed=97), slot(2, handed=0, clients=30)
    plan = plan_hand_over([a, b], 10, 0, 100)
    # a has room for 3 (then it is retired); the other 7 go to b
    assert shares(plan) == [(1, 3), (2, 7)]
    assert plan_hand_over([slot(3, handed=100)], 5, 0, 100) == []


def test_plan_only_uses_ready_workers_and_prefers_the_current_generation():
    old, new = slot(1, generation=0), slot(2, generation=1, clients=9, handed=9)
    starting, retiring = slot(3, state=STARTING), slot(4, state=RETIRING)
    assert shares(plan_hand_over([old, new, starting, retiring], 4, 1, 100)) == [(2, 4)]
    # the current generation used up: the old one takes the rest
    assert shares(plan_hand_over([old, slot(5, generation=1, handed=99)], 3, 1, 100)) == \
        [(5, 1), (1, 2)]
    assert plan_hand_over([starting, retiring], 3, 0, 100) == []


def service_with(slots, max_use: int, maxproc: int = 0) -> ServiceState:
    state = ServiceState(None, Settings(max_use, 100, 18000, 60, maxproc, 32), "", 0)
    state.slots = slots
    return state


def test_a_successor_is_started_before_the_last_worker_is_used_up():
    max_use = 100
    assert not successor_due(service_with([slot(1, handed=74)], max_use), 0.0)
    assert successor_due(service_with([slot(1, handed=75)], max_use), 0.0)
    # room left on another current worker counts; a starting one means "done"
    assert not successor_due(service_with([slot(1, handed=90), slot(2, handed=50)],
                                          max_use), 0.0)
    assert not successor_due(service_with([slot(1, handed=90), slot(2, state=STARTING)],
                                          max_use), 0.0)
    # none with a short max_use, none at the process limit (proxywrite)
    assert not successor_due(service_with([slot(1, handed=SUCCESSOR_MIN_USE - 1)],
                                          SUCCESSOR_MIN_USE - 1), 0.0)
    assert not successor_due(service_with([slot(1, handed=99)], max_use, maxproc=1), 0.0)
    throttled = service_with([slot(1, handed=99)], max_use)
    throttled.throttled_until = 10.0
    assert not successor_due(throttled, 5.0) and successor_due(throttled, 11.0)


def test_ties_go_to_the_worker_nearer_its_end_so_a_successor_waits():
    old, successor = slot(1, handed=80), slot(2, handed=0)
    assert shares(plan_hand_over([successor, old], 1, 0, 100)) == [(1, 1)]
    assert shares(plan_hand_over([successor, old], 3, 0, 100)) == [(1, 2), (2, 1)]
    nearly = slot(4, clients=1, handed=99)
    assert shares(plan_hand_over([successor, nearly], 3, 0, 100)) == [(2, 2), (4, 1)]
    busy = slot(3, clients=4, handed=80)
    assert shares(plan_hand_over([busy, successor], 2, 0, 100)) == [(2, 2)]


def test_handed_counts_every_connection_and_every_message():
    s = slot(1)
    s.on_handed(1.0, 5)
    s.on_handed(2.0, 1)
    assert (s.handed, s.handoffs, s.in_transit) == (6, 2, 6)
    snap = s.snapshot()
    assert (snap["handed"], snap["handoffs"]) == (6, 2)


def test_reports_are_due_after_a_batch_of_arrivals_or_departures():
    assert handoff.report_batch(32) == 4            # the default busy threshold
    assert handoff.report_batch(4) == handoff.report_batch(1) == 1
    batch = 4
    assert not handoff.report_due(0, 0, batch, 10.0, 9.9)
    assert not handoff.report_due(3, 3, batch, 10.0, 9.9)
    assert handoff.report_due(4, 0, batch, 10.0, 9.9)
    assert handoff.report_due(0, 4, batch, 10.0, 9.9)
    assert handoff.report_due(1, 0, 1, 10.0, 9.9)   # a low threshold: every change
    assert handoff.report_due(0, 0, batch, 10.0, 10.0 - handoff.REPORT_INTERVAL)


# -- the record -------------------------------------------------------------------------

def test_several_clients_travel_in_one_record():
    master_end, worker_end = handoff.channel_pair()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        handoff.send_clients(master_end, [a.fileno() for a, _ in pairs])
        worker_end.setblocking(False)
        records, eof = handoff.read_messages(worker_end)
        assert not eof and len(records) == 1
        data, fds = records[0]
        assert data[:1] == handoff.CLIENT and handoff.clients_in_record(data) == 3
        assert len(fds) == 3
        for fd, (_, b) in zip(fds, pairs):            # in order, each usable
            with socket.socket(fileno=fd) as passed:
                assert not os.get_inheritable(fd)
                passed.sendall(b"hi")
                assert b.recv(2) == b"hi"
        with pytest.raises(ValueError):
            handoff.send_clients(master_end, [])
        with pytest.raises(ValueError):
            handoff.send_clients(master_end, [pairs[0][0].fileno()] * (handoff.MAX_FDS + 1))
    finally:
        master_end.close()
        worker_end.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_read_messages_stops_after_max_records():
    master_end, worker_end = handoff.channel_pair()
    try:
        for command in (handoff.PING, handoff.RETIRE):
            handoff.send_command(master_end, command)
        worker_end.setblocking(False)
        assert handoff.read_messages(worker_end, max_records=1) == ([(b"P", [])], False)
        assert handoff.read_messages(worker_end, max_records=1) == ([(b"R", [])], False)
        assert handoff.read_messages(worker_end) == ([], False)
    finally:
        master_end.close()
        worker_end.close()


class FakeMetrics:
    def take_changed(self):
        return []

    def mark_changed(self, tables):
        pass


class FakeWorker:
    """What WorkerChannel needs of a Worker: a record of add_client calls."""

    def __init__(self):
        self.added: list[socket.socket] = []
        self.accepted = self.refused = self.requests = 0
        self.on_change = self.on_tick = None
        self.dispatcher = type("D", (), {"metrics": FakeMetrics(), "cache_stats": None})()

    @property
    def clients(self):
        return len(self.added)

    def active_clients(self):
        return 0

    def add_client(self, sock):
        self.accepted += 1
        self.added.append(sock)

    def watch(self, *_):
        pass

    def unwatch(self, *_):
        pass

    def shutdown(self):
        pass


def test_worker_serves_the_clients_that_arrived_and_counts_the_lost():
    """A batch whose descriptors did not all arrive (the worker's descriptor
    limit): the ones that came are served, the others are counted as taken
    and refused, so the master's count of connections in transit is right."""
    master_end, worker_end = handoff.channel_pair()
    worker = FakeWorker()
    channel = handoff.WorkerChannel(worker, os.dup(worker_end.fileno()))
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        channel._take_clients(3, [os.dup(a.fileno()) for a, _ in pairs])
        assert len(worker.added) == 2 and worker.accepted == 3 and worker.refused == 1
        records, _ = handoff.read_messages(master_end, handoff.MAX_REPORT_RECORD)
        assert handoff.decode_status(records[-1][0]).accepted == 3
        for sock, (_, b) in zip(worker.added, pairs):
            sock.sendall(b"x")
            assert b.recv(1) == b"x"
    finally:
        for sock in worker.added:
            sock.close()
        channel.chan.close()
        master_end.close()
        worker_end.close()
        for a, b in pairs:
            a.close()
            b.close()


# -- with a real master -------------------------------------------------------------------

def connect_while_stopped(inst, count: int) -> list[socket.socket]:
    """`count` connections made while the master is stopped: they are all in
    the listen queue when it continues, so one pass accepts them all."""
    master = inst.master_pid()
    os.kill(master, signal.SIGSTOP)
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(inst.socket_path())
            socks.append(sock)
    finally:
        os.kill(master, signal.SIGCONT)
    return socks


@needs_postmap
def test_many_connections_at_once_are_all_greeted_and_answered(tmp_path):
    count = 40
    # one worker for all of them (busy threshold above the burst)
    with temporary_instance(tmp_path, main_extra={"proxymap_worker_busy_clients": "100",
                                                  "max_use": "1000"}) as inst:
        inst.run_foreground()
        socks = connect_while_stopped(inst, count)
        try:
            for sock in socks:
                assert read_greeting(sock)
            for i, sock in enumerate(socks):
                reply = lookup_on(sock, inst.read_table, b"alice")
                assert reply == [(b"status", b"0"), (b"value", b"alice@example.org")], i
            workers = inst.workers("proxymap")
            wait_for(lambda: sum(w["handed"] for w in inst.workers("proxymap")) >= count, 10,
                     what="the master's count of handed connections")
            workers = inst.workers("proxymap")
            handed = sum(w["handed"] for w in workers)
            messages = sum(w["handoffs"] for w in workers)
            # accepted together, passed in messages of up to MAX_FDS (the
            # readiness probes of run_foreground came one by one before)
            assert messages <= handed - count + -(-count // handoff.MAX_FDS) + len(workers)
            assert messages < handed // 4
        finally:
            for sock in socks:
                sock.close()
        assert inst.lookup("alice") == "alice@example.org"      # real postmap


@needs_postmap
def test_a_batch_on_a_worker_killed_before_greeting_is_closed_and_the_master_recovers(
        tmp_path):
    count = 12
    with temporary_instance(tmp_path, main_extra={"proxymap_worker_busy_clients": "100"}) \
            as inst:
        inst.run_foreground()
        (victim,) = [w["pid"] for w in inst.workers("proxymap")]
        before = next(w["handed"] for w in inst.workers("proxymap"))
        os.kill(victim, signal.SIGSTOP)
        socks = []
        try:
            socks = connect_while_stopped(inst, count)
            # the master has passed them all to the stopped worker
            wait_for(lambda: [w for w in inst.workers("proxymap")
                              if w["pid"] == victim and w["handed"] >= before + count],
                     10, what="the batch to be handed to the stopped worker")
            os.kill(victim, signal.SIGKILL)
            for sock in socks:
                try:
                    assert sock.recv(64) == b""           # closed, not left hanging
                except ConnectionResetError:
                    pass
            wait_for(lambda: gone(victim), 10, what="the killed worker to be reaped")
            wait_for(lambda: [w for w in inst.workers("proxymap", "ready")
                              if w["pid"] != victim], 20, what="a replacement worker")
            assert inst.lookup("alice") == "alice@example.org"
            assert f"pid {victim} killed by signal 9" in inst.log()
        finally:
            for sock in socks:
                sock.close()
            if not gone(victim):
                os.kill(victim, signal.SIGKILL)


@needs_postmap
def test_max_use_counts_each_connection_of_a_batch(tmp_path):
    """12 connections at once with max_use 5: no worker is handed more than
    5, the extra ones wait for fresh workers, and every client is served."""
    count, max_use = 12, 5
    with temporary_instance(tmp_path, main_extra={"proxymap_worker_busy_clients": "100",
                                                  "max_use": str(max_use)}) as inst:
        inst.run_foreground()
        socks = connect_while_stopped(inst, count)
        try:
            for i, sock in enumerate(socks):
                assert read_greeting(sock)
                reply = lookup_on(sock, inst.read_table, b"alice")
                assert reply == [(b"status", b"0"), (b"value", b"alice@example.org")], i
            workers = inst.workers("proxymap")
            assert workers and all(w["handed"] <= max_use for w in workers)
        finally:
            for sock in socks:
                sock.close()
        assert inst.lookup("alice") == "alice@example.org"
