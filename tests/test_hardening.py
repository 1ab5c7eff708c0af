"""Attacks of issue 9, each rerun against a standalone worker (or a master).

Every test here failed on the code before the fix it names:
* pipelined lookups of a huge value, never read: worker memory bounded,
  replies made as the client drains them (proxymap/server.py);
* a flood of NUL bytes: a bounded number of BAD replies and log lines,
  then the connection is closed;
* a table name that is not UTF-8: refused and logged, escaped;
* maillog_file through a symlink, or outside maillog_file_prefixes:
  refused with a one-line fatal, nothing written to the link's target.
Figures (RSS, log lines) are printed for docs/security.md.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

import pytest

from proxymap.client import read_greeting
from proxymap.protocol import GREETING, Decoder, encode
from worker_fixture import WorkerInstance, RawClient

BIG = 1_000_000     # bytes in the huge value
PIPELINED = 400     # lookups of it sent at once, never read meanwhile


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


def wait_until(cond, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lookup_bytes(table: str, key: str) -> bytes:
    return encode([("request", "lookup"), ("table", table), ("flags", 0), ("key", key)])


@pytest.fixture
def big(tmp_path):
    inst = WorkerInstance(tmp_path, read_maps=f"proxy:hash:{tmp_path}/big proxy:inline:{{a=b}}",
                    extra="ipc_timeout = 60s")
    with open(f"{tmp_path}/big", "w") as f:
        f.write("k " + "v" * BIG + "\nsmall s\n")
    assert inst.postmap(f"hash:{tmp_path}/big").returncode == 0
    proc = inst.start()
    yield inst, proc, f"hash:{tmp_path}/big"
    inst.stop()


def served(inst) -> bool:
    c = RawClient(inst.socket_path())
    try:
        return c.request(request="lookup", table="inline:{a=b}", flags=0, key="a") == \
            {b"status": b"0", b"value": b"b"}
    finally:
        c.close()


def test_pipelined_huge_replies_keep_worker_memory_bounded(big):
    """Issue 9 attack 1: 400 lookups of a 1 MB value in one 31 KB write.
    Before: the worker answered all of them in one read (+400 MB RSS)."""
    inst, proc, table = big
    # warm up: the table is open and one huge reply has been made once
    c = RawClient(inst.socket_path())
    assert len(c.request(request="lookup", table=table, flags=0, key="k")[b"value"]) == BIG
    c.close()
    before = proc_status(proc.pid)
    attacker = RawClient(inst.socket_path())
    attacker.send(lookup_bytes(table, "k") * PIPELINED)
    # the worker has read our requests once it starts replying
    assert select.select([attacker.sock], [], [], 20)[0]
    assert served(inst)          # and it went round its loop since
    during = proc_status(proc.pid)
    # now read everything: replies are produced as we drain them
    got, decoder = 0, Decoder(max_attrs=8, max_message=BIG * 2)
    while got < PIPELINED:
        data = attacker.sock.recv(1 << 20)
        assert data, "server closed the connection"
        for attrs in decoder.feed(data):
            assert attrs == [(b"status", b"0"), (b"value", b"v" * BIG)]
            got += 1
    attacker.close()
    wait_until(lambda: served(inst), "a fresh client to be served")
    after = proc_status(proc.pid)
    growth_peak = after["VmHWM"] - before["VmHWM"]
    print(f"\nFIGURES pipelined huge replies: RSS before {before['VmRSS']} KiB, "
          f"while pipelined {during['VmRSS']} KiB, after {after['VmRSS']} KiB, "
          f"peak growth {growth_peak} KiB")
    assert during["VmHWM"] - before["VmHWM"] < 16 * 1024
    assert growth_peak < 16 * 1024
    assert after["VmRSS"] - before["VmRSS"] < 8 * 1024


def test_pipelining_beyond_the_bound_is_answered_in_order(tmp_path):
    """A client pipelining far beyond proxymap_max_pipelined_requests gets
    every answer, in order, with no reply made before the previous ones
    were drained beyond the bound."""
    inst = WorkerInstance(tmp_path, read_maps="proxy:inline:{a=1,b=2}",
                    extra="proxymap_max_pipelined_requests = 2\n"
                          "proxymap_max_unsent_reply_bytes = 16")
    inst.start()
    try:
        c = RawClient(inst.socket_path())
        keys = ["a", "b", "c"] * 300
        c.send(b"".join(lookup_bytes("inline:{a=1,b=2}", k) for k in keys))
        values = [dict(c.read())[b"value"] for _ in keys]
        assert values == [{"a": b"1", "b": b"2", "c": b""}[k] for k in keys]
    finally:
        inst.stop()


def test_nul_flood_gets_bounded_replies_and_log_lines(tmp_path):
    """Issue 9 attack 4: 1,000,000 NUL bytes. Before: one BAD reply and one
    warning per NUL (~400,000 log lines). Now: proxymap_max_bad_requests
    BAD replies, three warnings and one summary, then the connection closes."""
    inst = WorkerInstance(tmp_path, read_maps="proxy:inline:{a=b}")
    inst.start()
    try:
        c = RawClient(inst.socket_path())
        c.sock.settimeout(20)
        try:
            c.send(b"\0" * 1_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = 0
        try:
            while True:
                data = c.sock.recv(65536)
                if not data:
                    break
                replies += len(c.decoder.feed(data))
        except ConnectionResetError:
            pass
        assert served(inst)
        log = inst.log().splitlines()
        bad_lines = [line for line in log if "bad request" in line]
        print(f"\nFIGURES NUL flood: {replies} BAD replies, {len(log)} log lines "
              f"({sum(len(x) + 1 for x in log)} bytes) for 1,000,000 bytes sent")
        assert replies == 10
        assert len(bad_lines) == 4
        assert "10 bad requests (7 more not logged): closing the connection" in bad_lines[-1]
        assert len(log) < 20
    finally:
        inst.stop()


def test_bad_request_limit_zero_never_closes(tmp_path):
    inst = WorkerInstance(tmp_path, read_maps="proxy:inline:{a=b}",
                    extra="proxymap_max_bad_requests = 0")
    inst.start()
    try:
        c = RawClient(inst.socket_path())
        c.send(b"\0" * 100)
        for _ in range(100):
            assert c.read() == [(b"status", b"3")]
        assert c.request(request="lookup", table="inline:{a=b}", flags=0, key="a")[b"value"] == b"b"
    finally:
        inst.stop()


def start_logging_worker(inst, maillog_file, prefixes):
    """A worker that logs to maillog_file (no --stderr); its stderr goes to
    inst.log_path. Returns the Popen once it answers or has exited."""
    inst.write_main_cf(read_maps="proxy:inline:{a=b}",
                       extra=f"maillog_file = {maillog_file}\nmaillog_file_prefixes = {prefixes}")
    with open(inst.log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "proxymap.server", "-c", inst.config_dir,
                                 "-n", "proxymap", "--listen", inst.socket_path()],
                                stdout=logf, stderr=logf)
    inst.procs.append(proc)

    def up():
        if proc.poll() is not None:
            return True
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(inst.socket_path())
                return True
        except OSError:
            return False
    wait_until(up, "the worker to answer or exit")
    return proc


def test_invalid_utf8_table_name_is_refused_and_logged(tmp_path):
    """Issue 9 attack 5: before, the refusal of `hash:/etc/secret\\xff` was
    lost to the log file's encoding error."""
    inst = WorkerInstance(tmp_path)
    logfile = f"{tmp_path}/maillog"
    start_logging_worker(inst, logfile, str(tmp_path))
    try:
        c = RawClient(inst.socket_path())
        c.send(b"request\0lookup\0table\0hash:/etc/secret\xff\0flags\x000\0key\0k\0\0")
        assert dict(c.read())[b"status"] == b"4"
        assert served(inst)
        wait_until(lambda: "secret" in open(logfile, errors="replace").read(), "the log line")
        text = open(logfile, "rb").read()
        assert b'request for unapproved table: "hash:/etc/secret\\xff"' in text
        assert b"proxy:hash:/etc/secret\\xff in proxy_read_maps" in text
    finally:
        inst.stop()


def test_symlinked_maillog_file_is_refused(tmp_path):
    """Issue 9 attack 2: a symlink at maillog_file (a world-writable log
    directory) pointing at a file elsewhere. Before: log lines were
    appended to the target. Now: a fatal and the target untouched."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    os.chmod(logdir, 0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, logdir / "maillog")
    inst = WorkerInstance(tmp_path)
    try:
        proc = start_logging_worker(inst, logdir / "maillog", str(tmp_path))
        assert proc.wait(10) == 1
    finally:
        inst.stop()
    assert victim.read_text() == "precious\n"
    assert f"fatal: open logfile '{logdir}/maillog': file is a symbolic link" in inst.log()
    assert "Traceback" not in inst.log()


def test_hard_linked_maillog_file_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "maillog")
    inst = WorkerInstance(tmp_path)
    try:
        proc = start_logging_worker(inst, tmp_path / "maillog", str(tmp_path))
        assert proc.wait(10) == 1
    finally:
        inst.stop()
    assert victim.read_text() == "precious\n"
    assert "file has 2 hard links" in inst.log()


def test_maillog_file_outside_the_prefixes_is_refused(tmp_path):
    inst = WorkerInstance(tmp_path)
    try:
        proc = start_logging_worker(inst, tmp_path / "maillog", "/var, /dev/stdout")
        assert proc.wait(10) == 1
    finally:
        inst.stop()
    assert not (tmp_path / "maillog").exists()
    assert (f"fatal: maillog_file value '{tmp_path}/maillog' does not match any prefix "
            f"in maillog_file_prefixes") in inst.log()


def test_maillog_file_is_created_private_and_used(tmp_path):
    inst = WorkerInstance(tmp_path)
    start_logging_worker(inst, tmp_path / "maillog", f"/nowhere, {tmp_path}")
    try:
        assert served(inst)
        wait_until(lambda: (tmp_path / "maillog").exists()
                   and "listening on" in (tmp_path / "maillog").read_text(), "a log line")
        assert os.stat(tmp_path / "maillog").st_mode & 0o777 == 0o600
    finally:
        inst.stop()


def drain(decoder: Decoder, data: bytes, limit: int) -> list:
    out = decoder.feed(data, limit)
    assert len(out) <= limit
    while decoder.more:
        more = decoder.feed(b"", limit)
        assert len(more) <= limit
        out += more
    return out


def test_decoder_limit_returns_the_same_lists_in_order():
    """feed() with a limit, drained with feed(b"", limit), sees exactly the
    lists (and the errors) an unlimited feed() sees, however cut."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from proxymap.protocol import ProtocolError

    token = st.sampled_from([b"", b"request", b"lookup", b"k", b"x" * 40])
    stream = st.lists(st.tuples(token, st.booleans()), max_size=60).map(
        lambda parts: b"".join(t + (b"\0" if nul else b"") for t, nul in parts))

    @settings(max_examples=300, deadline=None)
    @given(stream, st.integers(1, 5), st.lists(st.integers(0, 400), max_size=4))
    def check(data, limit, cuts):
        def run(lim):
            d, got = Decoder(max_attrs=4, max_message=100), []
            pieces, last = [], 0
            for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
                pieces.append(data[last:cut])
                last = cut
            try:
                for piece in pieces:
                    got += drain(d, piece, lim) if lim else d.feed(piece)
            except ProtocolError as exc:
                return got, str(exc)
            return got, bytes(d.buf)
        assert run(limit) == run(0)
    check()


# -- a lock holder cannot stall the other clients (issue 9 attack 3) ---------------

def count_served_while_waiting(waiter, other, limit=30.0) -> int:
    """Lookups of an unrelated table answered to `other` before `waiter`'s
    reply arrives (bounded by `limit` seconds)."""
    count, deadline = 0, time.monotonic() + limit
    while not select.select([waiter.sock], [], [], 0)[0]:
        assert time.monotonic() < deadline, "the waiting request was never answered"
        assert other.request(request="lookup", table="inline:{a=b}", flags=0, key="a") == \
            {b"status": b"0", b"value": b"b"}
        count += 1
    return count


@pytest.mark.parametrize("holder", ["proxywrite-open-lock", "rebuild-flock"])
def test_lock_holder_does_not_stall_other_clients(tmp_path, holder):
    """While another process holds a table's lock, a LOCK lookup of that
    table waits (bounded, then RETRY) and other clients of the same read
    worker are answered meanwhile. Before: the worker slept in flock for
    1 s, and every other client waited with it (at most one or two answers
    in that second); and a proxywrite OPEN_LOCK instance kept its lock
    after its only client had left, so that RETRY went on for good."""
    import fcntl

    from proxymap import dictflags as F
    table = f"hash:{tmp_path}/shared"
    with open(f"{tmp_path}/shared", "w") as f:
        f.write("k v\n")
    inst = WorkerInstance(tmp_path, read_maps=f"proxy:{table} proxy:inline:{{a=b}}",
                    write_maps=f"proxy:{table}")
    assert inst.postmap(table).returncode == 0
    inst.start("proxymap")
    inst.start("proxywrite")
    try:
        if holder == "proxywrite-open-lock":
            lock_holder = RawClient(inst.socket_path("proxywrite"))
            assert lock_holder.request(request="open", table=table,
                                       flags=F.OPEN_LOCK)[b"status"] == b"0"
            release = lock_holder.close
        else:   # what postmap does while it rebuilds the file
            fd = os.open(f"{tmp_path}/shared.db", os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            release = lambda: os.close(fd)   # noqa: E731
        waiter = RawClient(inst.socket_path())
        other = RawClient(inst.socket_path())
        waiter.send(lookup_bytes(table, "k").replace(b"flags\x000", b"flags\x00%d" % F.LOCK))
        count = count_served_while_waiting(waiter, other)
        assert dict(waiter.read())[b"status"] == b"2"      # RETRY after the bounded wait
        print(f"\nFIGURES lock held ({holder}): {count} lookups of another table answered "
              f"while one LOCK lookup waited")
        assert count >= 20
        assert "table is locked by another process (waited 1s)" in inst.log()
        release()

        def answered_ok():
            reply = waiter.request(request="lookup", table=table, flags=F.LOCK, key="k")
            return reply == {b"status": b"0", b"value": b"v"}
        wait_until(answered_ok, "the lock to be given back", limit=15)
    finally:
        inst.stop()


# -- idle connections and the descriptor limit (issue 9, "also seen") --------------

def greeted_or_closed(path: str, timeout: float = 10.0):
    """Connect; 'greeted' (the socket, kept open), 'closed', or 'waiting'
    when neither happened within `timeout` (the failure this guards)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if len(read_greeting(sock)) < len(GREETING):
            sock.close()
            return "closed", None
        return "greeted", sock
    except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
        sock.close()
        return "closed", None
    except socket.timeout:
        sock.close()
        return "waiting", None


def service_rss_kib(master_pid: int) -> int:
    import psutil
    master = psutil.Process(master_pid)
    return sum(p.memory_info().rss for p in [master] + master.children()) // 1024


IDLE_CLIENTS = 3000


def test_idle_connections_do_not_add_workers(tmp_path):
    """3,000 idle clients (greeted, then silent, as Postfix daemons keep
    their connections). Before: a worker per 32 idle clients (31 workers,
    684 MB in the issue's run). Now: the one worker holds them all, at
    about a kilobyte each (C's proxymap: one process, 44 MB)."""
    import resource

    from tests.instance import temporary_instance
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE_CLIENTS + 200:
        pytest.skip(f"descriptor limit {hard} too low for {IDLE_CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # max_use high: retiring a worker every 100 clients would add workers
    # too; the default busy threshold (the instance's 4 is within reach of
    # the few connections in transit between master and worker)
    with temporary_instance(tmp_path, main_extra={
            "max_use": "1000000", "proxymap_worker_busy_clients": "32"}) as inst:
        inst.run_foreground()
        master = inst.master_pid()
        before = service_rss_kib(master)
        held = []
        try:
            for _ in range(IDLE_CLIENTS):
                state, sock = greeted_or_closed(inst.socket_path())
                assert state == "greeted"
                held.append(sock)
            wait_until(lambda: sum(w["clients"] for w in inst.workers("proxymap"))
                       == IDLE_CLIENTS, "the worker to report every client")
            workers = inst.workers("proxymap")
            during = service_rss_kib(master)
            print(f"\nFIGURES idle clients: {IDLE_CLIENTS} idle connections on "
                  f"{len(workers)} proxymap worker(s); master+workers RSS {before} -> "
                  f"{during} KiB ({(during - before) * 1024 // IDLE_CLIENTS} bytes per client)")
            assert len(workers) == 1
            assert during - before < 24 * 1024
            assert inst.lookup("alice") == "alice@example.org"
        finally:
            for sock in held:
                sock.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_clients_beyond_the_descriptor_limit_are_closed_at_once(tmp_path):
    """At a 64-descriptor limit, 200 clients connecting and staying: each is
    greeted or closed at once, none left waiting; the limit is logged once
    per process, not once per client. Before: clients were left in the
    listen queue, never greeted nor closed, and every one logged a line."""
    import resource

    from tests.instance import temporary_instance

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    with temporary_instance(tmp_path, main_extra={"default_process_limit": "2",
                                                  "max_use": "1000000"}) as inst:
        inst.run_foreground(preexec_fn=limit)
        held, states = [], {"greeted": 0, "closed": 0, "waiting": 0}
        try:
            for _ in range(200):
                state, sock = greeted_or_closed(inst.socket_path(), timeout=5)
                states[state] += 1
                if sock is not None:
                    held.append(sock)
            log = inst.log().splitlines()
            limit_lines = [line for line in log if "descriptor" in line
                           or "Too many open files" in line]
            print(f"\nFIGURES descriptor limit 64: of 200 clients {states}; "
                  f"{len(limit_lines)} log lines about the limit")
            assert states["waiting"] == 0
            assert states["closed"] > 0 and states["greeted"] > 0
            assert 1 <= len(limit_lines) <= 4
        finally:
            for sock in held:
                sock.close()
        # once the clients are gone, service is normal again
        wait_until(lambda: inst.lookup("alice") == "alice@example.org", "service again")


def test_master_refuses_a_symlinked_maillog_file_at_check_start_and_reload(tmp_path):
    """The master (root) opens maillog_file for itself and its workers:
    `check` and `start` fail with the reason, and a reload after the file
    was replaced by a symlink keeps the file already open, with an error."""
    from tests.instance import temporary_instance, wait_for
    with temporary_instance(tmp_path) as inst:
        logdir = os.path.join(inst.root, "logs")
        os.mkdir(logdir)
        os.chmod(logdir, 0o1777)
        victim = os.path.join(inst.root, "victim")
        with open(victim, "w") as f:
            f.write("precious\n")
        maillog = os.path.join(logdir, "maillog")
        os.symlink(victim, maillog)
        inst.write_main_cf(maillog_file=maillog, maillog_file_prefixes=inst.root)
        reason = f"open logfile '{maillog}': file is a symbolic link"
        check = inst.control("check")
        assert check.returncode != 0 and reason in check.stderr
        start = inst.control("start")
        assert start.returncode != 0 and reason in start.stderr + start.stdout
        assert "Traceback" not in start.stderr
        assert open(victim).read() == "precious\n"
        # a regular file: start; then the attacker swaps in a symlink and
        # the administrator reloads (log rotation)
        os.unlink(maillog)
        inst.start()
        wait_for(lambda: "daemon started" in open(maillog).read(), 20, what="the log")
        os.rename(maillog, maillog + ".1")
        os.symlink(victim, maillog)
        reload = inst.control("reload")         # checks first, and refuses
        assert reload.returncode != 0 and reason in reload.stderr
        import signal
        os.kill(inst.master_pid(), signal.SIGHUP)  # the master's own check
        wait_for(lambda: reason in open(maillog + ".1").read(), 20, what="the refusal")
        assert inst.lookup("alice") == "alice@example.org"
        assert open(victim).read() == "precious\n"


# -- disk full (issue 9 attack 6) --------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs of the test's own (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def stored_records(inst, table: str) -> dict[str, str]:
    """Every record of `table` as real `postmap -s` lists it."""
    result = inst.postmap("-s", table)
    assert result.returncode == 0, result.stderr
    out = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition("\t")
        out[key] = value
    return out


@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_disk_full_leaves_a_sound_file_and_no_retry_answered_update(tmp_path, small_fs, kind):
    """Updates through proxywrite until the 2 MB filesystem is full, then
    some more. Before (btree): db5.3_verify failed after space was freed,
    and updates answered RETRY were stored all the same. Now: RETRY once
    full, every update answered OK is there, every one answered RETRY is
    not, the file verifies, and updates work again once there is space."""
    table = f"{kind}:{small_fs}/t"
    with open(f"{small_fs}/t", "w") as f:
        f.write("seed s\n")
    inst = WorkerInstance(tmp_path, read_maps=f"proxy:{table}", write_maps=f"proxy:{table}")
    assert inst.postmap(table).returncode == 0
    inst.start("proxywrite")
    try:
        c = RawClient(inst.socket_path("proxywrite"))
        acked, refused = {}, set()
        for i in range(20000):
            key, value = f"key{i:05d}", f"{i:05d}" + "v" * 995
            status = c.request(request="update", table=table, flags=0, key=key,
                               value=value)[b"status"]
            assert status in (b"0", b"2"), status
            if status == b"0":
                acked[key] = value
            else:
                refused.add(key)
                if len(refused) >= 50:
                    break
        print(f"\nFIGURES disk full ({kind}, 2 MB): {len(acked)} updates OK, then "
              f"{len(refused)} answered RETRY")
        assert refused and acked
        assert f"{small_fs}/t" in inst.log()        # each refusal says why
        # space comes back: the same worker takes updates again
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        assert c.request(request="update", table=table, flags=0, key="after",
                         value="space")[b"status"] == b"0"
        c.close()
    finally:
        inst.stop()
    if kind != "lmdb":
        verify = subprocess.run(["db5.3_verify", f"{small_fs}/t.db"], capture_output=True)
        assert verify.returncode == 0, verify.stderr
    records = stored_records(inst, table)
    assert records.get("after") == "space" and records.get("seed") == "s"
    missing = [k for k, v in acked.items() if records.get(k) != v]
    stored_anyway = sorted(refused & records.keys())
    assert missing == []
    assert stored_anyway == []
