"""The master under load, across reloads and a killed worker; slow clients.

`test_load_with_reloads_and_a_killed_worker` (slow, ~75 s): 60 protocol
clients (threads, each a ProxyClient that reconnects and resends) and 4
streams of real `postmap -q - proxy:hash:...` hammer the read service for
LOAD_SECONDS while the configuration is reloaded RELOADS times (each a new
worker generation) and one serving worker is killed with SIGKILL. It
asserts: no client-visible error (a lost connection that the client
reconnected and resent is counted as a reconnect, not an error), every
answer right, the master's descriptor count (less one channel per worker)
and the workers' descriptor counts unchanged between the idle instance
before and after the run, RSS growth within the bounds below, and every
old-generation worker gone at the end. The figures are printed.

The slow-client tests check, under the master with ipc_timeout = 3s, that a
client sending one byte per second or never reading its replies neither
stalls the other clients of its worker nor holds the worker beyond
ipc_timeout (tests/test_worker.py covers a standalone worker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from proxymap.client import NOKEY, OK, ProxyClient, ProxyError, read_greeting
from proxymap.protocol import GREETING, encode
from tests.instance import POSTMAP, READ_ENTRIES, gone, needs_postmap, wait_for

pytestmark = needs_postmap

LOAD_SECONDS = 55
RELOADS = 10
PROTOCOL_CLIENTS = 60
POSTMAP_STREAMS = 4
#: bounds between the idle instance before and after the run
MASTER_RSS_GROWTH = 24 << 20
WORKER_RSS_GROWTH = 24 << 20
FD_SLACK = 2

KEYS = [*READ_ENTRIES, "nobody"]


class CountingClient(ProxyClient):
    """A ProxyClient that counts its connections (all but the first are
    reconnects: a closed idle connection or a resend after a failure)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


def usage(pid: int) -> tuple[int, int]:
    """(open descriptors, RSS bytes)."""
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss


def all_workers(instance) -> list[dict]:
    return instance.workers("proxymap") + instance.workers("proxywrite")


def idle_sample(instance) -> dict:
    """Resource use of the master and every worker once no client is left."""
    wait_for(lambda: all(w["clients"] == 0 and w["state"] == "ready"
                         for w in all_workers(instance)), 30, what="idle workers")
    workers = [w["pid"] for w in all_workers(instance)]
    master_fds, master_rss = usage(instance.master_pid())
    per_worker = {pid: usage(pid) for pid in workers}
    return {"master_fds": master_fds, "master_rss": master_rss, "workers": len(workers),
            "worker_fds": max(f for f, _ in per_worker.values()),
            "worker_rss": max(r for _, r in per_worker.values())}


@pytest.mark.slow
def test_load_with_reloads_and_a_killed_worker(instance):
    instance.run_foreground()
    path, table = instance.socket_path(), instance.read_table
    for key in KEYS:                      # warm up: tables open in both services
        instance.lookup(key)
    instance.lookup("k1", instance.write_table)
    before = idle_sample(instance)

    stop = threading.Event()
    stats = []                            # one dict per client thread
    problems: list[str] = []

    def protocol_client(n: int) -> None:
        mine = {"requests": 0, "reconnects": 0}
        stats.append(mine)
        client = CountingClient(path, timeout=30, retries=5, retry_delay=0.2)
        i = n
        try:
            while not stop.is_set():
                key = KEYS[i % len(KEYS)]
                i += 1
                try:
                    status, value = client.lookup(table, 0, key.encode())
                except ProxyError as exc:
                    problems.append(f"client {n}: {exc}")
                    continue
                want = (OK, READ_ENTRIES[key].encode()) if key in READ_ENTRIES else (NOKEY, b"")
                if (status, value) != want:
                    problems.append(f"client {n}: {key} -> {status} {value!r}")
                mine["requests"] += 1
        finally:
            mine["reconnects"] = max(0, client.connects - 1)
            client.close()

    batch = "".join(f"{k}\n" for k in KEYS) * 50
    expected = "".join(f"{k}\t{READ_ENTRIES[k]}\n" for k in KEYS if k in READ_ENTRIES) * 50

    def postmap_stream(n: int) -> None:
        mine = {"requests": 0, "reconnects": 0}
        stats.append(mine)
        while not stop.is_set():
            # SIGPIPE ignored, as in every Postfix daemon (the master's
            # children inherit it): a client whose worker is killed under it
            # gets EPIPE, warns and reconnects, instead of dying
            result = subprocess.run([POSTMAP, "-c", instance.config_dir, "-q", "-",
                                     f"proxy:{table}"], input=batch, capture_output=True,
                                    text=True, timeout=120, restore_signals=False)
            # Postfix's client logs a warning when it loses the connection
            # and then reconnects and resends on its own
            warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
            others = [line for line in result.stderr.splitlines() if "warning:" not in line]
            mine["reconnects"] += len(warnings)
            if result.returncode != 0 or result.stdout != expected or others:
                problems.append(f"postmap {n}: exit {result.returncode}: {result.stderr!r}")
            mine["requests"] += len(KEYS) * 50

    threads = [threading.Thread(target=protocol_client, args=(n,))
               for n in range(PROTOCOL_CLIENTS)]
    threads += [threading.Thread(target=postmap_stream, args=(n,))
                for n in range(POSTMAP_STREAMS)]
    seen: set[int] = set()
    killed = None
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(s["requests"] for s in stats) > 1000, 30, what="load to start")
        interval = LOAD_SECONDS / (RELOADS + 1)
        for n in range(1, RELOADS + 1):
            deadline = started + n * interval
            while time.monotonic() < deadline:
                seen.update(w["pid"] for w in all_workers(instance))
                time.sleep(0.2)
            instance.write_main_cf(max_idle=f"{200 + n}s")     # a new generation each time
            result = instance.control("reload")
            assert result.returncode == 0, result.stderr
            if n == RELOADS // 2:
                busy = wait_for(lambda: [w for w in instance.workers("proxymap", "ready")
                                         if w["generation"] == n and w["clients"] > 0],
                                20, what="a serving worker of the new generation")
                killed = busy[0]["pid"]
                os.kill(killed, signal.SIGKILL)
        while time.monotonic() < started + LOAD_SECONDS:
            seen.update(w["pid"] for w in all_workers(instance))
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert not any(t.is_alive() for t in threads)

    # every old-generation worker is gone; nothing else is left behind
    wait_for(lambda: {w["generation"] for w in all_workers(instance)} == {RELOADS}, 30,
             what="old generations to retire")
    current = {w["pid"] for w in all_workers(instance)}
    old = seen - current
    wait_for(lambda: all(gone(pid) for pid in old), 20, what="old workers to exit")
    children = {c.pid for c in psutil.Process(instance.master_pid()).children()}
    assert children == current
    after = idle_sample(instance)

    requests = sum(s["requests"] for s in stats)
    reconnects = sum(s["reconnects"] for s in stats)
    print(f"\nFIGURES load: {len(threads)} clients, {LOAD_SECONDS}s, {RELOADS} reloads, "
          f"killed worker {killed}: {requests} requests, {len(problems)} errors, "
          f"{reconnects} reconnects, {len(seen | current)} workers in all")
    print(f"FIGURES master: fds {before['master_fds']} -> {after['master_fds']} "
          f"(workers {before['workers']} -> {after['workers']}), "
          f"rss {before['master_rss'] >> 10} -> {after['master_rss'] >> 10} KiB")
    print(f"FIGURES workers (max): fds {before['worker_fds']} -> {after['worker_fds']}, "
          f"rss {before['worker_rss'] >> 10} -> {after['worker_rss'] >> 10} KiB")

    assert not problems, problems[:10]
    assert killed is not None and gone(killed)
    assert f"pid {killed} killed by signal 9" in instance.log()
    assert instance.raw_status()["generation"] == RELOADS
    assert requests > 10 * len(threads)
    # the master holds one channel per worker and nothing per client
    assert (after["master_fds"] - after["workers"]
            <= before["master_fds"] - before["workers"] + FD_SLACK)
    assert after["master_rss"] <= before["master_rss"] + MASTER_RSS_GROWTH
    assert after["worker_fds"] <= before["worker_fds"] + FD_SLACK
    assert after["worker_rss"] <= before["worker_rss"] + WORKER_RSS_GROWTH
    assert "Traceback" not in instance.log()


# -- slow clients under the master ---------------------------------------------------------

def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    assert len(read_greeting(sock)) == len(GREETING), "no greeting"
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (EOF or reset pending)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(10)


@pytest.fixture
def short_ipc(instance):
    instance.write_main_cf(ipc_timeout="3s")
    instance.run_foreground()
    return instance


def served_by_same_worker(instance, clients: int) -> int:
    (worker,) = wait_for(lambda: [w for w in instance.workers("proxymap")
                                  if w["clients"] == clients], 10,
                         what=f"{clients} clients on one worker")
    assert len(instance.workers("proxymap")) == 1
    return worker["pid"]


def test_one_byte_per_second_client_is_dropped_after_ipc_timeout(short_ipc):
    instance = short_ipc
    path, table = instance.socket_path(), instance.read_table
    request = encode([("request", "lookup"), ("table", table), ("flags", 0),
                      ("key", "alice")])
    slow = connect(path)
    other = ProxyClient(path, timeout=10, retries=0)
    try:
        assert other.lookup(table, 0, b"bob") == (OK, b"bob@example.org")
        worker = served_by_same_worker(instance, 2)
        answered_meanwhile = 0
        # at most 20 bytes, far fewer than the request has: the worker must
        # drop us long before (ipc_timeout is 3 s)
        for byte in request[:20]:
            try:
                slow.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if closed_by_peer(slow):
                break
            # the other client of the same worker is answered meanwhile
            assert other.lookup(table, 0, b"carol") == (OK, b"carol@example.org")
            answered_meanwhile += 1
            time.sleep(1)
        else:
            pytest.fail("a client sending one byte per second kept its connection "
                        "for 20 s with ipc_timeout = 3s")
        assert answered_meanwhile >= 1
        wait_for(lambda: "request unfinished" in instance.log(), 10, what="the log line")
        assert [w["pid"] for w in instance.workers("proxymap")] == [worker]
        assert other.lookup(table, 0, b"alice") == (OK, b"alice@example.org")
    finally:
        slow.close()
        other.close()


def test_client_that_never_reads_is_dropped_and_others_are_served(short_ipc):
    instance = short_ipc
    path, table = instance.socket_path(), instance.read_table
    one = encode([("request", "lookup"), ("table", table), ("flags", 0), ("key", "alice")])
    deaf = connect(path)
    other = ProxyClient(path, timeout=10, retries=0)
    try:
        assert other.lookup(table, 0, b"bob") == (OK, b"bob@example.org")
        worker = served_by_same_worker(instance, 2)
        # pipeline requests, never read: the replies fill our receive buffer,
        # the worker stops reading from us (back-pressure) and our sends block
        deaf.setblocking(False)
        sent, blocked = 0, 0
        for _ in range(200000):
            try:
                sent += deaf.send(one * 64)
                blocked = 0
            except BlockingIOError:
                blocked += 1
                if blocked > 20:
                    break
                time.sleep(0.02)
        else:
            pytest.fail("the worker kept reading from a client that never reads")
        assert sent > 0
        # the other client of the same worker is still answered
        for key in ("carol", "alice", "nobody"):
            want = (OK, READ_ENTRIES[key].encode()) if key in READ_ENTRIES else (NOKEY, b"")
            assert other.lookup(table, 0, key.encode()) == want
        wait_for(lambda: "reply unread" in instance.log(), 20, what="the timeout log line")
        wait_for(lambda: [w for w in instance.workers("proxymap") if w["clients"] == 1], 10,
                 what="the worker to let go of the deaf client")
        deaf.settimeout(10)
        try:
            while deaf.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        assert [w["pid"] for w in instance.workers("proxymap")] == [worker]
        assert "daemon_timeout" not in instance.log()
        assert other.lookup(table, 0, b"alice") == (OK, b"alice@example.org")
    finally:
        deaf.close()
        other.close()
