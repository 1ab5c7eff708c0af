"""Deploying the master on a site: a service file of its own next to
Postfix's master.cf, `check` warnings as postconf gives them, `--version`,
and output to a closed pipe (issue 13).

The site's configuration directory holds Postfix's stock master.cf
(/usr/share/postfix/master.cf.dist, from the Debian package) with its
proxymap/proxywrite lines commented out, as docs/operations.md tells an
admin to do; our services come from a file of their own.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.instance import MASTER, MASTER_CF, needs_postmap, wait_for

POSTFIX_MASTER_CF = "/usr/share/postfix/master.cf.dist"
BIN = os.path.dirname(MASTER)

pytestmark = needs_postmap


def postfix_master_cf_without_proxymap() -> str:
    """Postfix's stock master.cf with its proxymap lines commented out."""
    with open(POSTFIX_MASTER_CF) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        if line.split()[:1] in (["proxymap"], ["proxywrite"]):
            line = "#" + line
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture
def site(instance):
    """An instance whose master.cf is Postfix's; ours in proxymap-master.cf."""
    if not os.path.exists(POSTFIX_MASTER_CF):
        pytest.skip("no Postfix master.cf.dist")
    instance.write_master_cf(postfix_master_cf_without_proxymap())
    ours = os.path.join(instance.config_dir, "proxymap-master.cf")
    with open(ours, "w") as f:
        f.write(MASTER_CF)
    instance.service_file = ours
    return instance


# -- 1. beside Postfix's master: a service file of our own ----------------------------------

def test_postfix_master_cf_alone_has_no_service_for_us(site):
    result = site.control("check")
    assert result.returncode == 1
    assert f"{site.config_dir}/master.cf: no proxymap service" in result.stderr
    assert "is not served by proxymap-master" in result.stderr


def test_service_file_option_ignores_postfix_master_cf(site):
    result = site.control("-m", site.service_file, "check")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    result = site.control("-m", site.service_file, "start")
    assert result.returncode == 0, result.stderr
    assert site.lookup("alice") == "alice@example.org"          # real postmap through us
    assert site.delete("k1", site.write_table).returncode == 0
    assert site.lookup("k1", site.write_table) is None
    # a reload re-reads the same file: a changed maxproc there takes effect
    with open(site.service_file, "w") as f:
        f.write(MASTER_CF.replace("n       -       -       proxymap",
                                  "n       -       7       proxymap"))
    before = site.raw_status()["generation"]
    assert site.control("reload").returncode == 0
    status = wait_for(lambda: (s := site.raw_status()).get("generation", 0) > before and s,
                      what="the reload")
    assert status["services"]["proxymap"]["maxproc"] == 7
    assert "not served by" not in site.log()
    assert site.lookup("bob") == "bob@example.org"


def test_service_file_parameter_in_main_cf(site):
    site.write_main_cf(proxymap_master_cf="$config_directory/proxymap-master.cf")
    result = site.control("check")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert site.control("config", "-x", "proxymap_master_cf").stdout == \
        f"proxymap_master_cf = {site.service_file}\n"
    site.write_main_cf(proxymap_master_cf="no-such-file.cf")
    result = site.control("check")
    assert result.returncode == 1
    assert f"open {site.config_dir}/no-such-file.cf: No such file" in result.stderr


# -- 6. check as postconf does it -----------------------------------------------------------

def warnings_of(result) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line.split(": warning: ", 1)[1] for line in result.stderr.splitlines()
            if ": warning: " in line]


def test_check_warns_like_postconf_and_keeps_its_status(instance):
    etc = instance.config_dir
    tables = instance.table_dir
    with open(os.path.join(tables, "secret"), "w") as f:
        f.write("1.2.3.4 REJECT\n")
    os.chmod(os.path.join(tables, "secret"), 0o600)
    os.chown(os.path.join(tables, "secret"), 0, 0) if os.geteuid() == 0 else None
    read_maps = " ".join([f"proxy:{instance.read_table}", f"proxy:{instance.write_table}",
                          "proxy:nosuchtype:/x", "proxy:ldap:/etc/nothing.cf",
                          f"proxy:hash:{tables}/missing", f"proxy:cidr:{tables}/secret"])
    # proxywrite creates a missing table (verify's cache on a new site):
    # not worth a warning while its directory exists
    write_maps = (f"proxy:{instance.write_table} proxy:btree:{tables}/created-later "
                  f"proxy:btree:{tables}/no-dir/cache")
    instance.write_main_cf(max_idel="5s", proxymap_worker_busy_client="4",
                           proxy_read_maps=read_maps, proxy_write_maps=write_maps)
    instance.write_master_cf(MASTER_CF.replace(
        "proxymap    unix  -       -       n       -       -       proxymap",
        "proxymap    unix  -       -       y       -       -       proxymap -o max_usee=3"))
    result = instance.control("check")
    assert result.returncode == 0, result.stderr
    got = warnings_of(result)
    # what real postconf says about the same directory, less our own parameters
    assert f"{etc}/main.cf: unused parameter: max_idel=5s" in got
    assert f"{etc}/main.cf: unused parameter: proxymap_worker_busy_client=4" in got
    assert f"{etc}/master.cf: unused parameter: max_usee=3" in got
    assert not any("proxymap_worker_busy_clients" in w for w in got)
    where = f"{etc}/main.cf: proxy_read_maps: table"
    assert f"{where} nosuchtype:/x: unsupported dictionary type: nosuchtype" in got
    # ldap: is served now: not reported as an unsupported type
    assert not any(w.startswith(f"{where} ldap:/etc/nothing.cf: unsupported") for w in got), got
    assert (f"{where} hash:{tables}/missing: open {tables}/missing.db: "
            f"No such file or directory") in got
    assert not any("created-later" in w for w in got), got
    assert (f"{etc}/main.cf: proxy_write_maps: table btree:{tables}/no-dir/cache: open "
            f"{tables}/no-dir/cache.db: No such file or directory") in got
    if os.geteuid() == 0:
        assert any(w.startswith(f"{where} cidr:{tables}/secret: open {tables}/secret: "
                                f"Permission denied") for w in got), got
    assert any("master.cf: line 2: service proxymap/unix: chroot = y is ignored" in w
               for w in got), got
    assert len(got) == len(set(got)), got          # one line per finding


def test_packaged_type_we_do_not_serve_gets_the_package_hint(monkeypatch):
    from master import checks
    monkeypatch.setattr(checks, "TABLE_TYPES",
                        {k: v for k, v in checks.TABLE_TYPES.items() if k != "ldap"})
    assert checks.table_problem("ldap:/etc/nothing.cf", None) == (
        "unsupported dictionary type: ldap. Is the postfix-ldap package installed?")
    assert checks.table_problem("nosuchtype:/x", None) == "unsupported dictionary type: nosuchtype"


def test_unused_parameters_agree_with_real_postconf(instance):
    instance.write_main_cf(max_idel="5s", smtpd_banner="hi", my_own="x",
                           proxy_read_maps=f"proxy:{instance.read_table} $my_own")
    ours = {w for w in warnings_of(instance.control("check")) if "unused parameter" in w}
    real = subprocess.run(["script", "-qec", f"/usr/sbin/postconf -c {instance.config_dir} -n",
                           "/dev/null"], capture_output=True, text=True, timeout=60)
    theirs = {line.split(": warning: ", 1)[1].strip() for line in real.stdout.splitlines()
              if "unused parameter" in line and "proxymap_" not in line}
    assert ours == theirs == {f"{instance.config_dir}/main.cf: unused parameter: max_idel=5s"}


# -- 4. --version ------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["proxymap-master", "proxymap", "proxymap-postmap"])
def test_every_command_has_version(program):
    from proxymap import version
    result = subprocess.run([os.path.join(BIN, program), "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{program} (pyproxymap) {version()}\n"
    assert version() not in ("", "unknown")


# -- 7. output to a closed pipe ----------------------------------------------------------------

def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """The command with a stdout pipe whose reader is already gone, so the
    very first write fails with EPIPE (what `| head -1` does at random)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([MASTER, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)


def test_closed_pipe_ends_quietly(instance):
    result = run_into_closed_pipe("-c", instance.config_dir, "config")
    assert (result.returncode, result.stderr) == (0, "")
    result = run_into_closed_pipe("-c", instance.config_dir, "status", "--json")
    assert (result.returncode, result.stderr) == (1, "")     # not running: status 1, quietly
    instance.start()
    for args in (["status", "--json"], ["status"], ["config", "-n"]):
        result = run_into_closed_pipe("-c", instance.config_dir, *args)
        assert (result.returncode, result.stderr) == (0, ""), args


# -- 5. logs as Postfix writes them ---------------------------------------------------------

LINE = r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d (\S+) (\S+)\[(\d+)\]: (.*)$"


@pytest.fixture
def logged(tmp_path):
    """An instance logging to maillog_file, with myhostname mx.example.com."""
    from tests.instance import temporary_instance
    with temporary_instance(tmp_path) as inst:
        inst.maillog = os.path.join(inst.root, "maillog")
        inst.write_main_cf(maillog_file=inst.maillog, maillog_file_prefixes=inst.root,
                           myhostname="mx.example.com")
        yield inst


def log_lines(path: str) -> list[tuple[str, ...]]:
    import re
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.splitlines()
    parsed = [re.match(LINE, line) for line in lines]
    assert all(parsed), lines          # every line in the one format
    return [m.groups() for m in parsed]


def test_log_lines_have_the_hostname_field_as_postfix_writes_it(logged):
    # what real Postfix writes to the same maillog_file
    subprocess.run(["/usr/sbin/postlog", "-c", logged.config_dir, "-t", "postfix/probe",
                    "hello"], check=True, timeout=60, capture_output=True)
    logged.start()
    unapproved_lookup(logged)
    lines = wait_for(lambda: (ls := log_lines(logged.maillog)) and
                     any("unapproved" in line[3] for line in ls) and ls,
                     what="the worker's warning")
    real = [line for line in lines if line[1] == "postfix/probe"]
    assert real == [("mx", "postfix/probe", real[0][2], "hello")]
    ours = [line for line in lines if line[1] != "postfix/probe"]
    assert {line[0] for line in ours} == {"mx"}
    assert any(line[1] == "postfix/proxymap-master" and
               line[3].startswith("daemon started") for line in ours)
    assert any(line[1] == "postfix/proxymap" and "unapproved" in line[3] for line in ours)


def unapproved_lookup(inst) -> None:
    result = inst.postmap("-q", "x", "proxy:hash:/not/listed")
    assert result.returncode != 0


def test_reload_reopens_the_log_in_every_process(logged):
    logged.start()
    unapproved_lookup(logged)
    first = wait_for(lambda: [line for line in log_lines(logged.maillog)
                              if "unapproved" in line[3]], what="the worker's warning")
    worker = first[0][2]
    os.rename(logged.maillog, logged.maillog + ".1")       # what logrotate does
    assert logged.control("reload").returncode == 0
    unapproved_lookup(logged)
    new = wait_for(lambda: [line for line in log_lines(logged.maillog)
                            if "unapproved" in line[3]], what="a warning in the new file")
    assert worker in {line[2] for line in new}, (worker, new)   # the same, kept worker
    assert any(line[3].startswith("reload") for line in log_lines(logged.maillog))
    old = log_lines(logged.maillog + ".1")
    assert sum("unapproved" in line[3] for line in old) == len(first)


def test_one_line_per_table_change(logged):
    logged.start()
    assert logged.lookup("alice") == "alice@example.org"
    logged.make_tables()
    future = 4102444800                 # an mtime that never settles: every request reopens
    os.utime(logged.read_table.split(":", 1)[1] + ".db", (future, future))
    for _ in range(4):
        assert logged.lookup("bob") == "bob@example.org"
    changed = [line for line in log_lines(logged.maillog) if "has changed" in line[3]]
    pids = [line[2] for line in changed]
    assert changed and len(pids) == len(set(pids)), changed     # one line per worker


def test_start_warns_when_lines_would_go_nowhere(instance):
    result = instance.control("start")
    assert result.returncode == 0, result.stderr
    warned = "will log nowhere" in result.stderr
    assert warned == (not os.path.exists("/dev/log")), result.stderr


@pytest.mark.skipif(not os.path.exists("/usr/sbin/logrotate"), reason="needs logrotate")
def test_logrotate_snippet_rotates_every_process_log(logged):
    with open(os.path.join(os.path.dirname(__file__), "..", "etc", "logrotate.d",
                           "pyproxymap")) as f:
        text = f.read()
    text = text.replace("/var/log/proxymap.log", logged.maillog) \
        .replace("/usr/local/bin/proxymap-master", MASTER) \
        .replace("-c /etc/postfix", f"-c {logged.config_dir}")
    conf = os.path.join(logged.root, "logrotate.conf")
    with open(conf, "w") as f:
        f.write(text)
    logged.start()
    unapproved_lookup(logged)
    wait_for(lambda: any("unapproved" in line[3] for line in log_lines(logged.maillog)),
             what="the worker's first warning")
    result = subprocess.run(["/usr/sbin/logrotate", "-f", "-s",
                             os.path.join(logged.root, "logrotate.state"), conf],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(logged.maillog + ".1")
    unapproved_lookup(logged)
    new = wait_for(lambda: [line for line in log_lines(logged.maillog)
                            if "unapproved" in line[3]], what="a warning in the new file")
    assert {line[1] for line in new} == {"postfix/proxymap"}
    assert any(line[3].startswith("reload") for line in log_lines(logged.maillog))


# -- 3. socket takeover ---------------------------------------------------------------------

def refused(path: str) -> bool:
    """A connection to `path` is refused (what every Postfix client gets)."""
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="a real Postfix master needs root")
def test_socket_taken_over_by_postfix_master_is_reported_and_reload_rebinds(instance):
    from tests.test_real_daemons import RealPostfix, free_port
    instance.start()
    path = instance.socket_path("proxymap")
    ours = os.stat(path).st_ino
    assert instance.lookup("alice") == "alice@example.org"
    assert instance.status()["services"]["proxymap"]["socket"] == "ours"
    # Postfix's master with its proxymap line still in place binds the same socket
    real = RealPostfix(instance.root, instance, free_port(), "")
    real._write("master.cf", "proxymap unix - - n - - proxymap\n"
                             "postlog unix-dgram n - n - 1 postlogd\n")
    try:
        real.start()
        wait_for(lambda: os.stat(path).st_ino != ours, what="Postfix's master to bind")
        status = instance.status()
        assert status["services"]["proxymap"]["socket"] == "replaced"
        assert status["services"]["proxywrite"]["socket"] == "ours"
        text = instance.control("status").stdout
        assert f"socket {path} replaced by another process" in text
        result = instance.control("check")
        assert result.returncode == 1
        assert f"socket file {path} is no longer ours" in result.stderr
        # the admin removes Postfix's line again: its socket file stays, dead
        real._write("master.cf", "postlog unix-dgram n - n - 1 postlogd\n")
        assert real.postfix("reload").returncode == 0
        wait_for(lambda: refused(path), what="Postfix's master to close its socket")
        # our reload binds it again
        assert instance.control("reload").returncode == 0
        assert instance.lookup("alice") == "alice@example.org"
        assert instance.status()["services"]["proxymap"]["socket"] == "ours"
        assert instance.control("check").returncode == 0
    finally:
        real.stop()
