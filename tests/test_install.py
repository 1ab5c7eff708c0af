"""`make install` as a site runs it, into a private set of directories
(issue 13): a non-editable install whose programs serve a real site, with
the systemd unit checked by systemd-analyze and the logrotate snippet and
Postfix daemon-directory link pointing at that install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.instance import MasterInstance, instance_base, kill_leftover_workers, needs_postmap

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("proxymap-master", "proxymap", "proxymap-postmap")

pytestmark = [pytest.mark.slow,
              needs_postmap]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root, remove = instance_base(tmp_path_factory.mktemp("install"))
    dirs = {name: os.path.join(root, name.lower()) for name in
            ("PREFIX", "BINDIR", "DOCDIR", "UNITDIR", "LOGROTATEDIR", "POSTFIX_DAEMON_DIR")}
    os.makedirs(dirs["POSTFIX_DAEMON_DIR"])
    result = subprocess.run(["make", "-C", CHECKOUT, "install",
                             *(f"{k}={v}" for k, v in dirs.items())],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dirs["root"] = root
    yield dirs
    subprocess.run(["make", "-C", CHECKOUT, "uninstall", *(f"{k}={v}" for k, v in dirs.items()
                                                           if k != "root")],
                   capture_output=True, timeout=120)
    if remove:
        shutil.rmtree(root, ignore_errors=True)


def test_programs_are_linked_and_not_editable(installed):
    from proxymap import version
    for program in PROGRAMS:
        path = os.path.join(installed["BINDIR"], program)
        assert os.path.realpath(path).startswith(installed["PREFIX"] + "/")
        result = subprocess.run([path, "--version"], capture_output=True, text=True,
                                timeout=60, cwd="/")
        assert result.stdout == f"{program} (pyproxymap) {version()}\n", result.stderr
    where = subprocess.run([os.path.join(installed["PREFIX"], "bin", "python"), "-c",
                            "import master.control, proxymap.server as s; print(s.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    assert where.stdout.startswith(installed["PREFIX"] + "/lib/"), where
    assert os.path.exists(os.path.join(installed["DOCDIR"], "operations.md"))
    assert os.path.exists(os.path.join(installed["DOCDIR"], "examples", "master.cf"))
    assert os.path.exists(os.path.join(installed["DOCDIR"], "performance.png"))
    # the sample main.cf is one a site can start from: real paths, no placeholders
    with open(os.path.join(installed["DOCDIR"], "examples", "main.cf")) as f:
        sample = f.read()
    assert "@RUN@" not in sample
    assert "queue_directory = /var/spool/postfix" in sample
    link = os.path.join(installed["POSTFIX_DAEMON_DIR"], "pyproxymap")
    assert os.readlink(link) == os.path.join(installed["BINDIR"], "proxymap")


def test_installed_master_serves_real_postmap(installed):
    root = os.path.join(installed["root"], "site")
    os.makedirs(root)
    os.chmod(root, 0o755)
    # the metrics listener too: its library must come with the install
    site = MasterInstance(root, main_extra={"proxymap_metrics_listen": "127.0.0.1:0"})
    master = os.path.join(installed["BINDIR"], "proxymap-master")
    try:
        result = subprocess.run([master, "-c", site.config_dir, "start"], capture_output=True,
                                text=True, timeout=120, cwd="/")
        assert result.returncode == 0, result.stderr
        assert site.lookup("alice") == "alice@example.org"
        status = subprocess.run([master, "-c", site.config_dir, "status", "--json"],
                                capture_output=True, text=True, timeout=60)
        assert '"running": true' in status.stdout
        # the master is the installed program (workers are forked from it)
        import json
        import psutil
        pid = json.loads(status.stdout)["pid"]
        assert master in psutil.Process(pid).cmdline()
        import urllib.request
        address = json.loads(status.stdout)["metrics_listener"]["address"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as answer:
            assert b"pyproxymap_up 1.0" in answer.read()
        text = subprocess.run([master, "-c", site.config_dir, "status"], capture_output=True,
                              text=True, timeout=60)
        assert f"metrics listener {address} (pid " in text.stdout
    finally:
        subprocess.run([master, "-c", site.config_dir, "stop"], capture_output=True,
                       timeout=60)
        kill_leftover_workers(root)


def test_unit_matches_the_install(installed):
    path = os.path.join(installed["UNITDIR"], "proxymap.service")
    with open(path) as f:
        unit = f.read()
    master = os.path.join(installed["BINDIR"], "proxymap-master")
    assert f"ExecStart={master} -c ${{MAIL_CONFIG}} run" in unit
    assert f"ExecReload={master} -c ${{MAIL_CONFIG}} reload" in unit
    assert "Before=postfix.service" in unit
    assert "/usr/local/bin" not in unit
    with open(os.path.join(installed["LOGROTATEDIR"], "pyproxymap")) as f:
        assert f"{master} -c /etc/postfix reload" in f.read()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_passes_systemd_analyze(installed):
    path = os.path.join(installed["UNITDIR"], "proxymap.service")
    verify = subprocess.run(["systemd-analyze", "verify", path], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", path],
                              capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for proxymap.service: ([0-9.]+)",
                      security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 4.0, security.stdout
