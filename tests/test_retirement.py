"""A retired worker keeps serving the connections it has (issue 11).

Postfix's multi-server (src/master/multi_server.c) runs its loop while
clients are connected, even past its use limit, and exits when none is
left. Ours does the same for a worker retired by `max_use` or by a reload:
it gets no new connection, answers every request on the ones it has, and
exits once their clients have closed them. Before, the master told it to
stop 5 s (RETIRE_GRACE) after retiring it, and a request sent then was
lost. The pure decisions are in tests/test_policy.py (with an injected
clock); here real processes show it, with a raw client and with real
Postfix `postmap -q -` streaming keys from a pipe this test writes to.

No sleep decides anything: "well past the old grace" is the moment the
master has pinged the retired worker twice (it pings a worker that has
clients and has been silent for daemon_timeout/3, 16 s / 3 here, so the
second ping comes more than 10 s after the retirement), read from the
status file. Every wait is bounded; every process is stopped by pid.
"""

from __future__ import annotations

import socket
import subprocess
import time

from proxymap import handoff
from proxymap.client import read_greeting
from proxymap.conventions.main_cf import load_main_cf
from proxymap.server import make_worker
from tests.instance import (POSTMAP, gone, lookup_on, needs_postmap, temporary_instance,
                            wait_for)

#: daemon_timeout for these tests: a ping every 16/3 s to a silent worker
#: with clients, so two pings take longer than twice the old 5 s grace
DAEMON_TIMEOUT = "16s"
OK_ALICE = [(b"status", b"0"), (b"value", b"alice@example.org")]


def worker(inst, pid: int) -> dict:
    """The status file's entry for worker `pid` ({} once it is gone)."""
    return next((w for w in inst.workers("proxymap") if w["pid"] == pid), {})


def retired_worker_with_a_client(inst, besides=()) -> int:
    """The pid of the retiring worker that has one client, other than `besides`."""
    def find():
        return [w["pid"] for w in inst.workers("proxymap", "retiring")
                if w["clients"] == 1 and w["pid"] not in besides]
    return wait_for(find, 20, what="a retiring worker with a client")[0]


def wait_past_the_old_grace(inst, *pids) -> None:
    """Until the master has pinged each of `pids` twice (see the module text)."""
    for pid in pids:
        wait_for(lambda: worker(inst, pid).get("pings", 0) >= 2, 60,
                 what=f"two pings of worker {pid}")
        assert worker(inst, pid)["state"] == "retiring"


def connect(inst) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(inst.socket_path())
    assert read_greeting(sock)
    return sock


@needs_postmap
def test_a_worker_retired_by_max_use_answers_its_clients_until_they_close(tmp_path):
    """max_use 1: the raw connection's worker and the real postmap's worker
    are retired at their first connection; long after, both still answer on
    those connections, no client reconnects, and each worker exits when its
    client closes."""
    with temporary_instance(tmp_path, main_extra={"max_use": "1",
                                                  "daemon_timeout": DAEMON_TIMEOUT}) as inst:
        inst.run_foreground()
        raw = connect(inst)
        stream = None
        try:
            raw_pid = retired_worker_with_a_client(inst)
            assert lookup_on(raw, inst.read_table, b"alice") == OK_ALICE
            stream = subprocess.Popen([POSTMAP, "-c", inst.config_dir, "-q", "-",
                                       f"proxy:{inst.read_table}"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            stream.stdin.write(b"alice\n")        # postmap opens the table now
            stream.stdin.flush()
            stream_pid = retired_worker_with_a_client(inst, besides=(raw_pid,))
            wait_for(lambda: worker(inst, stream_pid).get("requests", 0) >= 2, 20,
                     what="postmap's open and first lookup")
            wait_past_the_old_grace(inst, raw_pid, stream_pid)
            # the requests after the old grace: answered on the old connections
            assert lookup_on(raw, inst.read_table, b"alice") == OK_ALICE
            before = worker(inst, stream_pid)["requests"]
            stream.stdin.write(b"bob\n")
            stream.stdin.flush()
            wait_for(lambda: worker(inst, stream_pid).get("requests", 0) > before, 20,
                     what="postmap's lookup after the old grace, by its retired worker")
            stream.stdin.close()
            stream.wait(30)
            out, err = stream.stdout.read(), stream.stderr.read()
            assert stream.returncode == 0, err
            assert out == b"alice\talice@example.org\nbob\tbob@example.org\n"
            assert err == b""          # no "lost connection", no retry
            wait_for(lambda: gone(stream_pid), 20, what="postmap's worker to exit")
            assert not gone(raw_pid)   # the raw client is still connected
            raw.close()
            wait_for(lambda: gone(raw_pid), 20, what="the raw client's worker to exit")
            # neither client came back on a new connection: the workers after
            # them were handed only the status probes (none here)
            assert all(w["handed"] == 0 for w in inst.workers("proxymap", "ready"))
        finally:
            raw.close()
            if stream is not None and stream.poll() is None:
                stream.kill()
                stream.wait(10)


@needs_postmap
def test_a_worker_retired_by_a_reload_answers_its_client_until_it_closes(tmp_path):
    with temporary_instance(tmp_path, main_extra={"daemon_timeout": DAEMON_TIMEOUT}) as inst:
        inst.run_foreground()
        raw = connect(inst)
        try:
            assert lookup_on(raw, inst.read_table, b"alice") == OK_ALICE
            (old,) = [w["pid"] for w in inst.workers("proxymap")]
            settled = wait_for(lambda: [w for w in [worker(inst, old)] if w.get("clients") == 1
                                        and w["accepted"] == w["handed"]], 20,
                               what="the worker's report of our connection")
            handed = settled[0]["handed"]
            generation = inst.raw_status()["generation"]
            inst.write_main_cf(ipc_timeout="3000s")        # every worker is replaced
            assert inst.control("reload").returncode == 0
            wait_for(lambda: inst.raw_status().get("generation", 0) > generation, 20,
                     what="the reload")
            wait_for(lambda: worker(inst, old).get("state") == "retiring", 20,
                     what="the old worker to be retired")
            wait_past_the_old_grace(inst, old)
            assert lookup_on(raw, inst.read_table, b"alice") == OK_ALICE
            assert inst.lookup("bob") == "bob@example.org"     # new clients: new worker
            assert worker(inst, old)["handed"] == handed     # nothing new for it
            raw.close()
            wait_for(lambda: gone(old), 20, what="the old worker to exit")
        finally:
            raw.close()


def test_a_retiring_worker_lets_go_of_a_connection_idle_for_max_idle(tmp_path):
    """The one connection a retiring worker closes itself: idle (nothing
    owed either way) since our last reply for max_idle seconds. A client in
    the middle of a request, or that was answered since, is kept."""
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n"
                                      f"proxy_read_maps = static:x\n")
    w = make_worker(load_main_cf(str(tmp_path)), "proxymap")
    master_end, worker_end = handoff.channel_pair()
    channel = handoff.WorkerChannel(w, worker_end.detach(), max_idle=100.0)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for ours, _ in pairs:
            w.add_client(ours)
        idle, busy, recent = (w.conns[ours.fileno()] for ours, _ in pairs)
        long_ago = time.monotonic() - 101.0
        idle.replied = busy.replied = long_ago
        busy.decoder.feed(b"request\0look")           # half a request
        channel.retire()
        assert w.drain_idle == 100.0 and not w.stopping
        w._expire()
        assert idle.fd not in w.conns and busy.fd in w.conns and recent.fd in w.conns
        for _, theirs in pairs:
            theirs.settimeout(5)
            assert theirs.recv(1024)                  # the greeting
        assert pairs[0][1].recv(1024) == b""          # then end of file
        for _, theirs in pairs[1:]:
            theirs.setblocking(False)
            try:                                        # still open: nothing to read
                assert theirs.recv(1024) != b""
            except BlockingIOError:
                pass
    finally:
        for conn in list(w.conns.values()):
            w._close(conn)
        channel.chan.close()
        master_end.close()
        w.close()
        for _, theirs in pairs:
            theirs.close()
