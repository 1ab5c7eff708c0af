"""Bad configuration against the whole program: `check`, `reload`, broken tables.

* Every kind of main.cf / master.cf mistake makes `proxymap-master check`
  exit non-zero with one `fatal:` line naming the file and line (main.cf
  style `FILE, line N:`, master.cf style `FILE: line N:`, as Postfix
  prints them) -- including values only the workers read and `-o` values,
  which are located at their master.cf line.
* The same mistakes at `reload` are rejected: the old configuration keeps
  serving with the same workers and generation.
* A table that is missing, corrupt or unreadable answers RETRY with a
  logged reason and serves again once repaired, without any restart.

The parsing rules themselves are tested in-process by tests/test_config.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from proxymap.client import OK, RETRY, ProxyClient
from tests.instance import MASTER, MASTER_CF, mail_owner, needs_postmap, wait_for

pytestmark = needs_postmap

GOOD_MAIN = ["compatibility_level = 3.6", "queue_directory = {root}/queue",
             "data_directory = {root}/data", f"mail_owner = {mail_owner()}"]
FIRST_NEW = len(GOOD_MAIN) + 1          # line number of the first appended line

# (id, lines appended to main.cf, line reported, words in the message)
MAIN_CF_ERRORS = [
    ("syntax", ["this line has no equals sign"], 0, "missing '='"),
    ("bad-number", ["default_process_limit = abc"], 0, "bad numerical configuration"),
    ("bad-number-suffix", ["max_use = 12x"], 0, "bad numerical configuration"),
    ("bad-time-master", ["max_idle = 3 days"], 0, "bad time value"),
    ("bad-time-unit", ["daemon_timeout = 10q"], 0, "bad time value"),
    ("bad-throttle", ["service_throttle_time = soon"], 0, "bad time value"),
    ("bad-time-worker", ["ipc_timeout = forever"], 0, "bad time value"),
    ("bad-number-worker", ["proxymap_max_attributes = lots"], 0, "bad numerical"),
    ("bad-boolean", ["smtputf8_enable = maybe"], 0, "bad boolean configuration"),
    ("undefined-macro", ["max_idle = $no_such_parameter"], 0, "bad time value"),
    ("looping-macro", ["a = $b", "b = $a", "max_use = $a"], 2, "macro call nesting"),
    ("truncated-macro", ["max_idle = ${oops"], 0, "truncated macro"),
    ("unbalanced-allow-list", ["proxy_read_maps = {hash:/x"], 0, "missing '}'"),
    ("relative-queue", ["queue_directory = queue"], 0, "not an absolute path"),
]
if os.geteuid() == 0:           # mail_owner is only checked by a master started as root
    MAIN_CF_ERRORS += [
        ("mail-owner-unknown", ["mail_owner = no-such-user-pmtest"], 0, "unknown user"),
        ("mail-owner-root", ["mail_owner = root"], 0, "privileged user ID"),
    ]

_PM = "proxymap unix - - n - - proxymap"
_PW = "proxywrite unix - - n - 1 proxymap"

# (id, master.cf text, line reported, words in the message)
MASTER_CF_ERRORS = [
    ("unknown-type", f"{_PM}\nproxywrite unixx - - n - 1 proxymap\n", 2, "bad transport type"),
    ("too-few-columns", f"{_PM}\nproxywrite unix - - n -\n", 2, 'missing "max_proc"'),
    ("no-command", f"{_PM}\n{_PW[:-len(' proxymap')]}\n", 2, 'missing "command"'),
    ("bad-maxproc", f"proxymap unix - - n - many proxymap\n{_PW}\n", 1, '"max_proc"'),
    ("negative-maxproc", f"proxymap unix - - n - -2 proxymap\n{_PW}\n", 1, '"max_proc"'),
    ("bad-wakeup", f"proxymap unix - - n soon - proxymap\n{_PW}\n", 1, '"wakeup_time"'),
    ("inet-private", f"{_PM}\n{_PW}\n127.0.0.1:9999 inet y - n - - proxymap\n", 3,
     "cannot be private"),
    ("o-without-value", f"{_PM} -o\n{_PW}\n", 1, "-o requires"),
    ("o-without-equals", f"{_PM} -o max_use\n{_PW}\n", 1, "malformed -o"),
    ("o-unclosed-brace", f"{_PM} -o {{ max_use = 3\n{_PW}\n", 1, "missing '}'"),
    ("o-bad-number", f"{_PM}\n{_PW} -o max_use=zz\n", 2, "bad numerical configuration"),
    ("o-bad-time", f"{_PM} -o ipc_timeout=zz\n{_PW}\n", 1, "bad time value"),
    ("o-undefined-macro", f"{_PM} -o max_idle=$nope\n{_PW}\n", 1, "bad time value"),
    ("continued-line", f"{_PM}\nproxywrite unix - -\n  n - x proxymap\n", 2, '"max_proc"'),
    ("unknown-service-name", f"{_PM}\n{_PW}\nproxyother unix - - n - - proxymap\n", 3,
     "service name must be"),
]


def write_config(directory: str, main_lines: list[str], master_cf: str) -> None:
    root = os.path.dirname(directory)
    text = "".join(line.format(root=root) + "\n" for line in GOOD_MAIN) + \
        "".join(line + "\n" for line in main_lines)
    with open(os.path.join(directory, "main.cf"), "w") as f:
        f.write(text)
    with open(os.path.join(directory, "master.cf"), "w") as f:
        f.write(master_cf)


def check(directory: str) -> subprocess.CompletedProcess:
    return subprocess.run([MASTER, "-c", directory, "check"], capture_output=True,
                          text=True, timeout=60)


def assert_one_located_fatal(stderr: str, location: str, words: str) -> None:
    assert "Traceback" not in stderr
    fatal = [line for line in stderr.splitlines() if ": fatal: " in line]
    assert len(fatal) == 1, stderr
    assert location in fatal[0] and words in fatal[0], stderr


@pytest.fixture
def config_dir(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    return str(directory)


# -- check --------------------------------------------------------------------------------

def test_check_accepts_the_good_configuration(config_dir):
    write_config(config_dir, [], MASTER_CF)
    result = check(config_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("lines, offset, words", [c[1:] for c in MAIN_CF_ERRORS],
                         ids=[c[0] for c in MAIN_CF_ERRORS])
def test_check_rejects_main_cf_errors_with_file_and_line(config_dir, lines, offset, words):
    write_config(config_dir, lines, MASTER_CF)
    result = check(config_dir)
    assert result.returncode != 0
    where = f"{config_dir}/main.cf, line {FIRST_NEW + offset}:"
    assert_one_located_fatal(result.stderr, where, words)


@pytest.mark.parametrize("text, line, words", [c[1:] for c in MASTER_CF_ERRORS],
                         ids=[c[0] for c in MASTER_CF_ERRORS])
def test_check_rejects_master_cf_errors_with_file_and_line(config_dir, text, line, words):
    write_config(config_dir, [], text)
    result = check(config_dir)
    assert result.returncode != 0
    assert_one_located_fatal(result.stderr, f"{config_dir}/master.cf: line {line}:", words)


def test_check_without_files_names_the_file(config_dir):
    result = check(config_dir)
    assert result.returncode != 0
    assert_one_located_fatal(result.stderr, f"{config_dir}/main.cf", "No such file")


# -- reload -------------------------------------------------------------------------------

RELOAD_CASES = [
    ("main", ["syntax error here"], None, "main.cf, line"),
    ("main", ["max_idle = 3 fortnights"], None, "main.cf, line"),
    ("main", ["ipc_timeout = forever"], None, "main.cf, line"),     # read by workers only
    ("main", ["proxymap_max_request_size = huge"], None, "main.cf, line"),
    ("main", ["x = $y", "y = $x", "max_use = $x"], None, "main.cf, line"),
    ("master", [], f"{_PM} -o max_use\n{_PW}\n", "master.cf: line 1:"),
    ("master", [], f"{_PM}\n{_PW} -o ipc_timeout=never\n", "master.cf: line 2:"),
    ("master", [], f"{_PM}\nproxywrite bogus - - n - 1 proxymap\n", "master.cf: line 2:"),
    ("master", [], f"{_PM}\nproxywrite unix - -\n", "master.cf: line 2:"),
]


def test_rejected_reloads_keep_the_old_configuration_serving(instance):
    """One master, many bad reloads: each is refused with the location, the
    generation and every worker stay, lookups and updates are answered."""
    instance.run_foreground()
    main_path = os.path.join(instance.config_dir, "main.cf")
    with open(main_path) as f:
        good_main = f.read()
    reader = {w["pid"] for w in instance.workers("proxymap")}
    writer = {w["pid"] for w in instance.workers("proxywrite")}
    rejected = 0
    for which, main_lines, master_text, where in RELOAD_CASES:
        instance._replace("main.cf", good_main + "".join(x + "\n" for x in main_lines))
        instance.write_master_cf(master_text or MASTER_CF)
        result = instance.control("reload")
        assert result.returncode != 0, (which, main_lines, master_text)
        assert f"{instance.config_dir}/{where}" in result.stderr
        assert "Traceback" not in result.stderr
        status = instance.raw_status()
        assert status["generation"] == 0
        # a main.cf that cannot even be parsed stops `reload` before it
        # signals; anything else reaches the master, which rejects it
        if "reload rejected" in result.stderr:
            rejected += 1
            assert where in status["reload_error"] and status["reloads"] == rejected
        assert {w["pid"] for w in instance.workers("proxymap")} == reader
        assert {w["pid"] for w in instance.workers("proxywrite")} == writer
    # the old configuration still answers, through both services
    instance._replace("main.cf", good_main)
    instance.write_master_cf(MASTER_CF)
    assert instance.lookup("alice") == "alice@example.org"
    assert instance.delete("k3").returncode == 0
    assert instance.lookup("k3", instance.write_table) is None
    assert rejected >= len(RELOAD_CASES) - 1
    assert instance.log().count("reload rejected") == rejected
    # and a good configuration is accepted afterwards
    instance.write_main_cf(max_idle="99s")
    result = instance.control("reload")
    assert result.returncode == 0, result.stderr
    status = instance.raw_status()
    assert status["generation"] == 1 and status["reload_error"] == ""
    # proxywrite is started on demand: its old worker leaves at once and
    # the next update starts one of the new configuration
    wait_for(lambda: not instance.workers("proxywrite"), 30, what="the old writer to leave")
    assert instance.delete("k1").returncode == 0
    wait_for(lambda: {w["generation"] for w in instance.workers("proxywrite")} == {1}, 30,
             what="a new-generation writer")
    assert instance.lookup("k2", instance.write_table) == "v2"


# -- broken tables ------------------------------------------------------------------------

def lookup_status(instance, table: str, key: bytes = b"alice") -> tuple[int, bytes]:
    with ProxyClient(instance.socket_path(), timeout=20) as client:
        return client.lookup(table, 0, key)


def test_missing_corrupt_and_unreadable_tables_retry_then_recover(instance):
    extra = f"hash:{instance.table_dir}/extra"
    instance.write_main_cf(proxy_read_maps=f"proxy:{instance.read_table} proxy:{extra}")
    instance.run_foreground()
    (worker,) = [w["pid"] for w in instance.workers("proxymap")]
    source = os.path.join(instance.table_dir, "extra")
    db = source + ".db"

    def repaired(spec=extra):
        return lookup_status(instance, spec) == (OK, b"alice@example.org")

    # missing: RETRY with the reason in the worker's log
    assert lookup_status(instance, extra) == (RETRY, b"")
    wait_for(lambda: f"open table {extra}" in instance.log(), 10, what="the logged reason")
    assert "No such file" in instance.log() or "not exist" in instance.log()
    # created afterwards: served without a restart
    shutil.copy(os.path.join(instance.table_dir, "read"), source)
    assert instance.postmap(extra).returncode == 0
    if os.geteuid() == 0:
        shutil.chown(db, mail_owner(), mail_owner())
    wait_for(repaired, 10, what="the created table to be served")

    # corrupt: garbage replaces the database file
    log_before = len(instance.log())
    with open(db, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.write(os.urandom(size))
    os.utime(db, (1, 1))                 # a different mtime, surely
    wait_for(lambda: lookup_status(instance, extra)[0] == RETRY, 10,
             what="RETRY for the corrupt table")
    wait_for(lambda: extra in instance.log()[log_before:], 10, what="a logged reason")
    assert instance.postmap(extra).returncode == 0           # rebuilt
    if os.geteuid() == 0:
        shutil.chown(db, mail_owner(), mail_owner())
    wait_for(repaired, 10, what="the rebuilt table to be served")

    # unreadable for the workers (which run as mail_owner when we are root)
    if os.geteuid() == 0:
        log_before = len(instance.log())
        os.chmod(db, 0)
        os.utime(db, None)
        wait_for(lambda: lookup_status(instance, extra)[0] == RETRY, 10,
                 what="RETRY for the unreadable table")
        wait_for(lambda: "Permission denied" in instance.log()[log_before:], 10,
                 what="the permission error in the log")
        os.chmod(db, 0o644)
        wait_for(repaired, 10, what="the readable table to be served")

    # the other table was answered all along, by the same worker
    assert lookup_status(instance, instance.read_table, b"bob") == (OK, b"bob@example.org")
    assert [w["pid"] for w in instance.workers("proxymap")] == [worker]
    assert instance.raw_status()["generation"] == 0
