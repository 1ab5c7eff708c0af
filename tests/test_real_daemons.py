"""Stock Postfix daemons using our service, beside a real Postfix master.

This is the deployment docs/operations.md describes: a real Postfix 3.7
instance whose master.cf has no proxymap/proxywrite entries, and our master
serving `private/proxymap` and `private/proxywrite` in the same
queue_directory. Real `smtpd` consults `proxy:cidr:` and `proxy:hash:`
tables through us; real `verify(8)` runs its cache cleanup (open, lookup,
sequence, delete, update with OPEN_LOCK) through our proxywrite.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from master.pidfile import pid_alive, read_pid
from proxymap import dictflags as F
from proxymap.client import ProxyClient
from proxymap.protocol import OK
from proxymap.conventions.service_sockets import service_socket_path
from tests.instance import MasterInstance, temporary_instance, wait_for

POSTFIX = "/usr/sbin/postfix"

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(os.geteuid() != 0, reason="a real Postfix master needs root")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealPostfix:
    """A private real Postfix instance (config dir of its own) on a queue
    directory shared with our master."""

    def __init__(self, root: str, ours: MasterInstance, port: int, main_extra: str):
        self.config_dir = os.path.join(root, "etc-real")
        self.data_dir = os.path.join(root, "data-real")
        self.queue_dir = ours.queue_dir
        self.maillog = os.path.join(root, "maillog")
        os.makedirs(self.config_dir)
        os.makedirs(self.data_dir)
        shutil.chown(self.data_dir, "postfix")
        settings = {k: v for k, v in ours.main_settings().items()}
        settings.update(data_directory=self.data_dir, myhostname="real.example.com",
                        mydestination="", local_recipient_maps="",
                        inet_interfaces="127.0.0.1", inet_protocols="ipv4",
                        maillog_file=self.maillog, maillog_file_prefixes=root)
        text = "".join(f"{k} = {v}\n" for k, v in settings.items()) + main_extra
        self._write("main.cf", text)
        self._write("master.cf", f"""\
127.0.0.1:{port} inet n - n - - smtpd
rewrite   unix  -  -  n  -  -  trivial-rewrite
cleanup   unix  n  -  n  -  0  cleanup
verify    unix  -  -  n  -  1  verify
postlog   unix-dgram n - n - 1 postlogd
""")

    def _write(self, name, text):
        path = os.path.join(self.config_dir, name)
        with open(path, "w") as f:
            f.write(text)
        past = time.time() - 5
        os.utime(path, (past, past))

    def postfix(self, *args):
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], capture_output=True, text=True,
                              timeout=60)

    def start(self):
        result = self.postfix("start")
        assert result.returncode == 0, result.stderr + self.log()

    def master_pid(self):
        return read_pid(os.path.join(self.queue_dir, "pid", "master.pid"))

    def stop(self):
        pid = self.master_pid()
        self.postfix("stop")
        if pid:
            try:
                wait_for(lambda: not pid_alive(pid), 15, what="the real master to exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)

    def log(self):
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@pytest.fixture
def site(tmp_path):
    with temporary_instance(tmp_path) as ours:
        tables = ours.table_dir
        with open(os.path.join(tables, "clients"), "w") as f:
            f.write("127.0.0.2 REJECT blocked by our cidr table\n")
        with open(os.path.join(tables, "rcpt"), "w") as f:
            f.write("ok@example.com OK\n")
        verify_src = os.path.join(tables, "verify_cache")
        with open(verify_src, "w") as f:
            f.write("keep@example.com 0:0:4102444800:ok\n"
                    "old1@example.com 0:0:1:ok\nold2@example.com 0:0:1:ok\n")
        assert ours.postmap(f"hash:{tables}/rcpt").returncode == 0
        assert ours.postmap(f"btree:{verify_src}").returncode == 0
        shutil.chown(verify_src + ".db", "postfix")
        cidr, rcpt, cache = (f"cidr:{tables}/clients", f"hash:{tables}/rcpt",
                             f"btree:{verify_src}")
        ours.write_main_cf(proxy_read_maps=f"proxy:{cidr} proxy:{rcpt} proxy:{cache}",
                           proxy_write_maps=f"proxy:{cache}")
        ours.start()
        port = free_port()
        real = RealPostfix(ours.root, ours, port, f"""\
smtpd_client_restrictions = check_client_access proxy:{cidr}
smtpd_recipient_restrictions = check_recipient_access proxy:{rcpt}, reject
address_verify_map = proxy:{cache}
address_verify_cache_cleanup_interval = 1s
""")
        real.port, real.cache = port, cache
        try:
            real.start()
            yield ours, real
        finally:
            real.stop()


def smtp_rcpt(port, source, rcpt):
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as s:
        s.ehlo("client.example.com")
        s.mail("sender@example.com")
        return s.rcpt(rcpt)


def test_smtpd_access_checks_go_through_our_proxymap(site):
    ours, real = site
    code, text = smtp_rcpt(real.port, "127.0.0.1", "ok@example.com")
    assert code == 250, real.log()
    code, text = smtp_rcpt(real.port, "127.0.0.1", "other@example.com")
    assert code == 554 and b"Access denied" in text
    code, text = smtp_rcpt(real.port, "127.0.0.2", "ok@example.com")
    assert code == 554 and b"blocked by our cidr table" in text
    assert "fatal" not in real.log()


def test_verify_cache_cleanup_runs_through_our_proxywrite(site):
    ours, real = site
    # verify(8) opens its cache with OPEN_LOCK, so our proxywrite worker
    # holds the file's exclusive lock: we read through the same shared
    # instance (same instance flags) on proxywrite, as verify itself does.
    path = service_socket_path(real.queue_dir, "proxywrite")

    def cache(key):
        with ProxyClient(path, timeout=30) as client:
            status, value = client.lookup(real.cache, F.OPEN_LOCK | F.DUP_REPLACE |
                                          F.SYNC_UPDATE | F.UTF8_REQUEST, key)
        return value if status == OK else None

    # Waking verify(8) starts its cache cleanup at once (no stamp record yet).
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(service_socket_path(real.queue_dir, "verify"))
        wait_for(lambda: cache(b"_LAST_CACHE_CLEANUP_COMPLETED_"), 30,
                 what="verify's cache cleanup")
    assert cache(b"keep@example.com") == b"0:0:4102444800:ok"
    assert cache(b"old1@example.com") is None and cache(b"old2@example.com") is None
    assert "retained=1 dropped=2" in real.log()
    # The read service does not hang behind verify's lifetime lock: it
    # answers RETRY after a bounded wait, and real postmap reports it.
    r = ours.postmap("-q", "keep@example.com", f"proxy:{real.cache}")
    assert r.returncode == 1 and "query error" in r.stderr
