"""Real database servers for the tests, from the Debian packages.

Each server runs in a fresh temporary directory, listens only on a UNIX
socket there (no TCP port to collide with other engineers or CI), runs as
the package's own system user (PostgreSQL refuses root), is waited for
with a bounded loop and stopped by its pid; `with Server() as s:` (or
cleanup()) stops it and removes its directory, and a server that does not
come up leaves neither behind. `find_postgres()` and
`find_mariadb()` return None when the binaries are missing, so a test can
skip with the reason. slapd (`SlapdServer`) also listens on a loopback
port the kernel picked, for the host:port forms of server_host; so do
redis-server and Redis Sentinel where a test asks for one (memcached and
redis-server otherwise listen on a UNIX socket only).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse

import psutil


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
    """What every test server shares: stopped by its pid with stop_signal
    (bounded, then SIGKILL), its log file, its temporary directory."""

    stop_signal = signal.SIGTERM
    proc: subprocess.Popen | None = None
    log = ""
    root = ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
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

    # `with Server() as server:` stops it and removes its directory at the end
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _start_or_clean_up(self, start) -> None:
        """start() from a constructor: a server that does not come up leaves
        neither a process nor its temporary directory behind."""
        try:
            start()
        except BaseException:
            self.cleanup()
            raise


class PostgresServer(ServerProcess):
    """initdb + postgres on a UNIX socket in a temporary directory."""

    stop_signal = signal.SIGINT    # fast shutdown

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
        self._start_or_clean_up(self._initdb_and_start)

    def _initdb_and_start(self) -> None:
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
        self._start_or_clean_up(self._install_and_start)

    def _install_and_start(self) -> None:
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}",
                        f"--user={self.user}", "--auth-root-authentication-method=normal",
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



def find_slapd() -> str | None:
    """OpenLDAP's server binary, if installed (Debian's slapd)."""
    return shutil.which("slapd", path="/usr/sbin:/usr/bin")


def free_loopback_ports(count: int) -> list[int]:
    """Distinct ports the kernel just handed out on 127.0.0.1 (closed again)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_loopback_port() -> int:
    return free_loopback_ports(1)[0]


class SlapdServer(ServerProcess):
    """slapd with an mdb database in a temporary directory (slapd.conf made
    there, `schema` lines added to the standard ones), listening on an
    ldapi:// socket there and on a loopback port; entries loaded with
    ldapadd as the rootdn. With tls=True: a self-signed certificate for
    127.0.0.1 (`cert`, its own CA) made with openssl, STARTTLS on the
    loopback port and ldaps:// on a second one. `database`: more lines for
    the database section (`index mail eq`)."""

    SUFFIX = "dc=example,dc=com"
    ROOT_DN = "cn=admin,dc=example,dc=com"
    ROOT_PW = "secret"

    def __init__(self, schema: str = "", tls: bool = False, database: str = ""):
        self.slapd = find_slapd()
        if self.slapd is None:
            raise RuntimeError("slapd is not installed (apt-get install slapd ldap-utils)")
        self.root = tempfile.mkdtemp(prefix="pmtest-ldap-")
        os.chmod(self.root, 0o755)
        self.db = os.path.join(self.root, "db")
        os.mkdir(self.db)
        self.socket = os.path.join(self.root, "ldapi")
        self.ldapi_url = "ldapi://" + urllib.parse.quote(self.socket, safe="")
        self.conf = os.path.join(self.root, "slapd.conf")
        self.log = os.path.join(self.root, "slapd.log")
        self.port = self.ldaps_port = 0    # ldaps_port: listened on with tls only
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.cert = os.path.join(self.root, "cert.pem")
        self._start_or_clean_up(lambda: self._configure_and_start(schema, database))

    def _configure_and_start(self, schema: str, database: str) -> None:
        tls_conf = ""
        if self.tls:
            key = os.path.join(self.root, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", key, "-out", self.cert, "-days", "30",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True, timeout=120)
            tls_conf = f"TLSCertificateFile {self.cert}\nTLSCertificateKeyFile {key}\n"
        includes = "".join(f"include /etc/ldap/schema/{name}.schema\n"
                           for name in ("core", "cosine", "inetorgperson"))
        with open(self.conf, "w") as f:
            f.write(f"{includes}{schema}\n{tls_conf}"
                    f"pidfile {self.root}/slapd.pid\n"
                    "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
                    f"database mdb\nsuffix \"{self.SUFFIX}\"\n"
                    f"rootdn \"{self.ROOT_DN}\"\nrootpw {self.ROOT_PW}\n"
                    f"directory {self.db}\nmaxsize 10485760\n{database}\n")
        for _ in range(3):            # bounded: another process may take the port first
            self.port, self.ldaps_port = free_loopback_ports(2)
            try:
                self.start()
                return
            except RuntimeError:
                if "Address already in use" not in self.read_log():
                    raise
        raise RuntimeError(f"slapd did not start: {self.read_log()[-2000:]}")

    @property
    def tcp_url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def urls(self) -> str:
        """What slapd listens on (-h)."""
        extra = f" ldaps://127.0.0.1:{self.ldaps_port}/" if self.tls else ""
        return f"{self.ldapi_url} {self.tcp_url}/{extra}"

    def start(self) -> None:
        logf = open(self.log, "ab")
        # -d 0: stay in the foreground (so the pid is slapd's), log nothing
        self.proc = subprocess.Popen(
            [self.slapd, "-f", self.conf, "-h", self.urls, "-d", "0"],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"slapd exited: {self.read_log()[-2000:]}")
            r = subprocess.run(["ldapsearch", "-x", "-H", self.ldapi_url, "-s", "base", "-b", "",
                                "-LLL", "1.1"], capture_output=True, timeout=30)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"slapd did not start: {self.read_log()[-2000:]}")

    def add(self, ldif: str) -> None:
        r = subprocess.run(["ldapadd", "-x", "-H", self.ldapi_url, "-D", self.ROOT_DN,
                            "-w", self.ROOT_PW], input=ldif.encode(), capture_output=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ldapadd failed: {r.stderr.decode(errors='replace')}")

    def connections_from(self, pid: int) -> int:
        """Established TCP connections from process pid to slapd's port now."""
        return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.raddr
                   and c.raddr.port == self.port)


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
        self._start_or_clean_up(self.start)

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
