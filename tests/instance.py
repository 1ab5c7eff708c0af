"""A throw-away Postfix-style instance for tests: config dir, queue, tables.

`make_instance(base)` writes a main.cf (queue_directory, data_directory,
mail_owner, proxy_read_maps/proxy_write_maps) and a master.cf with the
`proxymap` and `proxywrite` services, and builds a `hash:` table (read
side) and a `btree:` table (write side) with the real postmap (POSTMAP).
Helpers run real postmap against it and start/stop our master by pid.

When the tests run as root, workers drop privileges to `postfix`, which
cannot enter pytest's 0700 temporary directories; the `instance_base`
helper then makes a world-traversable directory under /tmp instead, which
the fixture removes afterwards.

The `instance` fixture (tests/conftest.py) gives a test one:

    def test_x(instance):
        instance.start()
        assert instance.lookup("alice") == "alice@example.org"
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from master.pidfile import pid_alive, pid_path, read_pid
from proxymap.client import read_greeting
from proxymap.conventions.installed_postfix import postfix_program
from proxymap.conventions.service_sockets import service_socket_path
from proxymap.protocol import Decoder, encode

#: the real postmap(1) that builds tables and answers as Postfix does
POSTMAP = postfix_program("postmap")
needs_postmap = pytest.mark.skipif(POSTMAP is None, reason="needs Postfix's postmap")
BIN = os.path.dirname(sys.executable)
MASTER = os.path.join(BIN, "proxymap-master")

READ_ENTRIES = {"alice": "alice@example.org", "bob": "bob@example.org",
                "carol": "carol@example.org"}
WRITE_ENTRIES = {"k1": "v1", "k2": "v2", "k3": "v3"}

MASTER_CF = """\
# service   type  private unpriv  chroot  wakeup  maxproc command
proxymap    unix  -       -       n       -       -       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
"""


def wait_for(condition, timeout: float = 20.0, step: float = 0.05, what: str = "condition"):
    """Poll until `condition()` returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def lookup_on(sock: socket.socket, table: str, key: bytes) -> list:
    """One lookup (flags 64) on a connected, greeted raw socket: the reply's
    attribute list."""
    sock.sendall(encode([("request", "lookup"), ("table", table), ("flags", 64),
                         ("key", key)]))
    decoder = Decoder()
    while True:
        data = sock.recv(4096)
        assert data, "connection closed before the reply"
        replies = decoder.feed(data)
        if replies:
            return replies[0]


def mail_owner() -> str:
    return "postfix" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def greeting_of(path: str, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        return read_greeting(sock)


class MasterInstance:
    def __init__(self, root: str, main_extra: dict | None = None, master_cf: str = MASTER_CF):
        self.root = root
        self.config_dir = os.path.join(root, "etc")
        self.queue_dir = os.path.join(root, "queue")
        self.data_dir = os.path.join(root, "data")
        self.table_dir = os.path.join(root, "tables")
        self.log_path = os.path.join(root, "master.log")
        self.read_table = f"hash:{self.table_dir}/read"
        self.write_table = f"btree:{self.table_dir}/write"
        self.main_extra = dict(main_extra or {})
        self.master_cf = master_cf
        self.procs: list[subprocess.Popen] = []
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.table_dir, exist_ok=True)
        self.write_main_cf()
        self.write_master_cf(master_cf)
        self.make_tables()

    # -- configuration -------------------------------------------------------------

    def main_settings(self) -> dict:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": mail_owner(),
            "proxy_read_maps": f"proxy:{self.read_table} proxy:{self.write_table}",
            "proxy_write_maps": f"proxy:{self.write_table}",
            # several workers with a handful of clients, so that tests see
            # connections spread (the default, 32, keeps workers few)
            "proxymap_worker_busy_clients": "4",
        }
        settings.update(self.main_extra)
        return settings

    def write_main_cf(self, **extra) -> None:
        self.main_extra.update(extra)
        text = "".join(f"{k} = {v}\n" for k, v in self.main_settings().items())
        self._replace("main.cf", text)

    def write_master_cf(self, text: str) -> None:
        self.master_cf = text
        self._replace("master.cf", text)

    def _replace(self, name: str, text: str) -> None:
        """Swap in a new file atomically and back-date it: Postfix clients
        re-read a file modified within the last second and then warn about
        every changed entry ("overriding earlier entry")."""
        path = os.path.join(self.config_dir, name)
        with open(path + ".new", "w") as f:
            f.write(text)
        past = time.time() - 5
        os.utime(path + ".new", (past, past))
        os.replace(path + ".new", path)

    def make_tables(self, write_entries: dict | None = None) -> None:
        """(Re)build both tables with real postmap; `write_entries` replaces
        the default content of the write table."""
        for spec, entries in ((self.read_table, READ_ENTRIES),
                              (self.write_table, write_entries or WRITE_ENTRIES)):
            source = spec.split(":", 1)[1]
            with open(source, "w") as f:
                f.write("".join(f"{k} {v}\n" for k, v in entries.items()))
            self.postmap(spec, check=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(mail_owner())
            for name in os.listdir(self.table_dir):
                os.chown(os.path.join(self.table_dir, name), owner.pw_uid, owner.pw_gid)
            os.chown(self.table_dir, owner.pw_uid, owner.pw_gid)

    def socket_path(self, service: str = "proxymap") -> str:
        return service_socket_path(self.queue_dir, service)

    # -- real Postfix client -------------------------------------------------------

    def postmap(self, *args, check: bool = False, timeout: float = 30.0):
        return subprocess.run([POSTMAP, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def lookup(self, key: str, table: str | None = None) -> str | None:
        """`postmap -q KEY proxy:TABLE`: the value, None for not found;
        AssertionError on any postmap error."""
        result = self.postmap("-q", key, f"proxy:{table or self.read_table}")
        if result.returncode == 0:
            return result.stdout.rstrip("\n")
        assert result.returncode == 1 and not result.stderr.strip(), result.stderr
        return None

    def delete(self, key: str, table: str | None = None) -> subprocess.CompletedProcess:
        return self.postmap("-d", key, f"proxy:{table or self.write_table}")

    # -- our master ------------------------------------------------------------------

    def control(self, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([MASTER, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> int:
        """`proxymap-master start`; returns the master pid."""
        result = self.control("start")
        assert result.returncode == 0, result.stderr
        return self.master_pid()

    def run_foreground(self, env: dict | None = None, wait: bool = True,
                       preexec_fn=None) -> subprocess.Popen:
        """`proxymap-master run --stderr` with its log in self.log_path; with
        `wait`, returns once both services greet. `preexec_fn` runs in the
        child before exec (e.g. to set a resource limit). Greeting both
        services starts proxywrite's worker (started on demand): tests
        that want the fresh "no worker" state use start()."""
        log = open(self.log_path, "ab")
        proc = subprocess.Popen([MASTER, "-c", self.config_dir, "run", "--stderr"],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        log.close()
        self.procs.append(proc)
        if not wait:
            return proc

        def serving():
            if proc.poll() is not None:
                raise AssertionError(f"master exited with {proc.returncode}: {self.log()}")
            try:
                return all(greeting_of(self.socket_path(s), 1.0).startswith(b"protocol")
                           for s in ("proxymap", "proxywrite"))
            except OSError:
                return False
        wait_for(serving, 30, what="the master to serve")
        # the greeting started proxywrite's worker (on demand): wait until
        # the status file was written after both greetings were handed over,
        # so that it lists the worker (tests look workers up there)
        wait_for(lambda: all(self.raw_status().get("services", {}).get(s, {}).get("handed")
                             for s in ("proxymap", "proxywrite")),
                 30, what="the status file to show both greetings handed over")
        return proc

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        return read_pid(pid_path(self.queue_dir))

    def status(self) -> dict:
        result = self.control("status", "--json")
        return json.loads(result.stdout)

    def raw_status(self) -> dict:
        """The status file the master rewrites (no psutil, cheap to poll)."""
        try:
            with open(os.path.join(self.queue_dir, "pid", "proxymap-master.status")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def workers(self, service: str = "proxymap", state: str | None = None) -> list[dict]:
        workers = self.raw_status().get("services", {}).get(service, {}).get("workers", [])
        return [w for w in workers if state is None or w["state"] == state]

    def stop(self) -> None:
        """Stop whatever master runs on this instance, then kill any leftover
        process by pid (never by name)."""
        pid = self.master_pid()
        if pid and pid_alive(pid):
            self.control("stop", timeout=60)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        pid = self.master_pid()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def instance_base(tmp_path) -> tuple[str, bool]:
    """(directory, remove_afterwards): tmp_path, or a 0755 directory under
    /tmp when running as root (workers run as postfix and must reach it)."""
    if os.geteuid() != 0:
        return str(tmp_path), False
    root = tempfile.mkdtemp(prefix="proxymap-test-", dir="/tmp")
    os.chmod(root, 0o755)
    return root, True


def kill_leftover_workers(root: str) -> None:
    """Last resort: SIGKILL workers started for this instance (found by their
    -c argument, then killed by pid)."""
    import psutil
    etc = os.path.join(root, "etc")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or []).split()
        if etc in cmdline and proc.info["pid"] != os.getpid():
            try:
                os.kill(proc.info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def temporary_instance(tmp_path, **kwargs):
    """A MasterInstance (kwargs as for MasterInstance) that is stopped, cleared of any
    leftover worker and removed when the block ends."""
    root, remove = instance_base(tmp_path)
    inst = MasterInstance(root, **kwargs)
    try:
        yield inst
    finally:
        try:
            inst.stop()
        finally:
            kill_leftover_workers(root)
            if remove:
                shutil.rmtree(root, ignore_errors=True)

