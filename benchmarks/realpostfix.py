"""A private instance of the real Postfix 3.7 serving only proxymap and
proxywrite (the C proxymap from the Debian package).

Mirrors what `postfix -c DIR start` needs for a second master on one
machine: an absolute config path, its own queue_directory (the master
locks `$queue_directory/pid/master.pid`) and data_directory (owned by
mail_owner, which also must be able to write `private/`). `postfix check`
runs first so permission problems show up as one clear error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from benchmarks.servers import ServerInstance, kill_leftovers
from master.control import socket_missing
from master.pidfile import pid_alive, read_pid
from proxymap.client import check_greeting

POSTFIX = "/usr/sbin/postfix"


def refuse_without_root(program: str) -> bool:
    """True (with a fatal line on stderr) when not run as root: real
    Postfix's master must be started by root."""
    if os.geteuid() == 0:
        return False
    print(f"{program}: fatal: run as root (real Postfix's master must be started by root)",
          file=sys.stderr)
    return True


class StartError(Exception):
    """A service did not come up; the message says why."""


def failure_status(exc: BaseException) -> int:
    """A benchmark's exit status for a failed start (1) or ^C/SIGTERM (130),
    with its one-line message."""
    if isinstance(exc, StartError):
        print(f"bench: fatal: {exc}", file=sys.stderr)
        return 1
    print("bench: interrupted; stopping servers", file=sys.stderr)
    return 130


def stop_all(things, stop) -> None:
    """`stop(thing)` for each of `things`, ^C ignored meanwhile; a failure is
    a warning and the others are still stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for thing in things:
        try:
            stop(thing)
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"bench: warning: stopping {getattr(thing, 'kind', thing)}: {exc}",
                  file=sys.stderr)


def wait_for_socket(path: str, timeout: float, greet: bool = True) -> bool:
    """Wait until a UNIX socket accepts a connection and greets; with
    `greet` False only until the socket file is there: a connection would
    start the service's first process (both masters start proxywrite's on
    demand), and a read scenario should find none, as on a read-only site."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (check_greeting(path, 2) if greet else socket_missing(path)) is None:
            return True
        time.sleep(0.05)
    return False


class RealPostfix(ServerInstance):
    kind = "c"
    label = "Postfix 3.7 C proxymap"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.master_pid: int | None = None

    def _postfix(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        for step in ("check", "start"):
            result = self._postfix(step)
            if result.returncode != 0:
                raise StartError(f"postfix -c {self.config_dir} {step}: "
                                 f"{(result.stderr or result.stdout).strip()[-300:]}")
        self.master_pid = self._read_pid()
        for service in ("proxymap", "proxywrite"):
            if not wait_for_socket(self.socket_path(service), 20, greet=service == "proxymap"):
                raise StartError(f"real Postfix: {self.socket_path(service)} does not greet")

    def _read_pid(self) -> int | None:
        return read_pid(os.path.join(self.queue_dir, "pid", "master.pid"))

    def root_pids(self) -> list[int]:
        return [self.master_pid] if self.master_pid else []

    def stop(self) -> None:
        """`postfix stop`, then SIGKILL by pid whatever is left of the tree."""
        pid = self.master_pid or self._read_pid()
        if not pid:
            return
        leftovers = [p.pid for p in self.processes()]
        if pid_alive(pid):
            try:
                self._postfix("stop", timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_leftovers(leftovers)
        self.master_pid = None
