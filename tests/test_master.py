"""The pre-fork master and `proxymap-master`, driven by real Postfix clients.

Pure helpers are tested directly; the rest starts a master on a temporary
instance (tests/instance.py) and talks to it with /usr/sbin/postmap.
Every wait is a bounded poll on a condition; every process is stopped by
pid in the fixture.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from master import pidfile, sdnotify
from proxymap import handoff
from master.control import config_lines, format_uptime, parse_args
from master.supervisor import describe_exit
from master.workerslot import READY, RETIRING, STARTING, WorkerSlot, pick_worker
from proxymap.client import read_greeting
from tests.instance import gone, greeting_of, needs_postmap, wait_for

pytestmark = needs_postmap


# -- pure helpers ---------------------------------------------------------------------

def test_status_record_round_trip_and_rejects_bad_sizes():
    status = handoff.Status(busy=1, clients=3, accepted=10, requests=99, cache_hits=7,
                            cache_misses=5, cache_invalidations=2)
    record = handoff.encode_status(status)
    assert record[:1] == b"S" and len(record) == 1 + handoff.STATUS_SIZE
    assert handoff.decode_status(record) == status
    with pytest.raises(ValueError):
        handoff.decode_status(record[:-1])
    with pytest.raises(ValueError):
        handoff.decode_status(b"X" + record[1:])


def test_descriptor_passing_over_seqpacket_keeps_records_apart():
    master_end, worker_end = handoff.channel_pair()
    a, b = socket.socketpair()
    try:
        handoff.send_clients(master_end, [a.fileno()])
        handoff.send_command(master_end, handoff.RETIRE)
        worker_end.setblocking(False)
        records, eof = handoff.read_messages(worker_end)
        assert not eof
        assert [data for data, _ in records] == [b"C\x01", b"R"]
        (fd,) = records[0][1]
        assert not records[1][1]
        passed = socket.socket(fileno=fd)
        assert not os.get_inheritable(fd)          # MSG_CMSG_CLOEXEC
        passed.sendall(b"ping")
        assert b.recv(4) == b"ping"
        passed.close()
        master_end.close()
        assert handoff.read_messages(worker_end) == ([], True)
    finally:
        for s in (a, b, master_end, worker_end):
            s.close()


def test_pid_file_format_and_lock(tmp_path):
    path = str(tmp_path / "x.pid")
    assert pidfile.format_pid(6868) == b" " * 28 + b"6868\n"
    assert pidfile.parse_pid(b"   12\n") == 12
    assert pidfile.parse_pid(b"junk\n") is None
    assert pidfile.running_pid(path) is None
    fd = pidfile.acquire(path)
    try:
        assert pidfile.running_pid(path) == os.getpid()
        with pytest.raises(pidfile.LockBusy):
            pidfile.acquire(path)
    finally:
        os.close(fd)
    assert pidfile.running_pid(path) is None


def test_sd_notify_addresses_and_datagrams(tmp_path, monkeypatch):
    assert sdnotify.socket_address("") is None
    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("/run/x") == "/run/x"
    assert sdnotify.socket_address("relative") is None
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.reloading()
        fields = sock.recv(256).decode().split("\n")
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
        assert int(fields[1].split("=")[1]) > 0
        assert sdnotify.stopping()
        assert sock.recv(256) == b"STOPPING=1"


def test_worker_slot_states_and_least_loaded_pick():
    a = WorkerSlot(pid=1, service="proxymap", generation=0)
    b = WorkerSlot(pid=2, service="proxymap", generation=0)
    assert pick_worker([a, b]) is None                      # none has reported yet
    a.on_status(handoff.Status(clients=2, accepted=2), 1.0)
    b.on_status(handoff.Status(clients=0, accepted=0), 1.0)
    assert a.state == b.state == READY
    assert pick_worker([a, b]) is b
    for _ in range(3):                                      # in transit counts as load
        b.on_handed(2.0)
    assert b.load == 3 and pick_worker([a, b]) is a
    new = WorkerSlot(pid=3, service="proxymap", generation=1, state=READY)
    assert pick_worker([a, b, new], generation=1) is new    # current generation first
    assert b.retire(3.0) and b.state == RETIRING and not b.retire(4.0)
    assert pick_worker([b]) is None
    c = WorkerSlot(pid=4, service="proxymap", generation=0)
    assert c.state == STARTING and not c.reported
    c.on_exit(256)
    assert not c.alive


def test_worker_slot_silence_counts_only_while_busy():
    slot = WorkerSlot(pid=1, service="proxymap", generation=0)
    slot.on_status(handoff.Status(), 10.0)
    assert slot.silent_for(100.0) == 0.0                    # idle: never "stuck"
    slot.on_handed(50.0)
    assert slot.silent_for(60.0) == pytest.approx(10.0)
    slot.on_status(handoff.Status(clients=1, accepted=1), 60.0)
    assert slot.silent_for(61.0) == pytest.approx(1.0)
    assert slot.idle_for(61.0) == 0.0


def test_exit_descriptions_use_postfix_words():
    assert describe_exit(0) is None
    assert describe_exit(1 << 8) == "exit status 1"
    assert describe_exit(signal.SIGKILL) == "killed by signal 9"


def test_uptime_and_command_line():
    assert format_uptime(3725) == "1:02:05"
    assert format_uptime(90061) == "1d 1:01:01"
    args = parse_args(["-c", "/x", "config", "-n", "max_use"])
    assert args.command == "config" and args.n and args.names == ["max_use"]


def test_config_lines_like_postconf(tmp_path):
    from proxymap.conventions.main_cf import load_main_cf
    (tmp_path / "main.cf").write_text("max_use = 7\nmyorigin = a,\n   b\n")
    main = load_main_cf(str(tmp_path), warn=lambda _: None)
    lines, unknown = config_lines(main, "n", [], False)
    assert "max_use = 7" in lines and "myorigin = a, b" in lines
    lines, unknown = config_lines(main, "d", ["max_use", "no_such_thing"], False)
    assert lines == ["max_use = 100"] and unknown == ["no_such_thing"]
    lines, _ = config_lines(main, "", ["max_use", "max_idle"], False)
    assert lines == ["max_use = 7", "max_idle = 100s"]


# -- helpers for the live tests -----------------------------------------------------------

def worker_pids(master_pid: int, service: str | None = None) -> list[int]:
    pids = []
    for child in psutil.Process(master_pid).children():
        try:
            # forked workers carry a process title, one string: split it
            cmdline = " ".join(child.cmdline()).split()
        except psutil.Error:
            continue
        if service is None or service in cmdline:
            pids.append(child.pid)
    return pids


def hold_connections(path: str, count: int, busy: bool = False) -> list[socket.socket]:
    """`count` greeted connections; with `busy`, each with a request under
    way (idle connections do not make the master add workers)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        read_greeting(sock)
        if busy:
            sock.sendall(b"request\0lookup\0table\0")
        socks.append(sock)
    return socks


# -- start / stop -------------------------------------------------------------------------

def test_start_serves_postmap_and_stop_ends_everything(instance):
    pid = instance.start()
    assert pid and not gone(pid)
    # the lock is held: a second start is refused with the reason
    again = instance.control("start")
    assert again.returncode != 0 and "already running" in again.stderr
    assert instance.lookup("alice") == "alice@example.org"
    assert instance.lookup("nobody") is None
    # proxywrite deletes; the next lookup through proxymap sees it
    assert instance.lookup("k1", instance.write_table) == "v1"
    result = instance.delete("k1")
    assert result.returncode == 0, result.stderr
    assert instance.lookup("k1", instance.write_table) is None
    assert instance.lookup("k2", instance.write_table) == "v2"
    # proxywrite's worker was started on demand by that delete; the status
    # file shows it at the master's next write
    wait_for(lambda: instance.workers("proxywrite", "ready"), 20, what="the proxywrite worker")
    status = instance.status()
    assert status["running"] and status["pid"] == pid
    assert status["config_directory"] == instance.config_dir
    for service in ("proxymap", "proxywrite"):
        workers = status["services"][service]["workers"]
        assert len(workers) == 1 and workers[0]["state"] == "ready"
        assert workers[0]["rss"] > 0 and workers[0]["cpu"] is not None
    text = instance.control("status")
    assert text.returncode == 0 and f"pid {pid}" in text.stdout and "proxywrite" in text.stdout
    workers = worker_pids(pid)
    assert len(workers) == 2
    if os.geteuid() == 0:
        assert {psutil.Process(w).username() for w in workers} == {"postfix"}
    stop = instance.control("stop")
    assert stop.returncode == 0, stop.stderr
    assert gone(pid) and all(gone(w) for w in workers)
    assert instance.control("status").returncode == 1
    assert instance.control("stop").returncode == 1
    # the socket files stay, like Postfix's, and refuse connections
    with pytest.raises(ConnectionRefusedError):
        greeting_of(instance.socket_path())


def test_status_shows_answer_cache_counters(instance):
    """Hits, misses and invalidations of the workers' answer caches reach
    `status` (the worker runs as mail_owner, with its inotify watch)."""
    instance.start()
    # misses: the first lookup, the one after the instance settled on keys
    # with a NUL, and one more if the freshly built file was reopened once
    for _ in range(5):
        assert instance.lookup("alice") == "alice@example.org"

    def counted():
        (worker,) = instance.status()["services"]["proxymap"]["workers"]
        return worker if worker["cache_hits"] >= 1 else None
    worker = wait_for(counted, what="cache hits in status")
    assert worker["cache_misses"] >= 1
    assert " cache " in instance.control("status").stdout


def test_directories_and_socket_modes(instance):
    instance.start()
    queue = instance.queue_dir
    assert os.stat(os.path.join(queue, "private")).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(queue, "public")).st_mode & 0o777 == 0o710
    st = os.stat(instance.socket_path("proxywrite"))
    assert st.st_mode & 0o777 == 0o666
    if os.geteuid() == 0:
        import pwd
        assert st.st_uid == pwd.getpwnam("postfix").pw_uid
    with open(os.path.join(queue, "pid", "proxymap-master.pid"), "rb") as f:
        assert len(f.read()) == 33


def test_start_fails_with_reason_when_workers_cannot_start(instance):
    instance.write_master_cf("proxymap unix - - n - - proxymap -o ipc_timeout=bogus\n"
                             "proxywrite unix - - n - 1 proxymap\n")
    result = instance.control("start")
    assert result.returncode != 0
    assert "proxymap" in result.stderr and "at startup" in result.stderr
    wait_for(lambda: instance.control("status").returncode == 1, 15,
             what="the failed master to go away")


def test_start_refuses_what_an_on_demand_worker_would_die_of(instance):
    """proxywrite has no worker at start (proxymap_write_min_workers 0), so
    its worker settings are checked then, with file and line, not left for
    the first client to find out."""
    instance.write_master_cf("proxymap unix - - n - - proxymap\n"
                             "proxywrite unix - - n - 1 proxymap -o ipc_timeout=bogus\n")
    result = instance.control("start")
    assert result.returncode != 0
    assert f"{instance.config_dir}/master.cf: line 2: service proxywrite:" in result.stderr
    assert "ipc_timeout" in result.stderr and "Traceback" not in result.stderr


def test_run_in_foreground_throttles_a_command_that_dies_at_startup(instance):
    instance.write_main_cf(service_throttle_time="60s")
    # pre-forked (minimum 1), so the master forks it at start and sees it die
    instance.write_master_cf("proxymap unix - - n - - proxymap\n"
                             "proxywrite unix - - n - 1 proxymap -o proxymap_write_min_workers=1"
                             " -o ipc_timeout=bogus\n")
    instance.run_foreground(wait=False)
    wait_for(lambda: "bad command startup -- throttling" in instance.log(), 30,
             what="the throttling warning")
    assert "exit status 1" in instance.log()
    # the read service is unaffected
    wait_for(lambda: instance.workers("proxymap", "ready"), 20, what="a proxymap worker")
    assert instance.lookup("bob") == "bob@example.org"
    wait_for(lambda: instance.raw_status()["services"]["proxywrite"]["throttled"], 10,
             what="the status file to show the throttled service")


# -- services started on demand -------------------------------------------------------------

def test_proxywrite_starts_on_demand_and_leaves_after_max_idle(instance):
    """A fresh master has no proxywrite worker; a client makes it fork one
    and waits for it; idle for max_idle, the worker exits and the service
    is back to none; the next real Postfix client starts another."""
    instance.write_main_cf(max_idle="1s")
    pid = instance.start()
    status = instance.status()
    assert status["services"]["proxywrite"]["workers"] == []
    assert status["services"]["proxywrite"]["min_workers"] == 0
    assert len(status["services"]["proxymap"]["workers"]) == 1     # the read service is pre-forked
    assert worker_pids(pid, "proxywrite") == [] and len(worker_pids(pid)) == 1
    text = instance.control("status").stdout
    assert (f"service proxywrite ({instance.socket_path('proxywrite')}): 0 worker(s), "
            f"maxproc 1, the first client starts one") in text
    # a client arrives: it waits for the fork and is greeted by the new worker;
    # while it stays connected the worker is not idle
    (held,) = hold_connections(instance.socket_path("proxywrite"), 1)
    try:
        (writer,) = wait_for(lambda: instance.workers("proxywrite", "ready"), 20,
                             what="the on-demand worker")
        assert worker_pids(pid, "proxywrite") == [writer["pid"]]
        # real postmap through proxywrite, served by that worker
        result = instance.delete("k1")
        assert result.returncode == 0, result.stderr
        assert instance.lookup("k1", instance.write_table) is None
        assert {w["pid"] for w in instance.workers("proxywrite")} == {writer["pid"]}
    finally:
        held.close()
    # max_idle without a client: the worker leaves, none replaces it
    wait_for(lambda: gone(writer["pid"]), 30, what="the idle worker to exit")
    wait_for(lambda: instance.raw_status()["services"]["proxywrite"]["workers"] == [], 20,
             what="the status to show no proxywrite worker")
    assert "0 worker(s)" in instance.control("status").stdout
    # the next client, a real postmap, starts another from nothing
    result = instance.delete("k2")
    assert result.returncode == 0, result.stderr
    assert instance.lookup("k2", instance.write_table) is None
    assert instance.lookup("k3", instance.write_table) == "v3"
    assert "Traceback" not in instance.log()


def test_an_on_demand_worker_that_dies_at_startup_throttles_the_service(instance):
    """The first client makes the master fork; the worker dies before its
    first report; the service is throttled: more clients wait in the
    backlog instead of each costing a fork (Postfix's master does the same)."""
    instance.write_main_cf(service_throttle_time="60s")
    # an argument the worker's own parser refuses: nothing the master checks
    instance.write_master_cf("proxymap unix - - n - - proxymap\n"
                             "proxywrite unix - - n - 1 proxymap --no-such-option\n")
    instance.run_foreground(wait=False)
    wait_for(lambda: instance.workers("proxymap", "ready"), 20, what="a proxymap worker")
    assert "bad command startup" not in instance.log()            # nothing forked yet
    clients = []
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(first)
        first.connect(instance.socket_path("proxywrite"))
        wait_for(lambda: "bad command startup -- throttling" in instance.log(), 30,
                 what="the throttling warning")
        wait_for(lambda: instance.raw_status()["services"]["proxywrite"]["throttled"], 10,
                 what="the status file to show the throttled service")
        for _ in range(3):
            more = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(more)
            more.connect(instance.socket_path("proxywrite"))      # into the backlog
        # a round trip through the master's loop after those connections
        assert instance.lookup("bob") == "bob@example.org"
        log = instance.log()
        assert log.count("bad command startup -- throttling") == 1, log
        assert instance.raw_status()["services"]["proxywrite"]["workers"] == []
    finally:
        for sock in clients:
            sock.close()


def test_check_reports_file_and_line(instance):
    assert instance.control("check").returncode == 0
    instance.write_master_cf(instance.master_cf + "broken unix yes - n - - proxymap\n")
    result = instance.control("check")
    assert result.returncode == 1
    assert f"{instance.config_dir}/master.cf: line 4:" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_command(instance):
    result = instance.control("config", "-n")
    assert result.returncode == 0
    assert f"queue_directory = {instance.queue_dir}" in result.stdout.splitlines()
    result = instance.control("config", "-d", "max_use")
    assert result.stdout.strip() == "max_use = 100"


def test_other_commands_are_skipped_with_a_warning(instance):
    instance.write_master_cf(instance.master_cf + "postlog unix-dgram n - n - 1 postlogd\n")
    proc = instance.run_foreground()
    assert "postlog/unix-dgram: command postlogd is not served" in instance.log()
    assert set(instance.raw_status()["services"]) == {"proxymap", "proxywrite"}
    assert proc.poll() is None


# -- load spreading and the single writer --------------------------------------------------

def test_concurrent_clients_spread_over_several_workers(instance):
    instance.run_foreground()
    master = instance.master_pid()
    held = hold_connections(instance.socket_path(), 12, busy=True)
    try:
        wait_for(lambda: len(instance.workers("proxymap", "ready")) >= 2, 20,
                 what="a second proxymap worker")
        more = hold_connections(instance.socket_path(), 8, busy=True)
        held += more

        def serving_pids():
            counts = {}
            for pid in worker_pids(master, "proxymap"):
                try:
                    conns = psutil.Process(pid).net_connections(kind="unix")
                except psutil.Error:
                    continue
                n = sum(1 for c in conns if c.laddr == instance.socket_path())
                if n:
                    counts[pid] = n
            return counts if len(counts) >= 2 and sum(counts.values()) == 20 else None
        counts = wait_for(serving_pids, 20, what="connections on two workers")
        assert max(counts.values()) < 20
        with ThreadPoolExecutor(8) as pool:
            values = list(pool.map(instance.lookup, ["alice", "bob", "carol"] * 6))
        assert values == ["alice@example.org", "bob@example.org", "carol@example.org"] * 6
    finally:
        for s in held:
            s.close()


def test_never_more_than_one_proxywrite_worker(instance):
    keys = [f"key{i}" for i in range(16)]
    instance.make_tables({k: f"value-{k}" for k in keys})
    instance.write_main_cf(max_use="4")         # also forces several writer generations
    instance.run_foreground()
    master = instance.master_pid()
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len([p for p in worker_pids(master, "proxywrite") if not gone(p)]))
            stop.wait(0.01)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(instance.delete, keys))
    finally:
        stop.set()
        watcher.join(10)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert max(seen) == 1
    for key in keys:
        assert instance.lookup(key, instance.write_table) is None


# -- reload ------------------------------------------------------------------------------------

def test_reload_under_load_keeps_the_socket_and_loses_no_request(instance):
    instance.run_foreground()
    path = instance.socket_path()
    inode = os.stat(path).st_ino
    old = {w["pid"] for w in instance.workers("proxymap")}
    failures = []
    done = threading.Event()
    count = [0]

    def client():
        while not done.is_set():
            result = instance.postmap("-q", "alice", f"proxy:{instance.read_table}")
            count[0] += 1
            if result.returncode != 0 or result.stderr.strip():
                failures.append(result.stderr or result.returncode)
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for generation in (1, 2):
            wait_for(lambda: count[0] >= 5 * generation, 30, what="lookups")
            instance.write_main_cf(max_idle=f"{100 + generation}s")
            result = instance.control("reload")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: instance.raw_status().get("generation") == generation, 10,
                     what="the new generation")
        wait_for(lambda: {w["generation"] for w in instance.workers("proxymap")} == {2}, 30,
                 what="old workers to retire")
        before = count[0]
        wait_for(lambda: count[0] >= before + 5, 30, what="lookups after reload")
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert not failures
    assert os.stat(path).st_ino == inode
    assert all(gone(pid) for pid in old)
    assert "reload -- configuration " + instance.config_dir in instance.log()


def test_five_reloads_under_eight_clients_with_a_table_dropped_midway(instance):
    """The issue's scenario: 8 clients loop real `postmap -q` lookups while
    the master reloads 5 times; at the third reload main.cf drops one table
    from proxy_read_maps. No client sees an error except the refusals of
    that table after it was dropped; old-generation workers exit; the
    listening socket's inode never changes."""
    instance.run_foreground()
    path = instance.socket_path()
    inode = os.stat(path).st_ino
    kept, dropped = instance.read_table, instance.write_table
    errors, refusals, answers = [], [], {"kept": 0, "dropped": 0}
    done = threading.Event()
    dropped_at = [None]

    def client(table, key, value, name):
        while not done.is_set():
            result = instance.postmap("-q", key, f"proxy:{table}")
            if result.returncode == 0 and result.stdout.strip() == value:
                answers[name] += 1
            elif (name == "dropped" and dropped_at[0] is not None and result.returncode == 1
                  and "proxymap service is not configured for table" in result.stderr):
                refusals.append(result.stderr)
            else:
                errors.append((name, result.returncode, result.stdout, result.stderr))
    threads = [threading.Thread(target=client, args=(kept, "alice", "alice@example.org", "kept"))
               for _ in range(4)]
    threads += [threading.Thread(target=client, args=(dropped, "k1", "v1", "dropped"))
                for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for generation in range(1, 6):
            before = dict(answers)
            wait_for(lambda: answers["kept"] >= before["kept"] + 4, 60, what="lookups")
            if generation == 3:
                dropped_at[0] = time.monotonic()
                instance.write_main_cf(proxy_read_maps=f"proxy:{kept}")
            else:
                instance.write_main_cf(max_idle=f"{100 + generation}s")
            result = instance.control("reload")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: instance.raw_status().get("generation") == generation, 20,
                     what="the new generation")
        wait_for(lambda: {w["generation"] for w in instance.workers("proxymap")} == {5}, 30,
                 what="old workers to retire")
        wait_for(lambda: len(refusals) >= 4, 60, what="refusals of the dropped table")
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert answers["kept"] > 20 and answers["dropped"] > 4 and refusals
    assert os.stat(path).st_ino == inode
    # every worker of the old generations is gone: only generation 5 serves
    assert {w["generation"] for w in instance.workers("proxymap")} == {5}


def test_reload_without_changes_keeps_the_workers(instance):
    instance.run_foreground()
    before = {w["pid"] for w in instance.workers("proxymap")}
    assert instance.control("reload").returncode == 0
    assert instance.raw_status()["generation"] == 1
    assert {w["pid"] for w in instance.workers("proxymap")} == before
    changed = instance.master_cf.replace("proxymap\n", "proxymap -o max_use=50\n", 1)
    instance.write_master_cf(changed)
    assert instance.control("reload").returncode == 0
    wait_for(lambda: before.isdisjoint(w["pid"] for w in instance.workers("proxymap")), 20,
             what="a changed service to get new workers")
    (writer,) = instance.workers("proxywrite")
    assert writer["generation"] == 0                  # its line did not change


def test_bad_configuration_at_reload_keeps_the_old_one(instance):
    instance.run_foreground()
    master = instance.master_pid()
    workers = {w["pid"] for w in instance.workers("proxymap")}
    instance.write_master_cf(instance.master_cf + "oops unix - - n - zz proxymap\n")
    result = instance.control("reload")
    assert result.returncode != 0
    assert f"{instance.config_dir}/master.cf: line 4:" in result.stderr
    assert not gone(master)
    assert {w["pid"] for w in instance.workers("proxymap")} == workers
    assert instance.raw_status()["generation"] == 0
    assert instance.lookup("alice") == "alice@example.org"
    assert "reload rejected" in instance.log()


def test_removed_service_is_closed_at_reload(instance):
    instance.run_foreground()
    writer = instance.workers("proxywrite")[0]["pid"]
    instance.write_master_cf("proxymap unix - - n - - proxymap\n")
    assert instance.control("reload").returncode == 0
    wait_for(lambda: gone(writer), 20, what="the proxywrite worker to exit")
    with pytest.raises(ConnectionRefusedError):
        greeting_of(instance.socket_path("proxywrite"))
    assert instance.lookup("alice") == "alice@example.org"


# -- failures --------------------------------------------------------------------------------------

def test_killed_worker_is_replaced(instance):
    instance.run_foreground()
    (victim,) = [w["pid"] for w in instance.workers("proxymap")]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: [w for w in instance.workers("proxymap", "ready") if w["pid"] != victim],
             20, what="a replacement worker")
    assert instance.lookup("carol") == "carol@example.org"
    assert f"pid {victim} killed by signal 9" in instance.log()
    assert "throttling" not in instance.log()


def test_workers_exit_when_the_master_is_killed(instance):
    proc = instance.run_foreground()
    held = hold_connections(instance.socket_path(), 2)
    try:
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # each notices the lost channel, closes its idle clients after
        # STOP_IDLE and exits: seconds, more on a loaded machine (15 s ran
        # out once under a load average of 19)
        wait_for(lambda: all(gone(w) for w in workers), 60, what="orphaned workers to exit")
    finally:
        for s in held:
            s.close()


def test_max_use_retires_a_worker(instance):
    instance.write_main_cf(max_use="2")
    instance.run_foreground()
    (first,) = [w["pid"] for w in instance.workers("proxymap")]
    assert instance.lookup("alice") == "alice@example.org"
    assert instance.lookup("bob") == "bob@example.org"
    wait_for(lambda: gone(first), 20, what="the used-up worker to exit")
    wait_for(lambda: instance.workers("proxymap", "ready"), 20, what="its successor")
    assert instance.lookup("carol") == "carol@example.org"
    assert f"pid {first}" not in instance.log()         # a clean exit is not logged


def test_max_idle_retires_extra_workers(instance):
    instance.write_main_cf(max_idle="1s")
    instance.run_foreground()
    held = hold_connections(instance.socket_path(), 10, busy=True)
    try:
        wait_for(lambda: len(instance.workers("proxymap")) >= 2, 20,
                 what="a second worker")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: len(instance.workers("proxymap")) == 1, 20,
             what="idle workers to be retired")
    assert instance.lookup("alice") == "alice@example.org"


def test_daemon_timeout_kills_a_stuck_worker(instance):
    instance.write_main_cf(daemon_timeout="2s")
    instance.run_foreground()
    (stuck,) = [w["pid"] for w in instance.workers("proxymap")]
    (client,) = hold_connections(instance.socket_path(), 1)
    try:
        wait_for(lambda: [w for w in instance.workers("proxymap") if w["clients"] == 1], 10,
                 what="the client to be reported")
        os.kill(stuck, signal.SIGSTOP)
        wait_for(lambda: gone(stuck), 20, what="the stuck worker to be killed")
        client.settimeout(10)
        assert client.recv(64) == b""                 # its client sees the connection close
        assert "daemon_timeout" in instance.log()
        wait_for(lambda: instance.workers("proxymap", "ready"), 20, what="a replacement")
        assert instance.lookup("alice") == "alice@example.org"
    finally:
        client.close()
        if not gone(stuck):
            os.kill(stuck, signal.SIGKILL)


def test_idle_connected_client_is_not_mistaken_for_a_hang(instance):
    instance.write_main_cf(daemon_timeout="1s")
    instance.run_foreground()
    (worker,) = [w["pid"] for w in instance.workers("proxymap")]
    (client,) = hold_connections(instance.socket_path(), 1)
    try:
        # pings go out every daemon_timeout/3 while a client is connected; six
        # answered pings span two daemon_timeout periods without a kill
        wait_for(lambda: [w for w in instance.workers("proxymap") if w["pings"] >= 6], 20,
                 what="pings to a worker with an idle client")
        assert [w["pid"] for w in instance.workers("proxymap")] == [worker]
        assert not gone(worker) and "killing" not in instance.log()
    finally:
        client.close()


def test_systemd_notifications(instance, tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        proc = instance.run_foreground(env={"NOTIFY_SOCKET": path})
        assert sock.recv(256).split(b"\n")[0] == b"READY=1"
        assert instance.control("reload").returncode == 0
        assert sock.recv(256).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert sock.recv(256).split(b"\n")[0] == b"READY=1"
        os.kill(proc.pid, signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(20) == 0
    assert "terminating on signal 15" in instance.log()


def test_stop_is_bounded_when_a_worker_does_not_cooperate(instance):
    instance.start()
    assert greeting_of(instance.socket_path("proxywrite")).startswith(b"protocol")  # starts it
    (writer,) = wait_for(lambda: [w["pid"] for w in instance.workers("proxywrite")], 20,
                         what="the proxywrite worker")
    os.kill(writer, signal.SIGSTOP)
    try:
        result = instance.control("stop")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: gone(writer), 10, what="the stopped worker to be killed")
    finally:
        if not gone(writer):
            os.kill(writer, signal.SIGKILL)


def test_load_configuration_forces_a_single_writer_and_checks_values(tmp_path):
    from proxymap.conventions.config_error import ConfigError
    from master.supervisor import load_configuration, service_settings
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path}/q\nmax_use = 7\n"
                                      f"mail_owner = {'postfix' if os.geteuid() == 0 else 'x'}\n")
    (tmp_path / "master.cf").write_text(
        "proxymap unix - - n - 5 proxymap -o max_idle=9s\n"
        "proxywrite unix - - n - 4 proxymap\n"
        "pickup unix n - n 60 1 pickup\n")
    config = load_configuration(str(tmp_path), warn=lambda _: None)
    assert [s.name for s in config.services] == ["proxymap", "proxywrite"]
    assert [s.name for s in config.skipped] == ["pickup"]
    reader, writer = (service_settings(config.main, s) for s in config.services)
    assert (reader.maxproc, reader.max_use, reader.max_idle) == (5, 7, 9)
    assert writer.maxproc == 1
    (tmp_path / "master.cf").write_text("proxymap unix - - n - - proxymap -o max_use=0\n")
    with pytest.raises(ConfigError, match="max_use"):
        load_configuration(str(tmp_path), warn=lambda _: None)


@pytest.mark.skipif(os.geteuid() != 0, reason="mail_owner is only checked as root")
def test_mail_owner_must_be_a_known_unprivileged_user(tmp_path):
    from proxymap.conventions.config_error import ConfigError
    from proxymap.conventions.main_cf import load_main_cf
    from master.supervisor import mail_owner_credentials
    for owner, reason in (("root", "privileged user ID"), ("no-such-user-x", "unknown user")):
        (tmp_path / "main.cf").write_text(f"mail_owner = {owner}\n")
        with pytest.raises(ConfigError, match=reason):
            mail_owner_credentials(load_main_cf(str(tmp_path), warn=lambda _: None))
    (tmp_path / "main.cf").write_text("mail_owner = postfix\n")
    assert mail_owner_credentials(load_main_cf(str(tmp_path))).user == "postfix"
