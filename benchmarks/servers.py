"""What both benchmarked services have in common: a private instance
directory (main.cf, master.cf, queue_directory, data_directory) and the
accounting of their processes (CPU seconds and resident memory, via psutil).

CPU of a whole service is measured at its root process: its own user+system
time, the time of children it has already reaped (children_user and
children_system: a Postfix proxymap that retires after max_use clients is
still counted) and the time of the children alive now. A delta of that
total across a measurement is the service's CPU for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil

from benchmarks.tables import chown_tree
from master.pidfile import pid_alive
from proxymap.conventions.service_sockets import service_socket_path

MASTER_CF = """\
# service   type  private unpriv  chroot  wakeup  maxproc command
proxymap    unix  -       -       n       -       -       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
"""


class ServerInstance:
    """A config dir + queue_directory under `root`, serving the given tables.

    Subclasses implement start() and stop() and set `kind` ("c" or "ours");
    root_pids() names the processes whose trees make up the service.
    """

    kind = "?"
    label = "?"

    def __init__(self, root: str, read_maps: list[str], write_maps: list[str],
                 owner: str = "postfix", extra: dict | None = None):
        self.root = os.path.abspath(root)
        self.config_dir = os.path.join(self.root, "etc")
        self.queue_dir = os.path.join(self.root, "queue")
        self.data_dir = os.path.join(self.root, "data")
        self.owner = owner
        self.read_maps = read_maps
        self.write_maps = write_maps
        self.extra = dict(extra or {})
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            os.makedirs(d, exist_ok=True)
        chown_tree(self.data_dir, owner)
        self.write_config()

    def main_cf(self) -> dict:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": self.owner,
            "myhostname": "bench.localdomain",
            "proxy_read_maps": " ".join(f"proxy:{t}" for t in self.read_maps + self.write_maps),
            "proxy_write_maps": " ".join(f"proxy:{t}" for t in self.write_maps),
        }
        settings.update(self.extra)
        return settings

    def write_config(self) -> None:
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in self.main_cf().items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF)

    def socket_path(self, service: str = "proxymap") -> str:
        return service_socket_path(self.queue_dir, service)

    # -- to be provided by subclasses --------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def root_pids(self) -> list[int]:
        raise NotImplementedError

    # -- accounting ---------------------------------------------------------------

    def processes(self) -> list[psutil.Process]:
        """The root processes and all their descendants that are alive."""
        procs = []
        for pid in self.root_pids():
            try:
                root = psutil.Process(pid)
                procs.append(root)
                procs.extend(root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return procs

    def cpu_seconds(self) -> float:
        """User+system seconds of the service so far (see module docstring)."""
        total = 0.0
        for pid in self.root_pids():
            try:
                root = psutil.Process(pid)
                t = root.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
                for child in root.children(recursive=True):
                    try:
                        c = child.cpu_times()
                        total += c.user + c.system
                    except psutil.NoSuchProcess:
                        pass   # reaped between listing and asking: now in children_*
            except psutil.NoSuchProcess:
                continue
        return total

    def memory(self) -> tuple[int, int, int]:
        """(sum of RSS bytes, sum of PSS bytes, number of processes) of the
        service now. RSS counts pages shared between processes once per
        process (forked workers share most of theirs); PSS divides them."""
        rss = pss = count = 0
        for proc in self.processes():
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return rss, pss, count


@dataclass
class Usage:
    cpu: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0


class UsageMeter:
    """Context manager: CPU delta of a service plus its peak RSS and process
    count, sampled by a thread every `interval` seconds."""

    def __init__(self, server: ServerInstance, interval: float = 0.25):
        self.server = server
        self.interval = interval
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            rss, pss, count = self.server.memory()
            self.usage.peak_rss = max(self.usage.peak_rss, rss)
            self.usage.peak_pss = max(self.usage.peak_pss, pss)
            self.usage.peak_procs = max(self.usage.peak_procs, count)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Usage:
        self._cpu0 = self.server.cpu_seconds()
        self._thread.start()
        return self.usage

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.usage.cpu = self.server.cpu_seconds() - self._cpu0


def kill_leftovers(pids, grace: float = 10.0) -> None:
    """Give `pids` `grace` seconds to exit on their own, then SIGKILL the
    rest (by pid, never by name)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop a child we started, by its pid: `sig`, `grace` seconds to exit,
    then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
