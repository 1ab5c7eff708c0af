"""Real database servers for the tests, from the Debian packages.

Each server runs in a fresh temporary directory, listens only on a UNIX
socket there (no TCP port to collide with other engineers or CI), runs as
the package's own system user (PostgreSQL refuses root), is waited for
with a bounded loop and stopped by its pid; so are memcached and
redis-server. `find_postgres()` and `find_mariadb()` return None when the binaries are missing, so a test can
skip with the reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time


def find_postgres() -> str | None:
    """The newest installed PostgreSQL bin directory."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                  key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(dirs[-1]) if dirs else None


def find_mariadb() -> str | None:
    """The MariaDB server binary, if installed."""
    return shutil.which("mariadbd", path="/usr/sbin:/usr/bin")


def _as_user(user: str):
    pw = pwd.getpwnam(user)

    def demote():
        os.setgid(pw.pw_gid)
        os.setgroups([])
        os.setuid(pw.pw_uid)
    return demote if os.geteuid() == 0 else None


class ServerProcess:
    """What the servers below share (PostgreSQL stops its own way): `proc`, `log` and `root` set by the
    subclass; stopped with SIGTERM by pid (a clean shutdown), bounded."""

    proc: subprocess.Popen | None = None
    log = root = ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def read_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresServer(ServerProcess):
    """initdb + postgres on a UNIX socket in a temporary directory."""

    def __init__(self, user: str = "postgres"):
        self.bin = find_postgres()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.user = user if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.root = tempfile.mkdtemp(prefix="pmtest-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.socket_dir = self.root
        self.log = os.path.join(self.root, "postgres.log")
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        subprocess.run([os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                        "-U", "postgres", "-E", "UTF8", "--locale=C"],
                       preexec_fn=_as_user(self.user), check=True, capture_output=True,
                       timeout=300)
        self.start()

    def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", self.data, "-k", self.socket_dir,
             "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"],
            preexec_fn=_as_user(self.user), stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.read_log()[-2000:]}")
            r = subprocess.run([os.path.join(self.bin, "pg_isready"), "-h", self.socket_dir,
                                "-U", "postgres", "-q"], timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start: {self.read_log()[-2000:]}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the postmaster by its pid, bounded."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = subprocess.run([os.path.join(self.bin, "psql"), "-h", self.socket_dir, "-U",
                            "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t",
                            "-c", sql], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr}")
        return r.stdout

    def connections(self, db: str) -> int:
        """Client backends connected to db now (ours excluded)."""
        return int(self.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                             f"'{db}' AND pid <> pg_backend_pid()").strip())

class MariadbServer(ServerProcess):
    """mariadb-install-db + mariadbd on a UNIX socket in a temporary directory."""

    def __init__(self, user: str = "mysql"):
        if find_mariadb() is None:
            raise RuntimeError("MariaDB is not installed (apt-get install mariadb-server)")
        self.user = user
        self.root = tempfile.mkdtemp(prefix="pmtest-my-")
        os.chmod(self.root, 0o755)
        pw = pwd.getpwnam(user)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.root, "data")
        self.socket = os.path.join(self.root, "mysqld.sock")
        self.log = os.path.join(self.root, "mysqld.log")
        self.proc: subprocess.Popen | None = None
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}",
                        f"--user={user}", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=300)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_mariadb(), "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
             "--skip-networking", f"--pid-file={self.root}/mysqld.pid", f"--user={self.user}",
             f"--log-error={self.log}", "--max-connections=300"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {self.read_log()[-2000:]}")
            if os.path.exists(self.socket):
                try:
                    self.sql("SELECT 1")
                    return
                except RuntimeError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not start: {self.read_log()[-2000:]}")

    def sql(self, sql: str, db: str = "") -> str:
        r = subprocess.run(["mariadb", "--no-defaults", "-S", self.socket, "-u", "root",
                            "-N", "-B", *([db] if db else []), "-e", sql],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb failed: {r.stderr}")
        return r.stdout

    def connections(self, user: str) -> int:
        return int(self.sql("SELECT count(*) FROM information_schema.processlist"
                            f" WHERE user = '{user}'").strip())


class _CacheServer(ServerProcess):
    """A cache server listening on a UNIX socket in a temporary directory
    (and on a loopback `port` when one is given), run as the package's user
    when the tests run as root, stopped by pid (SIGTERM: redis saves its
    data first)."""

    user = ""
    prefix = "pmtest-cache-"

    def __init__(self, port: int = 0):
        self.port = port
        self.root = tempfile.mkdtemp(prefix=self.prefix)
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.socket = os.path.join(self.root, "server.sock")
        self.log = os.path.join(self.root, "server.log")
        self.proc: subprocess.Popen | None = None
        self.start()

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=logf,
                                     preexec_fn=_as_user(self.user))
        logf.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited: {self.read_log()[-2000:]}")
            if self.answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.command()[0]} did not start: {self.read_log()[-2000:]}")

    def _ask(self, request: bytes, until: bytes) -> bytes:
        import socket
        with socket.socket(socket.AF_INET if self.port else socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(("127.0.0.1", self.port) if self.port else self.socket)
            s.sendall(request)
            data = b""
            while until not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data


class MemcachedServer(_CacheServer):
    """Debian's memcached on a UNIX socket; `text(cmd)` speaks its protocol."""

    user = "memcache"
    prefix = "pmtest-mc-"

    def command(self) -> list[str]:
        return ["memcached", "-s", self.socket, "-a", "0666", "-m", "16", "-c", "512",
                *(["-u", self.user] if os.geteuid() == 0 else [])]

    def answers(self) -> bool:
        try:
            return b"END" in self._ask(b"version\r\nget x\r\n", b"END")
        except OSError:
            return False

    def text(self, request: bytes, until: bytes = b"\r\n") -> bytes:
        return self._ask(request, until)


class RedisServer(_CacheServer):
    """Debian's redis-server on a UNIX socket, no TCP port; its data is
    saved on SIGTERM and read back by start(), so a restart keeps it."""

    user = "redis"
    prefix = "pmtest-redis-"

    def __init__(self, port: int = 0, options: tuple[str, ...] = ()):
        self.options = options    # more redis-server options (TLS ...)
        super().__init__(port)

    def command(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.socket, "--unixsocketperm", "777", "--dir", self.root,
                "--save", "3600 1", "--appendonly", "no", "--daemonize", "no", *self.options]

    def answers(self) -> bool:
        try:
            return self._ask(b"PING\r\n", b"\r\n").startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


class RedisSentinel(_CacheServer):
    """A Redis Sentinel on loopback `port` watching the master `name` at
    127.0.0.1:master_port (a sentinel only speaks TCP)."""

    user = "redis"
    prefix = "pmtest-sentinel-"

    def __init__(self, port: int, master_port: int, name: str = "mymaster"):
        self.master_port, self.name = master_port, name
        super().__init__(port)

    def command(self) -> list[str]:
        conf = os.path.join(self.root, "sentinel.conf")
        if not os.path.exists(conf):
            with open(conf, "w") as f:
                f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.root}\n"
                        f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n")
            if os.geteuid() == 0:
                shutil.chown(conf, self.user)
        return ["redis-server", conf, "--sentinel"]

    def answers(self) -> bool:
        try:
            reply = self._ask(f"SENTINEL get-master-addr-by-name {self.name}\r\n".encode(),
                              b"\r\n")
            return reply.startswith(b"*2")
        except OSError:
            return False
