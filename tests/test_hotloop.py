"""The worker's loop in both forms: the Python loop of server.Worker.run (the
reference) and the compiled one (proxymap/_hotpath.c: read_pass over the
ready descriptors, answer_pass over the connections read, after the
notification drain). Two workers on the same table file get the same
clients' bytes over real sockets (socketpair) and the same ready lists, one
loop pass at a time, from a fixed-seed workload: every reply byte, the
counters, the cache figures and each connection's state after each pass
must agree. The workload has hot and cold lookups, other spellings,
pipelined and partial requests, bad bytes, the end of input, reset
connections (a read error), clients that stop reading (partial sends, then
EPOLLOUT), ready reports with nothing to read, and table rewrites."""

from __future__ import annotations

import random
import select
import socket

import pytest

from proxymap import dictflags as F
from proxymap.dispatch import Dispatcher
from proxymap.protocol import HOTPATH
from proxymap.server import Connection, Worker
from tests.test_answercache import settle
from tests.test_hotpath import (  # noqa: F401  (fixtures)
    DB_SOURCE, compiled, db_file, db_templates, install_db, make_dispatcher, needs_compiled,
    needs_postmap, request, state, table_file)

CLIENTS = 6
LAZY = (0, 1)           # clients that read their replies only now and then
SEND_BUFFER = 4096      # the workers' side: small, so that replies back up


class OnePass(Exception):
    """Raised by ScriptedPoll at the second poll() of a run(): one pass done."""


class ScriptedPoll:
    """A worker's epoll whose poll() answers the ready list the test chose;
    registrations still go to the real one."""

    def __init__(self, real):
        self.real = real
        self.ready = None

    def poll(self, timeout):
        ready, self.ready = self.ready, None
        if ready is None:
            raise OnePass
        return ready

    def register(self, *args):
        self.real.register(*args)

    def modify(self, *args):
        self.real.modify(*args)

    def unregister(self, fd):
        self.real.unregister(fd)

    def close(self):
        self.real.close()


class Side:
    """One worker with its clients."""

    def __init__(self, dispatcher: Dispatcher, fast: bool):
        if not fast:    # the pure reference, whichever form serves
            dispatcher.hot_reply = Dispatcher.hot_reply.__get__(dispatcher)
        self.dispatcher = dispatcher
        self.worker = Worker(dispatcher)
        self.worker._compiled = compiled if fast else None
        self.poll = self.worker._poll = ScriptedPoll(self.worker._poll)
        self.clients, self.fds, self.got = [], [], []
        self.changes = 0
        self.worker.on_change = self.count_change
        for _ in range(CLIENTS):
            ours, theirs = socket.socketpair()
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            theirs.setblocking(False)
            self.clients.append(theirs)
            self.fds.append(ours.fileno())
            self.got.append(bytearray())
            self.worker.add_client(ours)

    def count_change(self, worker):
        self.changes += 1

    def conn(self, n: int) -> Connection | None:
        return self.worker.conns.get(self.fds[n])

    def one_pass(self, ready) -> None:
        self.poll.ready = [(self.fds[n], events) for n, events in ready]
        with pytest.raises(OnePass):
            self.worker.run()

    def read_replies(self, n: int) -> None:
        while True:
            try:
                data = self.clients[n].recv(65536)
            except BlockingIOError:
                return
            except OSError:     # reset: the worker closed with requests unread
                return
            if not data:
                return
            self.got[n] += data

    def view(self, table: str):
        """Everything the two forms must agree on after a pass."""
        conns = []
        for n in range(CLIENTS):
            c = self.conn(n)
            conns.append(None if c is None else (
                bytes(c.out), c.events, len(c.queue), bytes(c.decoder.buf), c.fresh,
                c.since is None, c.answered_at > 0, c.bad, c.wait_until, len(c.waiting)))
        return (self.worker.requests, self.changes, conns, [bytes(g) for g in self.got],
                state(self.dispatcher, table))

    def close(self):
        for s in self.clients:
            s.close()
        for conn in list(self.worker.conns.values()):
            self.worker._close(conn)
        self.dispatcher.close_all()
        self.worker.close()


def requests_for(rng: random.Random, table: str) -> bytes:
    keys = [f"key{n}".encode() for n in range(24)] + [b"Folded", b"folded", b"nokey"]
    kind = rng.random()
    if kind < 0.6:      # spelled as the hot path knows it (after the first)
        return request(table, rng.choice(keys))
    if kind < 0.7:      # other spellings: the whole path
        return request(table, rng.choice(keys), rng.choice([F.FOLD_FIX, 0, F.LOCK]))
    if kind < 0.8:      # pipelined
        return b"".join(request(table, rng.choice(keys)) for _ in range(rng.randint(2, 4)))
    if kind < 0.805:    # BAD replies (the tenth closes the connection)
        return request(rng.choice([table, "hash:/not/allowed"]), b"key1", b"64 ")
    return request(table, rng.choice(keys) * rng.randint(1, 30))


def run_workload(table: str, pure: Side, fast: Side, rng: random.Random, steps: int,
                 rewrite=None) -> dict:
    """Drive both sides alike; how often each rarer case came up."""
    sides = (pure, fast)
    seen = {"epollout": 0, "partial": 0, "eof": 0, "reset": 0, "nothing": 0}
    owed = [b""] * CLIENTS        # the rest of a request sent in part
    gone = set()
    for step in range(steps):
        if rewrite is not None and step % 300 == 299:
            rewrite(step)
        ready = []
        for n in range(CLIENTS):
            if n in gone or pure.conn(n) is None:
                continue
            c = pure.conn(n)
            if c.events == select.EPOLLOUT:
                if n not in LAZY or rng.random() < 0.3:
                    for side in sides:
                        side.read_replies(n)
                    ready.append((n, select.EPOLLOUT))
                    seen["epollout"] += 1
                continue
            roll = rng.random()
            if roll < 0.45:
                data = owed[n] + requests_for(rng, table)
                owed[n] = b""
                if rng.random() < 0.1:      # in two parts
                    cut = rng.randint(1, len(data) - 1)
                    data, owed[n] = data[:cut], data[cut:]
                    seen["partial"] += 1
                for side in sides:
                    side.clients[n].send(data)
                ready.append((n, select.EPOLLIN))
            elif roll < 0.47 and n not in LAZY:     # nothing to read after all
                ready.append((n, select.EPOLLIN))
                seen["nothing"] += 1
            elif roll < 0.4705:          # bad bytes: a protocol error closes
                for side in sides:
                    side.clients[n].send(b"\xff" * 40 + b"\0\0")
                ready.append((n, select.EPOLLIN))
            elif roll < 0.471:          # the end of input, maybe mid-request
                more = owed[n][:1] if rng.random() < 0.5 else b""
                for side in sides:
                    if more:
                        side.clients[n].send(more)
                    side.clients[n].shutdown(socket.SHUT_WR)
                ready.append((n, select.EPOLLIN | select.EPOLLHUP))
                gone.add(n)
                seen["eof"] += 1
            elif roll < 0.4715 and n in LAZY:   # reset with replies unread: a read error
                for side in sides:
                    side.clients[n].send(request(table, b"key1"))
                    side.clients[n].close()
                ready.append((n, select.EPOLLIN | select.EPOLLHUP))
                gone.add(n)
                seen["reset"] += 1
        rng.shuffle(ready)
        for side in sides:
            side.one_pass(ready)
            for n in range(CLIENTS):
                if n not in LAZY and n not in gone:
                    side.read_replies(n)
        assert pure.view(table) == fast.view(table), f"step {step}"
        if len(gone) >= CLIENTS - 1:
            break
    return seen


@needs_compiled
def test_the_compiled_loop_serves_a_read_worker():
    assert HOTPATH is None or Worker(make_dispatcher("texthash:/nonexistent"))._compiled \
        is HOTPATH


@needs_compiled
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_loops_agree_on_a_random_workload(table_file, seed):
    table, src = table_file
    pure, fast = Side(make_dispatcher(table), False), Side(make_dispatcher(table), True)

    def rewrite(step):
        src.write_text("".join(f"key{n} value{n}.{step}\n" for n in range(20)) + "Folded v\n")
        settle(src)

    try:
        seen = run_workload(table, pure, fast, random.Random(seed), 1500, rewrite)
        assert pure.worker.requests > 1000
        assert seen["epollout"] and seen["partial"] and seen["nothing"]
        assert pure.dispatcher.cache_stats.hits > 100
        assert any(c is None for c in pure.view(table)[2])      # some were closed
    finally:
        pure.close()
        fast.close()


@needs_postmap
@needs_compiled
@pytest.mark.parametrize("cache_entries", [0, 8])
def test_both_loops_agree_on_direct_reads(db_file, cache_entries):
    table, src, templates = db_file
    pure = Side(make_dispatcher(table, cache_entries=cache_entries), False)
    fast = Side(make_dispatcher(table, cache_entries=cache_entries), True)

    def rewrite(step):
        install_db(templates[(step // 300) % 2 == 0], src)

    try:
        seen = run_workload(table, pure, fast, random.Random(11), 900, rewrite)
        assert pure.worker.requests > 500
        assert seen["epollout"] and seen["nothing"]
    finally:
        pure.close()
        fast.close()


@needs_compiled
@pytest.mark.parametrize("fast", [False, True], ids=["python", "compiled"])
def test_a_full_socket_leaves_the_rest_for_epollout(table_file, fast):
    """A client that stops reading: the reply that does not fit is kept in
    conn.out, the connection waits for EPOLLOUT, and nothing more is read;
    both loops alike (compared field by field with fixed expectations)."""
    table, _ = table_file
    side = Side(make_dispatcher(table), fast)
    try:
        req = request(table, b"key1")
        side.clients[0].send(req)
        side.one_pass([(0, select.EPOLLIN)])        # the whole path: now hot
        partial = None
        for _ in range(200):
            side.clients[0].send(req)
            side.one_pass([(0, select.EPOLLIN)])
            if side.conn(0).out:
                partial = side.conn(0)
                break
        assert partial is not None, "the socket never filled"
        assert partial.events == select.EPOLLOUT and partial.since is not None
        side.read_replies(0)
        side.one_pass([(0, select.EPOLLOUT)])
        assert not partial.out and partial.events == select.EPOLLIN and partial.since is None
    finally:
        side.close()


def warmed_side(table: str, fast: bool) -> Side:
    """A side whose client 0 has made key1's spelling hot."""
    side = Side(make_dispatcher(table), fast)
    side.clients[0].send(request(table, b"key1"))
    side.one_pass([(0, select.EPOLLIN)])
    side.read_replies(0)
    assert side.dispatcher._hot
    return side


@needs_compiled
@pytest.mark.parametrize("fast", [False, True], ids=["python", "compiled"])
def test_a_reset_connection_is_a_read_error(table_file, fast, caplog):
    """A client gone with replies unread: the next read fails (ECONNRESET),
    the connection is closed with one warning, nothing is counted."""
    table, _ = table_file
    side = warmed_side(table, fast)
    try:
        side.clients[1].send(request(table, b"key1"))
        side.one_pass([(1, select.EPOLLIN)])        # answered, reply left unread
        requests = side.worker.requests
        side.clients[1].close()
        side.one_pass([(1, select.EPOLLIN | select.EPOLLHUP)])
        assert side.conn(1) is None and side.worker.requests == requests
        assert "read: Connection reset by peer: closing the connection" in caplog.text
    finally:
        side.close()


@needs_compiled
@pytest.mark.parametrize("fast", [False, True], ids=["python", "compiled"])
def test_a_failed_send_closes_quietly(table_file, fast, caplog):
    """The client went away after sending: the hot reply's send fails with
    EPIPE and the connection is closed without a warning, the request
    counted (as the Python path counts it)."""
    table, _ = table_file
    side = warmed_side(table, fast)
    try:
        requests = side.worker.requests
        side.clients[1].send(request(table, b"key1"))
        side.clients[1].close()
        caplog.clear()
        side.one_pass([(1, select.EPOLLIN | select.EPOLLHUP)])
        assert side.conn(1) is None and side.worker.requests == requests + 1
        assert "closing the connection" not in caplog.text
    finally:
        side.close()


@needs_compiled
@pytest.mark.parametrize("fast", [False, True], ids=["python", "compiled"])
def test_a_stopping_worker_closes_after_the_hot_reply(table_file, fast):
    table, _ = table_file
    side = warmed_side(table, fast)
    try:
        side.worker.stopping = True
        side.clients[1].send(request(table, b"key2"))
        side.clients[2].send(request(table, b"key1"))
        side.one_pass([(1, select.EPOLLIN), (2, select.EPOLLIN)])
        side.read_replies(1)
        side.read_replies(2)
        assert side.conn(1) is None and side.conn(2) is None
        assert side.got[2].endswith(b"status\0000\0value\0value1\0\0")
    finally:
        side.close()
