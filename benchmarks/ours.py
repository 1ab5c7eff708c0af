"""Our proxymap service, started the two ways the benchmark can use.

`master` mode runs `proxymap-master -c DIR start` (detached; serves
`$queue_directory/private/proxymap` and `proxywrite`, spawning workers as
load demands) and stops it with `proxymap-master -c DIR stop`. `workers`
mode starts one standalone `python -m proxymap.server` per service
listening on the same paths, for when the master is not usable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from benchmarks.realpostfix import StartError, wait_for_socket
from benchmarks.servers import ServerInstance, kill_leftovers
from master.pidfile import pid_alive, pid_path, read_pid
from proxymap.server import standalone_command

BIN = os.path.dirname(sys.executable)
MASTER = os.path.join(BIN, "proxymap-master")
MODES = ("master", "workers")


class OurService(ServerInstance):
    kind = "ours"

    def __init__(self, *args, mode: str = "master", **kwargs):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.label = "ours (master)" if mode == "master" else "ours (standalone workers)"
        self.pids: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.log_path = os.path.join(self.root, "ours.log")

    def _control(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([MASTER, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        if self.mode == "master":
            result = self._control("start")
            if result.returncode != 0:
                raise StartError(f"proxymap-master start: {result.stderr.strip()[-300:]}")
            pid = self._master_pid()
            if not pid:
                raise StartError("proxymap-master start: no pid file")
            self.pids = [pid]
        else:
            os.makedirs(os.path.dirname(self.socket_path()), exist_ok=True)
            log = open(self.log_path, "ab")
            try:
                for service in ("proxymap", "proxywrite"):
                    proc = subprocess.Popen(
                        standalone_command(self.config_dir, service, self.socket_path(service)),
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                    self.procs.append(proc)
                    self.pids.append(proc.pid)
            finally:
                log.close()
        for service in ("proxymap", "proxywrite"):
            if not wait_for_socket(self.socket_path(service), 30, greet=service == "proxymap"):
                raise StartError(f"ours: {self.socket_path(service)} does not greet")

    def _master_pid(self) -> int | None:
        return read_pid(pid_path(self.queue_dir))

    def root_pids(self) -> list[int]:
        return list(self.pids)

    def stop(self) -> None:
        leftovers = [p.pid for p in self.processes()]
        if self.mode == "master" and self.pids and pid_alive(self.pids[0]):
            try:
                self._control("stop", timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        kill_leftovers(leftovers)
        self.pids, self.procs = [], []
