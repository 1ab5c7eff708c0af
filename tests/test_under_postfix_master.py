"""Our `proxymap` program as a child of Postfix's own master(8) (issue 13).

A real Postfix 3.7 instance whose master.cf names our program in the
command column of its proxymap and proxywrite lines, nothing else changed.
Real postmap and a real smtpd use the tables through it; `postfix reload`
replaces the children (new generation), `max_use` retires one, and
`postfix stop` ends them all. Processes are told apart by pid and by the
program they run (psutil), never by timing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import psutil
import pytest

from master.pidfile import pid_alive
from proxymap.protocol import PURE_PYTHON_ENV
from tests.instance import MASTER, POSTMAP, temporary_instance, wait_for
from tests.test_real_daemons import POSTFIX, RealPostfix, free_port, smtp_rcpt

OUR_PROXYMAP = os.path.join(os.path.dirname(MASTER), "proxymap")
#: the name our program gets in daemon_directory (docs/operations.md)
COMMAND = "pyproxymap"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(os.geteuid() != 0, reason="a real Postfix master needs root"),
              pytest.mark.skipif(not os.path.exists(POSTFIX), reason="needs Postfix")]


def passed_environment() -> str:
    """main.cf text that hands PROXYMAP_PURE_PYTHON, when set, through
    Postfix's master (its children get only import_environment): the
    suite's pure-Python pass runs our program on that path here too."""
    value = os.environ.get(PURE_PYTHON_ENV)
    if value is None:
        return ""
    defaults = subprocess.run(["postconf", "-dh", "import_environment"], capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()
    return f"import_environment = {defaults} {PURE_PYTHON_ENV}={value}\n"


def master_cf(port: int, proxymap_options: str = "") -> str:
    return f"""\
127.0.0.1:{port} inet n - n - - smtpd
rewrite   unix  -  -  n  -  -  trivial-rewrite
cleanup   unix  n  -  n  -  0  cleanup
postlog   unix-dgram n - n - 1 postlogd
proxymap  unix  -  -  n  -  -  {COMMAND}{proxymap_options}
proxywrite unix -  -  n  -  1  {COMMAND}
"""


def private_daemon_directory(path: str) -> str:
    """Postfix's daemon directory as symbolic links, plus `pyproxymap`
    linked to our program: what an install does in /usr/lib/postfix/sbin,
    kept private to the test."""
    os.makedirs(path)
    for name in os.listdir(DAEMON_DIRECTORY):
        os.symlink(os.path.join(DAEMON_DIRECTORY, name), os.path.join(path, name))
    os.symlink(OUR_PROXYMAP, os.path.join(path, COMMAND))
    return path


class Site:
    def __init__(self, ours, real):
        self.ours, self.real = ours, real

    def postmap(self, *args):
        return subprocess.run([POSTMAP, "-c", self.real.config_dir, *args],
                              capture_output=True, text=True, timeout=60)

    def lookup(self, key, table=None):
        result = self.postmap("-q", key, f"proxy:{table or self.ours.read_table}")
        assert result.returncode in (0, 1) and not result.stderr, result.stderr + \
            self.real.log()
        return result.stdout.rstrip("\n") if result.returncode == 0 else None

    def children(self, service=None):
        """pids of our program among the real master's children, by service."""
        master = self.real.master_pid()
        found = {}
        for proc in psutil.Process(master).children():
            try:
                cmdline = proc.cmdline()
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            if OUR_PROXYMAP in cmdline or any(arg.endswith("/" + COMMAND) for arg in cmdline):
                name = cmdline[cmdline.index("-n") + 1]
                found.setdefault(name, set()).add(proc.pid)
        return found if service is None else found.get(service, set())


@pytest.fixture
def postfix_site(tmp_path, request):
    options = getattr(request, "param", "")
    with temporary_instance(tmp_path) as ours:
        rcpt = f"hash:{ours.table_dir}/rcpt"
        with open(rcpt[5:], "w") as f:
            f.write("ok@example.com OK\n")
        assert ours.postmap(rcpt).returncode == 0
        shutil.chown(rcpt[5:] + ".db", "postfix")
        ours.write_main_cf(proxy_read_maps=f"proxy:{ours.read_table} proxy:{ours.write_table} "
                                           f"proxy:{rcpt}")
        port = free_port()
        real = RealPostfix(ours.root, ours, port, f"""\
smtpd_recipient_restrictions = check_recipient_access proxy:{rcpt}, reject
daemon_directory = {private_daemon_directory(os.path.join(ours.root, "libexec"))}
{passed_environment()}""")
        real.port = port
        real._write("master.cf", master_cf(port, options))
        os.makedirs(ours.queue_dir, mode=0o755, exist_ok=True)   # Postfix creates the rest
        try:
            real.start()
            yield Site(ours, real)
        finally:
            real.stop()


def test_real_postmap_and_smtpd_use_our_program_under_postfix_master(postfix_site):
    site = postfix_site
    assert site.lookup("alice") == "alice@example.org"
    assert site.lookup("nobody") is None
    readers = wait_for(lambda: site.children("proxymap"), what="our proxymap child")
    # the child serves on Postfix's listening socket, unprivileged
    for pid in readers:
        assert psutil.Process(pid).uids().effective == psutil.Process(pid).uids().real != 0
    code, _ = smtp_rcpt(site.real.port, "127.0.0.1", "ok@example.com")
    assert code == 250, site.real.log()
    code, text = smtp_rcpt(site.real.port, "127.0.0.1", "stranger@example.com")
    assert code == 554 and b"Access denied" in text
    # proxywrite: an update through it is visible to a direct read at once
    result = site.postmap("-d", "k1", f"proxy:{site.ours.write_table}")
    assert result.returncode == 0, result.stderr + site.real.log()
    assert site.children("proxywrite")
    direct = site.postmap("-q", "k1", site.ours.write_table)
    assert direct.returncode == 1
    assert site.lookup("k2", site.ours.write_table) == "v2"
    assert "fatal" not in site.real.log() and "panic" not in site.real.log()


def test_reload_starts_a_new_generation_and_stop_ends_every_child(postfix_site):
    site = postfix_site
    assert site.lookup("alice") == "alice@example.org"
    assert site.postmap("-d", "k3", f"proxy:{site.ours.write_table}").returncode == 0
    before = site.children()
    old = before["proxymap"] | before["proxywrite"]
    result = site.real.postfix("reload")
    assert result.returncode == 0, result.stderr
    # the master closes the old status channels: the old children exit
    wait_for(lambda: not any(pid_alive(p) and p in site.children().get("proxymap", set()) |
                             site.children().get("proxywrite", set()) for p in old),
             30, what="the old generation to exit")
    assert site.lookup("bob") == "bob@example.org"
    assert site.postmap("-d", "k2", f"proxy:{site.ours.write_table}").returncode == 0
    after = site.children()
    assert after["proxymap"] and not after["proxymap"] & before["proxymap"]
    assert after["proxywrite"] and not after["proxywrite"] & before["proxywrite"]
    log = site.real.log()
    assert "bad command startup" not in log and "fatal" not in log, log
    every = after["proxymap"] | after["proxywrite"]
    site.real.stop()
    wait_for(lambda: not any(pid_alive(p) for p in every), 30, what="our children to exit")


@pytest.mark.parametrize("postfix_site", [" -o max_use=2"], indirect=True)
def test_max_use_retires_a_child_after_its_connections(postfix_site):
    site = postfix_site
    assert site.lookup("alice") == "alice@example.org"          # connection 1
    first = wait_for(lambda: site.children("proxymap"), what="the first child")
    assert site.lookup("bob") == "bob@example.org"              # connection 2: max_use
    wait_for(lambda: not any(pid_alive(p) and p in site.children("proxymap") for p in first),
             30, what="the used-up child to exit")
    assert site.lookup("carol") == "carol@example.org"          # a fresh child
    assert site.children("proxymap") and not site.children("proxymap") & first
    assert "bad command startup" not in site.real.log()


@pytest.mark.parametrize("postfix_site", [" -o daemon_timeout=2s"], indirect=True)
def test_daemon_timeout_watchdog_ends_a_stuck_child(postfix_site):
    """A child whose event loop does not come round for daemon_timeout dies
    (Postfix's watchdog): stopped with SIGSTOP for longer than that, it is
    killed by the pending SIGALRM as soon as it runs again."""
    import signal
    import time
    site = postfix_site
    assert site.lookup("alice") == "alice@example.org"
    (child,) = wait_for(lambda: site.children("proxymap"), what="our proxymap child")
    os.kill(child, signal.SIGSTOP)
    time.sleep(3)                 # > daemon_timeout while it cannot run
    os.kill(child, signal.SIGCONT)
    wait_for(lambda: not pid_alive(child) or child not in site.children("proxymap"), 30,
             what="the stuck child to end")
    wait_for(lambda: f"pid {child} killed by signal {int(signal.SIGALRM)}" in site.real.log(),
             30, what="the master's log line")
    # it had served a client: not taken for a bad startup, no throttling
    assert "bad command startup" not in site.real.log()
    assert site.lookup("bob") == "bob@example.org"        # a fresh child serves


@pytest.mark.parametrize("postfix_site", [" -o daemon_timeout=2s"], indirect=True)
def test_child_stuck_while_its_first_client_is_connected_is_not_a_bad_startup(postfix_site):
    """The use the master counts is reported when a child accepts its first
    client, not when that client leaves: a child stopped while its first
    client is still connected, and killed by the watchdog, is not taken for
    a bad startup, and the service is not throttled."""
    import signal
    import time
    from proxymap.client import ProxyClient
    from proxymap.protocol import OK
    site = postfix_site
    path = os.path.join(site.ours.queue_dir, "private", "proxymap")
    client = ProxyClient(path, timeout=30, retries=0)
    try:
        assert client.lookup(site.ours.read_table, 0, b"alice") == (OK, b"alice@example.org")
        (child,) = wait_for(lambda: site.children("proxymap"), what="our proxymap child")
        os.kill(child, signal.SIGSTOP)
        time.sleep(3)             # > daemon_timeout while it cannot run
        os.kill(child, signal.SIGCONT)
        wait_for(lambda: f"pid {child} killed by signal {int(signal.SIGALRM)}" in site.real.log(),
                 30, what="the master's log line")
    finally:
        client.close()
    assert "bad command startup" not in site.real.log(), site.real.log()
    assert site.lookup("bob") == "bob@example.org"        # a fresh child serves
