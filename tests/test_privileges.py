"""Privileges: workers run as mail_owner, never as root; file ownership.

Run as root only (as CI does). Each test creates a throw-away system
account `pmtest-XXXXXX`, makes it mail_owner, and removes it afterwards, so
a worker that kept root, or ran as the stock `postfix` account, cannot pass
by accident. Checked with psutil and /proc:

* every worker -- the first ones, a replacement for a killed one and a new
  generation after reload -- has that account's uid and gid as real,
  effective and saved ids, only its group in the supplementary list, and
  no capabilities;
* the master and its workers share no descriptor beyond stdin/out/err: no
  worker holds the lock file or a listening socket, the master holds no
  client connection and no table;
* the queue directories, sockets, pid/lock and status files have Postfix's
  owners and modes (docs/security.md; Postfix's master: private/ 0700,
  public/ 0710, sockets 0666, all owned by mail_owner) for that account.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import signal
import stat
import subprocess
import time

import psutil
import pytest

from tests.instance import needs_postmap, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="privilege tests need root"),
    needs_postmap,
]


@pytest.fixture
def pmuser():
    """A fresh system account (and its group), removed afterwards."""
    name = f"pmtest-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True, timeout=30)
    try:
        yield pwd.getpwnam(name)
    finally:
        for _ in range(50):        # exit 8: a process of the user is still exiting
            if subprocess.run(["userdel", name], capture_output=True,
                              timeout=30).returncode != 8:
                break
            time.sleep(0.1)
        try:
            subprocess.run(["groupdel", name], capture_output=True, timeout=30)
        except OSError:
            pass


@pytest.fixture
def owned(pmuser, instance):
    """The instance with the throw-away account as mail_owner, its tables
    owned by that account, and the master running in the foreground."""
    instance.write_main_cf(mail_owner=pmuser.pw_name)
    for name in os.listdir(instance.table_dir):
        os.chown(os.path.join(instance.table_dir, name), pmuser.pw_uid, pmuser.pw_gid)
    instance.run_foreground()
    return instance


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_unprivileged(pid: int, user: pwd.struct_passwd) -> None:
    proc = psutil.Process(pid)
    assert tuple(proc.uids()) == (user.pw_uid,) * 3
    assert tuple(proc.gids()) == (user.pw_gid,) * 3
    fields = proc_status(pid)
    assert {int(g) for g in fields["Groups"].split()} == {user.pw_gid}
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])


def worker_pids(instance, service: str) -> list[int]:
    return [w["pid"] for w in instance.workers(service)]


def descriptors(pid: int) -> dict[int, str]:
    """fd -> readlink target, fds 3 and up."""
    result = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        if int(name) >= 3:
            try:
                result[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:
                pass
    return result


def test_workers_run_as_mail_owner_never_root(owned, pmuser):
    instance = owned
    assert instance.lookup("alice") == "alice@example.org"
    assert instance.delete("k1").returncode == 0
    first = worker_pids(instance, "proxymap") + worker_pids(instance, "proxywrite")
    assert len(first) == 2
    for pid in first:
        assert_unprivileged(pid, pmuser)
    # a replacement for a killed worker drops privileges too
    (reader,) = worker_pids(instance, "proxymap")
    os.kill(reader, signal.SIGKILL)
    replacement = wait_for(lambda: [w["pid"] for w in instance.workers("proxymap", "ready")
                                    if w["pid"] != reader], 20, what="a replacement")
    assert_unprivileged(replacement[0], pmuser)
    # and so does a new generation after reload
    instance.write_main_cf(max_idle="77s")
    assert instance.control("reload").returncode == 0
    wait_for(lambda: {w["generation"] for w in instance.workers("proxymap")
                      + instance.workers("proxywrite")} == {1}, 30,
             what="the new generation")
    for pid in worker_pids(instance, "proxymap") + worker_pids(instance, "proxywrite"):
        assert_unprivileged(pid, pmuser)
    assert instance.lookup("bob") == "bob@example.org"
    # nothing else the master started runs as root
    master = psutil.Process(instance.master_pid())
    for child in master.children(recursive=True):
        try:
            assert child.uids().effective == pmuser.pw_uid, child.cmdline()
        except psutil.NoSuchProcess:
            pass


def test_master_and_workers_share_no_descriptor(owned):
    instance = owned
    for key in ("alice", "bob", "carol"):
        assert instance.lookup(key)
    assert instance.delete("k2").returncode == 0
    master_pid = instance.master_pid()
    master = descriptors(master_pid)
    pid_file = os.path.join(instance.queue_dir, "pid", "proxymap-master.pid")
    assert pid_file in master.values()                   # the master holds the lock
    # the master never opens a table or keeps a client: besides its own
    # files it holds one listener per service and one channel per worker
    assert not [t for t in master.values() if t.startswith(instance.table_dir)]
    workers = worker_pids(instance, "proxymap") + worker_pids(instance, "proxywrite")
    wait_for(lambda: all(w["clients"] == 0 for w in instance.workers("proxymap")
                         + instance.workers("proxywrite")), 10, what="clients to leave")
    master = descriptors(master_pid)
    sockets = [t for t in master.values() if t.startswith("socket:")]
    assert len(sockets) == 2 + len(workers), master
    shared_ok = lambda t: t.startswith("anon_inode:")     # noqa: E731 (one inode for all epolls)
    for pid in workers:
        mine = descriptors(pid)
        assert pid_file not in mine.values()
        common = set(mine.values()) & set(master.values())
        assert not [t for t in common if not shared_ok(t)], (pid, common)


def test_directories_sockets_and_lock_files_belong_to_the_right_accounts(owned, pmuser):
    instance = owned
    queue, uid, gid = instance.queue_dir, pmuser.pw_uid, pmuser.pw_gid

    def check(path, mode, owner, group=None, kind=None):
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
        assert st.st_uid == owner, (path, st.st_uid)
        if group is not None:
            assert st.st_gid == group, (path, st.st_gid)
        if kind is not None:
            assert kind(st.st_mode), path

    check(os.path.join(queue, "private"), 0o700, uid, gid, stat.S_ISDIR)
    try:
        public_group = grp.getgrnam("postdrop").gr_gid          # setgid_group
    except KeyError:
        public_group = None
    check(os.path.join(queue, "public"), 0o710, uid, public_group, stat.S_ISDIR)
    for service in ("proxymap", "proxywrite"):
        check(instance.socket_path(service), 0o666, uid, gid, stat.S_ISSOCK)
    check(os.path.join(queue, "pid"), 0o755, 0, None, stat.S_ISDIR)
    check(os.path.join(queue, "pid", "proxymap-master.pid"), 0o600, 0, None, stat.S_ISREG)
    check(os.path.join(queue, "pid", "proxymap-master.status"), 0o644, 0, None, stat.S_ISREG)
    check(instance.data_dir, 0o700, uid, gid, stat.S_ISDIR)
    # mail_owner cannot read the lock file or replace the status file
    probe = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "sh", "-c",
         f"cat {queue}/pid/proxymap-master.pid; touch {queue}/pid/x"],
        capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    assert not os.path.exists(os.path.join(queue, "pid", "x"))
