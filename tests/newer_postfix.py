"""Real Postfix 3.10 and 3.11 programs for the tests, from cached Debian chroots.

The host carries Postfix 3.7; Debian trixie carries 3.10 and sid 3.11+.
`chroot_for(suite)` builds the chroot once (tests/chroots/build.sh: debootstrap
with postfix and its table packages, cached outside the checkout under
/var/cache/pyproxymap/chroots, the chroot's postfix user on the host's
uid/gid) and returns a `Chroot` that runs the chroot's own programs.

Each command runs in a private mount namespace (`unshare -m`) in which the
host's /tmp is bind-mounted over the chroot's /tmp: a test instance under
/tmp is visible at the same absolute path, sockets included, and the bind
vanishes with the command's namespace, so nothing is left to unmount.

`CPostfix` is a private instance of the chroot's real Postfix (its own
master, its C proxymap and proxywrite) on a queue directory of its own: the
reference every case is compared with. Given our queue directory and a
master.cf without proxymap/proxywrite, it runs the chroot's daemons beside
our service instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from master.pidfile import pid_alive, read_pid
from proxymap.conventions.service_sockets import service_socket_path
from tests.instance import greeting_of, mail_owner, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "chroots", "build.sh")
CACHE = os.environ.get("PYPROXYMAP_CHROOT_CACHE", "/var/cache/pyproxymap/chroots")
#: the suites the tests use, and the Postfix release each must carry at least
SUITES = {"trixie": (3, 10), "sid": (3, 11)}

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="chroots, mount namespaces and a real master need root")

MASTER_CF = """\
proxymap    unix  -       -       n       -       -       proxymap
proxywrite  unix  -       -       n       -       1       proxymap
postlog     unix-dgram n  -       n       -       1       postlogd
"""


class Chroot:
    """One cached chroot; `run`/`popen` execute its programs."""

    def __init__(self, suite: str, root: str):
        self.suite = suite
        self.root = root
        with open(os.path.join(root, ".postfix-version")) as f:
            self.version = f.read().strip()
        self.release = tuple(int(p) for p in self.version.split(".")[:2])

    def argv(self, *args: str) -> list[str]:
        script = 'mount --bind /tmp "$0/tmp" && exec chroot "$0" "$@"'
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                self.root, *args]

    def run(self, *args: str, input: bytes | str | None = None, timeout: float = 60,
            text: bool = True) -> subprocess.CompletedProcess:
        if isinstance(input, str) and not text:
            input = input.encode()
        return subprocess.run(self.argv(*args), input=input, capture_output=True, text=text,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                    "LANG": "C"})

    def postmap(self, config_dir: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("/usr/sbin/postmap", "-c", config_dir, *args, **kwargs)


_chroots: dict[str, Chroot] = {}


def chroot_for(suite: str) -> Chroot:
    """The chroot for `suite`, built on first use (a few minutes) and cached."""
    if suite not in _chroots:
        if shutil.which("debootstrap") is None or shutil.which("unshare") is None:
            pytest.fail("debootstrap and unshare are needed (make deps installs them)")
        done = subprocess.run([BUILD, suite, CACHE], capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            pytest.fail(f"building the {suite} chroot failed: {done.stderr[-2000:]}")
        chroot = Chroot(suite, os.path.join(CACHE, suite))
        if chroot.release < SUITES[suite]:
            pytest.fail(f"{suite} carries Postfix {chroot.version}, expected "
                        f"{'.'.join(map(str, SUITES[suite]))} or later")
        _chroots[suite] = chroot
    return _chroots[suite]


def write_back_dated(path: str, text: str) -> None:
    """Postfix programs re-read a main.cf modified in the last second and
    warn about every entry: write config files with a stamp in the past."""
    with open(path + ".new", "w") as f:
        f.write(text)
    past = time.time() - 5
    os.utime(path + ".new", (past, past))
    os.replace(path + ".new", path)


class CPostfix:
    """The chroot's real Postfix serving proxymap/proxywrite on a private
    queue directory under `root`, with the main.cf settings given."""

    def __init__(self, chroot: Chroot, root: str, settings: dict, master_cf: str = MASTER_CF,
                 queue_dir: str | None = None):
        self.chroot = chroot
        self.root = root
        self.config_dir = os.path.join(root, "etc")
        self.queue_dir = queue_dir or os.path.join(root, "queue")
        self.data_dir = os.path.join(root, "data")
        self.maillog = os.path.join(root, "maillog")
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            os.makedirs(d, exist_ok=True)
        shutil.chown(self.data_dir, mail_owner())
        main = dict(settings)
        main.update(queue_directory=self.queue_dir, data_directory=self.data_dir,
                    mail_owner=mail_owner(), myhostname="c.example.com",
                    maillog_file=self.maillog, maillog_file_prefixes=root)
        write_back_dated(os.path.join(self.config_dir, "main.cf"),
                         "".join(f"{k} = {v}\n" for k, v in main.items()))
        write_back_dated(os.path.join(self.config_dir, "master.cf"), master_cf)
        self.pid: int | None = None

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return self.chroot.run("/usr/sbin/postfix", "-c", self.config_dir, *args)

    def socket_path(self, service: str = "proxymap") -> str:
        return service_socket_path(self.queue_dir, service)

    def start(self, services=("proxymap", "proxywrite")) -> None:
        done = self.postfix("start")
        assert done.returncode == 0, done.stderr + self.log()
        self.pid = read_pid(os.path.join(self.queue_dir, "pid", "master.pid"))

        def serving():
            try:
                return all(greeting_of(self.socket_path(s), 1.0).startswith(b"protocol")
                           for s in services)
            except OSError:
                return False
        wait_for(serving, 30, what=f"Postfix {self.chroot.version} to serve")

    def stop(self) -> None:
        pid = self.pid or read_pid(os.path.join(self.queue_dir, "pid", "master.pid"))
        if not pid or not pid_alive(pid):
            return
        self.postfix("stop")
        try:
            wait_for(lambda: not pid_alive(pid), 20, what="the chroot's master to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
