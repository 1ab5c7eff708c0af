"""Tests for proxymap/conventions/ and master/master_cf.py: main.cf/master.cf syntax, `$` expansion,
value conversions, allow-lists, and agreement with real postconf(1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from master.master_cf import Service, load_master_cf, parse_master_cf, parse_overrides, split_command_args
from proxymap.allowlist import proxy_allow_set
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.expansion import MacroError, compare, expand
from proxymap.conventions.main_cf import load_main_cf, parse_main_cf, split_name_value
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.parameters import DEFAULTS, OWN_PARAMETERS
from proxymap.conventions.values import parse_int, parse_table_list, parse_time, split_list
from proxymap.util.logical_lines import read_logical_lines

POSTCONF = shutil.which("postconf") or ("/usr/sbin/postconf"
                                        if os.path.exists("/usr/sbin/postconf") else None)
needs_postconf = pytest.mark.skipif(POSTCONF is None, reason="real postconf not installed")


def make_dir(tmp_path, main_cf: str, master_cf: str = "") -> str:
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    (d / "main.cf").write_text(main_cf)
    (d / "master.cf").write_text(master_cf)
    return str(d)


def load(tmp_path, main_cf: str, **kw) -> MainConfig:
    warnings: list[str] = []
    cfg = load_main_cf(make_dir(tmp_path, main_cf), warn=warnings.append, **kw)
    return cfg


def lookup_from(values: dict[str, str]):
    return values.get


def postconf(config_dir: str, *args: str) -> str:
    result = subprocess.run([POSTCONF, "-c", config_dir, *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def normalise(value: str) -> str:
    """postconf prints values with whitespace runs collapsed."""
    return " ".join(value.split())


# ---------------------------------------------------------------------------
# Lexical layer


def test_logical_lines_continuations_and_comments():
    data = b"a = one,\n  two\n\n# comment\nb = x\n\n   y\n#c\n   z\n  \n"
    lines = read_logical_lines(data, "main.cf", pytest.fail)
    assert lines == [(1, "a = one,  two"), (5, "b = x   y   z")]


def test_leading_whitespace_line_is_warned_and_skipped():
    warnings: list[str] = []
    lines = read_logical_lines(b"  orphan = 1\nx = 2\n", "/e/main.cf", warnings.append)
    assert lines == [(2, "x = 2")]
    assert warnings == ['/e/main.cf: logical line must not start with whitespace: "orphan = 1"']


@pytest.mark.parametrize("line, expected", [
    ("a=b", ("a", "b")),
    ("  a   =   b  c  ", ("a", "b  c")),
    ("relayhost = value # note", ("relayhost", "value # note")),
    ("a =", ("a", "")),
    ("odd-name = 1", ("odd-name", "1")),
    ("a = b = c", ("a", "b = c")),
])
def test_split_name_value(line, expected):
    assert split_name_value(line) == expected


@pytest.mark.parametrize("line, reason", [
    ("novalue", "missing '=' after attribute name: \"novalue\""),
    ("two words = x", "missing '=' after attribute name: \"two words = x\""),
    ("= x", "missing attribute name"),
])
def test_split_name_value_errors(line, reason):
    with pytest.raises(ConfigError) as info:
        split_name_value(line)
    assert info.value.reason == reason


def test_parse_main_cf_last_wins_with_warning():
    warnings: list[str] = []
    entries = parse_main_cf(b"a = 1\nb = 2\na = 3\n", "/e/main.cf", warnings.append)
    assert entries == {"b": ("2", 2), "a": ("3", 3)}
    assert warnings == ["/e/main.cf, line 3: overriding earlier entry: a=1"]


def test_parse_main_cf_error_names_file_and_first_line():
    with pytest.raises(ConfigError) as info:
        parse_main_cf(b"a = 1\n# c\nbroken\n  continued\n", "/e/main.cf", pytest.fail)
    assert str(info.value) == ('/e/main.cf, line 3: missing \'=\' after attribute name: '
                               '"broken  continued"')


# ---------------------------------------------------------------------------
# Expansion

VALUES = {"a": "hello", "empty": "", "b": "$empty", "loop1": "$loop2", "loop2": "$loop1",
          "deep": "${a?{$a_one}}", "a_one": "$a-1"}


@pytest.mark.parametrize("text, expected", [
    ("${a?yes}|${a:no}|${undefined_x?yes}|${undefined_x:no}|${empty?yes}|${empty:no}",
     "yes|||no||no"),
    ("${a?{ yes }:{ no }}|${empty?{Y}:{N}}|${a?{Y}:N}", " yes |N|Y"),
    ("${{$a} == {hello}?{eq}:{ne}} ${{10} < {9}?{lt}:{ge}} ${{abc} < {abd}?{lt}:{ge}}",
     "eq ge lt"),
    ("[${{1}=={1}}] [${{1}=={2}}]", "[true] []"),
    ("${a}-$(a)-$$a-$a_x", "hello-hello-$a-"),
    ("x${a ? yes:no}x", "x yes:nox"),
    ("x${a?{ yes }}x", "x yes x"),
    ("${empty?{x}:${a}}", "hello"),
    ("${empty?{x} : { y } }", " y "),
    ("${a?{{nested}}}", "{nested}"),
    ("${a?{x}}:{y}", "x:{y}"),
    ("${ a }", "hello"),
    ("${{010} == {10}}", "true"),
    ("${{3.6} <level {3.10}?{t}:{f}} ${{3.6} < {3.10}?{t}:{f}}", "t f"),
    ("${{3.6.1} <=level {3.6}?{t}:{f}} ${{2} >level {10}?{t}:{f}}", "f f"),
    ("${{ 5 } == {5}?{t}:{f}}", "f"),
    ("${b?yes}/${b:no}", "yes/"),          # the test looks at the raw value
    ("$deep", "hello-1"),
    ("no dollars here", "no dollars here"),
])
def test_expand(text, expected):
    assert expand(text, lookup_from(VALUES)) == expected


@pytest.mark.parametrize("text, message", [
    ("$loop1", "unreasonable macro call nesting"),
    ("${a", "truncated macro reference"),
    ("$(a", "truncated macro reference"),
    ("x $", "empty macro name"),
    ("$-x", "empty macro name"),
    ("$(a$(a))", "attribute name syntax error"),
    ("${a{x}}", "attribute name syntax error"),      # functions are 3.11+
    ("${empty:{E1}?{E2}}", "unexpected input"),
    ("${a:{E1}:{E2}}", "unexpected input"),
    ("${{1} =~ {2}}", "expected at"),
    ("${{1} == {2} x}", "\"?\" or \":\" expected"),
    ("${{1} <level {x}}", "malformed compatibility level"),
])
def test_expand_errors(text, message):
    with pytest.raises(MacroError) as info:
        expand(text, lookup_from(VALUES))
    assert message in str(info.value)


def test_compare_numeric_and_string_order():
    assert compare("010", "==", "10")
    assert not compare("3.6", "<", "3.10")
    assert compare("3.6", "<level", "3.10")
    assert compare("b", ">", "a")


# ---------------------------------------------------------------------------
# Conversions


@pytest.mark.parametrize("value, expected", [
    ("a b,c", ["a", "b", "c"]),
    (" a ,\t, b\n", ["a", "b"]),
    ("{ a b } c", ["{ a b }", "c"]),
    ("unionmap:{hash:/a, hash:/b} x", ["unionmap:{hash:/a, hash:/b}", "x"]),
    ("inline:{ {k = v}, {k2=v2} }", ["inline:{ {k = v}, {k2=v2} }"]),
    ("", []),
])
def test_parse_table_list(value, expected):
    assert parse_table_list(value) == expected


def test_parse_table_list_unbalanced():
    with pytest.raises(ConfigError, match="missing '}'"):
        parse_table_list("a {b c")


def test_split_list_unwraps_groups():
    assert split_list("{ a b }, c, pipemap:{x,y}") == ["a b", "c", "pipemap:{x,y}"]


@pytest.mark.parametrize("value, unit, seconds", [
    ("10", "s", 10), ("10s", "s", 10), ("2m", "s", 120), ("3h", "s", 10800),
    ("1d", "s", 86400), ("1w", "s", 604800), ("5sec", "s", 5), ("4", "d", 4 * 86400),
    ("0", "s", 0),
])
def test_parse_time(value, unit, seconds):
    assert parse_time(value, unit) == seconds


@pytest.mark.parametrize("value", ["", "x", "10x", "-1", " 5", "10S", "99999999999"])
def test_parse_time_rejects(value):
    with pytest.raises(ValueError):
        parse_time(value)


def test_parse_int():
    assert parse_int("42") == 42
    assert parse_int("-3") == -3
    for bad in ("", "4x", "1.5", "3000000000"):
        with pytest.raises(ValueError):
            parse_int(bad)
    assert parse_int("3000000000", 2**63 - 1) == 3000000000


# ---------------------------------------------------------------------------
# Allow-lists


@pytest.mark.parametrize("value, expected", [
    ("proxy:unix:passwd.byname hash:/etc/aliases, nis:mail.aliases", {"unix:passwd.byname"}),
    ("proxy:proxy:hash:/x, proxy:lmdb:/y", {"hash:/x", "lmdb:/y"}),
    ("{ proxy:hash:/g other words }", {"hash:/g"}),
    ("unionmap:{proxy:hash:/a, hash:/b, proxy:cdb:/c}", {"hash:/a", "cdb:/c"}),
    ("pipemap:{proxy:hash:/a, unionmap:{proxy:texthash:/z}}", {"hash:/a", "texthash:/z"}),
    ("proxy:unionmap:{hash:/a,hash:/b}", {"unionmap:{hash:/a,hash:/b}"}),
    ("proxy:nocolon proxy: hash:/x", set()),
    ("", set()),
])
def test_proxy_allow_set(value, expected):
    assert proxy_allow_set(value) == expected


# ---------------------------------------------------------------------------
# MainConfig


def test_load_main_cf_basics(tmp_path):
    cfg = load(tmp_path, "queue_directory = /q\nmax_use = 7\nmy_thing = $queue_directory/x\n"
                         "bad_int = 12abc\nflag = YES\n")
    assert os.path.isabs(cfg.config_directory)
    assert cfg.get("config_directory") == cfg.config_directory
    assert cfg.get("my_thing") == "/q/x"
    assert cfg.raw("my_thing") == "$queue_directory/x"
    assert cfg.raw("max_idle") is None
    assert cfg.get("max_idle") == "100s"
    assert cfg.get("no_such_parameter") == ""
    assert cfg.get_int("max_use") == 7
    assert cfg.get_time("max_idle") == 100
    assert cfg.get_time("daemon_timeout") == 18000
    assert cfg.get_bool("flag") is True
    with pytest.raises(ConfigError) as info:
        cfg.get_int("bad_int")
    assert str(info.value).endswith("main.cf, line 4: bad numerical configuration: "
                                    "bad_int = 12abc")
    assert cfg.explicit()["max_use"] == "7"
    assert cfg.explicit()["config_directory"] == cfg.config_directory


def test_smtputf8_follows_compatibility_level(tmp_path):
    assert load(tmp_path, "compatibility_level = 0\n").get_bool("smtputf8_enable") is False
    assert load(tmp_path, "compatibility_level = 3.6\n").get_bool("smtputf8_enable") is True


def test_value_errors_name_file_and_line(tmp_path):
    cfg = load(tmp_path, "a = 1\nmax_use = 0\nmax_idle = 10x\nb = yes please\n"
                         "loop_a = $loop_b\nloop_b = $loop_a\nipc_timeout = 0\n")
    cases = {
        "max_use": "line 2: invalid max_use parameter value 0 < 1",
        "max_idle": "line 3: parameter max_idle: bad time value or unit: 10x",
        "b": "line 4: bad boolean configuration: b = yes please",
        "ipc_timeout": "line 7: invalid ipc_timeout: 0 (min 1)",
    }
    for name, tail in cases.items():
        with pytest.raises(ConfigError) as info:
            {"max_use": cfg.get_int, "max_idle": cfg.get_time, "b": cfg.get_bool,
             "ipc_timeout": cfg.get_time}[name](name)
        assert str(info.value).endswith(tail)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"main\.cf, line \d: parameter loop_a: "
                                          r"unreasonable macro call nesting"):
        cfg.get("loop_a")


def test_time_default_unit_comes_from_parameter(tmp_path):
    cfg = load(tmp_path, "max_idle = 7\nmy_days = 2\n")
    assert cfg.get_time("max_idle") == 7
    assert cfg.get_time("my_days", "d") == 2 * 86400


def test_missing_main_cf_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="main.cf: No such file or directory"):
        load_main_cf(str(tmp_path / "nowhere"), warn=lambda m: None)


def test_overrides(tmp_path):
    cfg = load(tmp_path, "syslog_name = base\nqueue_directory = /q\n",
               overrides={"max_use": "5"})
    assert cfg.get_int("max_use") == 5
    child = cfg.with_overrides({"syslog_name": "$syslog_name/pw", "max_use": "9"})
    # an override's $name refers to the parameter namespace, not to itself
    # recursively forever: `$syslog_name` inside its own override loops as in Postfix
    with pytest.raises(ConfigError, match="-o syslog_name=.*nesting"):
        child.get("syslog_name")
    child = cfg.with_overrides({"other": "$queue_directory/x", "max_use": "9"})
    assert child.get("other") == "/q/x"
    assert child.get_int("max_use") == 9
    assert cfg.get_int("max_use") == 5            # original unchanged
    assert cfg.get("other") == ""


def test_read_only_parameters(tmp_path):
    cfg = load(tmp_path, "process_id = 1\nprocess_name = fake\n",
               overrides={"process_id": "2"})
    assert cfg.get("process_id") == str(os.getpid())
    assert cfg.get("process_name") == cfg.process_name != "fake"


def test_default_allow_sets(tmp_path):
    cfg = load(tmp_path, "compatibility_level = 3.6\n")
    assert proxy_allow_set(cfg.get("proxy_read_maps")) == {"unix:passwd.byname"}
    assert proxy_allow_set(cfg.get("proxy_write_maps")) == set()
    cfg = load(tmp_path, "address_verify_map = proxy:btree:$data_directory/verify\n"
                         "data_directory = /d\nalias_maps = proxy:hash:/etc/aliases\n")
    assert proxy_allow_set(cfg.get("proxy_write_maps")) == {"btree:/d/verify"}
    assert proxy_allow_set(cfg.get("proxy_read_maps")) == {"unix:passwd.byname",
                                                           "hash:/etc/aliases"}


def test_own_parameters():
    assert DEFAULTS["proxymap_max_attributes"] == "32"
    assert DEFAULTS["proxymap_max_request_size"] == "1048576"


# ---------------------------------------------------------------------------
# Agreement with real postconf

TRICKY_MAIN_CF = [
    # continuation lines, comments inside continued values, '#' in values
    "compatibility_level = 3.6\nt1 = one,\n  two\n\n# comment\n    three # not a comment\n",
    # conditionals and nested braces
    "a = hello\nempty =\nt1 = ${a?{x${empty:{ inner }}y}:{no}}\n"
    "t2 = ${empty?{x}:{${a?{$a $a}}}}\nt3 = ${a ? yes:no} ${undefined_q:{dflt}}\n"
    "t4 = ${{$a} != {hello}?{ne}:{eq}} $(a) $$ ${{$compatibility_level} <level {2}}\n",
    # defaults of referenced parameters
    "compatibility_level = 3.6\nqueue_directory = /tmp/q\ndata_directory = /tmp/d\n"
    "t1 = $proxy_read_maps\nt2 = $proxy_write_maps\nt3 = $relay_domains\n"
    "myhostname = mail.example.org\nt4 = $mydestination $syslog_name $smtputf8_enable\n",
    # legacy compatibility level changes conditional defaults
    "t1 = $relay_domains $smtpd_relay_restrictions $mynetworks_style\n"
    "multi_instance_name = postfix-b\nt2 = $syslog_name\n",
    # user overrides of referenced parameters
    "alias_maps = proxy:hash:/etc/aliases, { proxy:lmdb:/x y }\n"
    "virtual_maps = pipemap:{proxy:hash:/v, hash:/w}\nt1 = $proxy_read_maps\n"
    "t2 = $local_recipient_maps\n",
]


@needs_postconf
@pytest.mark.interop
@pytest.mark.parametrize("text", TRICKY_MAIN_CF)
def test_expansion_matches_postconf(tmp_path, text):
    names = sorted(set(re.findall(r"^(t\d+) =", text, re.M)))
    text += "zz_refs = " + " ".join(f"${n}" for n in names) + "\n"
    config_dir = make_dir(tmp_path, text)
    cfg = load_main_cf(config_dir, warn=lambda m: None)
    wanted = names + ["proxy_read_maps", "proxy_write_maps", "mydestination", "relay_domains",
                      "syslog_name", "mynetworks", "myhostname", "mydomain", "smtputf8_enable"]
    out = postconf(config_dir, "-x", *wanted)
    real = dict(line.split(" =", 1) for line in out.splitlines())
    for name in wanted:
        assert normalise(cfg.get(name)) == normalise(real[name]), name
    assert proxy_allow_set(cfg.get("proxy_read_maps")) == proxy_allow_set(
        real["proxy_read_maps"])


@needs_postconf
@pytest.mark.interop
def test_defaults_match_postconf(tmp_path):
    config_dir = make_dir(tmp_path, "compatibility_level = 3.6\n")
    cfg = load_main_cf(config_dir, warn=lambda m: None)
    ours = cfg.defaults()
    names = [n for n in ours if n not in OWN_PARAMETERS
             and n not in ("process_id", "process_name")]
    out = postconf(config_dir, "-d", *names)
    real = dict(line.split(" =", 1) for line in out.splitlines())
    assert set(real) == set(names)
    for name in names:
        assert normalise(ours[name]) == normalise(real[name]), name
    # and fully expanded effective values (postconf -x) for all of them
    out = postconf(config_dir, "-x", *names)
    real = dict(line.split(" =", 1) for line in out.splitlines())
    for name in names:
        if name == "config_directory":
            continue
        assert normalise(cfg.get(name)) == normalise(real[name]), name
    assert normalise(cfg.get("config_directory")) == normalise(real["config_directory"])


# ---------------------------------------------------------------------------
# master.cf

STOCK = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
postlog   unix-dgram n  -       n       -       1       postlogd
smtp      inet  n       -       y       -       -       smtpd
  -o syslog_name=postfix/smtp
  -o { smtpd_banner = $myhostname ESMTP hi }
#  -o commented=out
  -v
pickup    fifo  n       -       -       60?     1       pickup
"""


def master_cfg(tmp_path, master_text: str, main_text: str = "compatibility_level = 3.6\n"
               "queue_directory = /q\ndefault_process_limit = 42\n", **kw):
    config_dir = make_dir(tmp_path, main_text, master_text)
    main = load_main_cf(config_dir, warn=lambda m: None)
    warnings: list[str] = []
    return main, load_master_cf(config_dir, main, warn=warnings.append, **kw), warnings


def test_stock_master_cf(tmp_path):
    main, services, warnings = master_cfg(tmp_path, STOCK)
    assert warnings == []
    by_name = {s.name: s for s in services}
    pm = by_name["proxymap"]
    assert (pm.type, pm.private, pm.unpriv, pm.chroot, pm.wakeup, pm.maxproc, pm.command,
            pm.args, pm.line) == ("unix", True, True, False, 0, 42, "proxymap", [], 2)
    assert pm.socket_path(main) == "/q/private/proxymap"
    pw = by_name["proxywrite"]
    assert pw.maxproc == 1 and pw.command == "proxymap" and pw.line == 3
    assert by_name["postlog"].socket_path(main) == "/q/public/postlog"
    smtp = by_name["smtp"]
    assert smtp.chroot is True and smtp.line == 5
    assert smtp.args == ["-o", "syslog_name=postfix/smtp",
                         "-o", "smtpd_banner = $myhostname ESMTP hi", "-v"]
    assert smtp.overrides == {"syslog_name": "postfix/smtp",
                              "smtpd_banner": "$myhostname ESMTP hi"}
    pickup = by_name["pickup"]
    assert (pickup.wakeup, pickup.wakeup_if_used, pickup.chroot) == (60, True, False)
    child = main.with_overrides(smtp.overrides)
    assert child.get("syslog_name") == "postfix/smtp"


@needs_postconf
@pytest.mark.interop
def test_stock_master_cf_matches_postconf_fields(tmp_path):
    config_dir = make_dir(tmp_path, "compatibility_level = 3.6\n", STOCK)
    main = load_main_cf(config_dir, warn=lambda m: None)
    services = load_master_cf(config_dir, main, warn=lambda m: None)
    out = postconf(config_dir, "-P")
    real = {}
    for line in out.splitlines():
        key, _, value = line.partition(" = ")
        real[key] = value
    ours = {f"{s.name}/{s.type}/{k}": v for s in services for k, v in s.overrides.items()}
    assert {k: normalise(v) for k, v in ours.items()} == real


def test_chroot_default_depends_on_compatibility_level(tmp_path):
    _, services, warnings = master_cfg(tmp_path, "x unix - - - - - cmd\n", main_text="")
    assert services[0].chroot is True
    assert warnings == [f"{services[0].filename}: line 1: using backwards-compatible "
                        f"default setting chroot=y"]
    assert services[0].maxproc == 100


def test_continued_master_line_reports_first_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        master_cfg(tmp_path, "# c\nproxymap unix - - n - - proxymap\n"
                             "bad unix yes - n - -\n   proxymap\n")
    assert str(info.value).endswith('master.cf: line 3: field "private": bad value: "yes"')


@pytest.mark.parametrize("line, reason", [
    ("a unix - - n - -", 'missing "command" field'),
    ("a", 'missing "transport type" field'),
    ("a tcp - - n - - cmd", "bad transport type: tcp"),
    ("a - - - n - - cmd", 'field "transport type" has no default value'),
    ("a unix - - n - - -", 'field "command" has no default value'),
    ("a unix Y - n - - cmd", 'field "private": bad value: "Y"'),
    ("a unix - no n - - cmd", 'field "unprivileged": bad value: "no"'),
    ("a unix - - x - - cmd", 'field "chroot": bad value: "x"'),
    ("a unix - - n 6x - cmd", 'field "wakeup_time": bad value: "6x"'),
    ("a unix - - n - -1 cmd", 'field "max_proc": bad value: "-1"'),
    ("a unix - - n - 1x cmd", 'field "max_proc": bad value: "1x"'),
    ("25 inet - - n - - smtpd", "inet service cannot be private"),
    ("a unix - - n - - cmd -o", "option -o requires a name=value argument"),
    ("a unix - - n - - cmd -o novalue", 'malformed -o option: "novalue"'),
    ("a unix - - n - - cmd -o =x", 'malformed -o option: "=x"'),
    ("a unix - - n - - cmd -o { a b = c }", 'malformed -o option: "a b = c"'),
    ("a unix - - n - - cmd -o {x=y", "missing '}'"),
])
def test_master_line_errors(tmp_path, line, reason):
    with pytest.raises(ConfigError) as info:
        master_cfg(tmp_path, "ok unix - - n - - proxymap\n" + line + "\n")
    path = os.path.join(str(tmp_path / "etc"), "master.cf")
    assert str(info.value).startswith(f"{path}: line 2: {reason}")


def test_duplicate_services(tmp_path):
    text = "p unix - - n - - a\np unix n - n - - b\np unix - - n - 1 c\n"
    with pytest.raises(ConfigError, match=r"line 3: duplicate master.cf entry for service "
                                          r"\"p\" \(private/p\)"):
        master_cfg(tmp_path, text)
    _, services, warnings = master_cfg(tmp_path, text, strict_duplicates=False)
    assert [(s.command, s.private) for s in services] == [("b", False), ("c", True)]
    assert warnings == ['duplicate master.cf entry for service "p" (private/p) '
                        '-- using the last entry']


def test_master_service_disable(tmp_path):
    main_text = "compatibility_level = 3.6\nmaster_service_disable = !keep/inet, inet, x/unix\n"
    _, services, _ = master_cfg(tmp_path, "keep inet n - n - - a\nother inet n - n - - b\n"
                                          "x unix - - n - - c\ny unix - - n - - d\n",
                                main_text=main_text)
    assert [s.name for s in services] == ["keep", "y"]


def test_split_command_args_and_overrides():
    assert split_command_args("cmd -o a=b -o {c = d e } {x y}") == [
        "cmd", "-o", "a=b", "-o", "c = d e", "x y"]
    assert parse_overrides(["-o", "a=1", "-v", "-ob=2", "-o", " a = 3 "]) == {"a": "3", "b": "2"}
    with pytest.raises(ConfigError, match="syntax error after"):
        split_command_args("{a}b")


def test_missing_master_cf(tmp_path):
    config_dir = make_dir(tmp_path, "")
    os.unlink(os.path.join(config_dir, "master.cf"))
    main = load_main_cf(config_dir, warn=lambda m: None)
    with pytest.raises(ConfigError, match="master.cf: No such file"):
        load_master_cf(config_dir, main, warn=lambda m: None)


def test_service_dataclass_is_plain():
    s = Service(name="n", type="unix", private=False, unpriv=True, chroot=False, wakeup=0,
                maxproc=1, command="c", args=[], overrides={}, filename="f", line=1)
    assert s.identity() == ("public/n", "unix")


@pytest.mark.parametrize("text, hostname, domain", [
    ("myhostname = host.$mydomain\n", "host.", ""),
    ("myhostname = host.$mydomain\nmydomain = ex.org\n", "host.ex.org", "ex.org"),
    ("myhostname = a.b.$myorigin\nmyorigin=x\n", "a.b.x", "b.x"),
    ("myhostname = single\n", "single", "localdomain"),
])
def test_mydomain_follows_myhostname(tmp_path, text, hostname, domain):
    cfg = load(tmp_path, text)
    assert (cfg.get("myhostname"), cfg.get("mydomain")) == (hostname, domain)


def test_settle_rereads_a_hot_file(tmp_path, monkeypatch):
    """A main.cf modified within the last second is read again after a pause."""
    import proxymap.conventions.main_cf as main_cf

    config_dir = make_dir(tmp_path, "max_use = 1\n")
    path = os.path.join(config_dir, "main.cf")
    old = os.stat(path).st_mtime - 3600
    os.utime(path, (old, old))
    reads = []
    real_open = open

    def fake_sleep(seconds):
        reads.append(seconds)
        with real_open(path, "w") as f:      # the editor finishes its write
            f.write("max_use = 2\n")
        os.utime(path, (old, old))

    os.utime(path, None)                      # "just modified"
    monkeypatch.setattr(main_cf.time, "sleep", fake_sleep)
    cfg = load_main_cf(config_dir, warn=lambda m: None, settle=True)
    assert reads == [0.3]
    assert cfg.get_int("max_use") == 2
    os.utime(path, None)
    assert load_main_cf(config_dir, warn=lambda m: None).get_int("max_use") == 2
    assert reads == [0.3]                     # no settling unless asked


def test_parse_master_cf_without_files(tmp_path):
    main = load(tmp_path, "compatibility_level = 3.6\n")
    services = parse_master_cf(b"a unix n n y 0 0 cmd {x  y} -oz=1\n", "/m/master.cf", main,
                               pytest.fail)
    [s] = services
    assert (s.private, s.unpriv, s.chroot, s.wakeup, s.maxproc) == (False, False, True, 0, 0)
    assert s.args == ["x  y", "-oz=1"] and s.overrides == {"z": "1"}
    with pytest.raises(ConfigError, match='/m/master.cf: line 1: malformed -o option: "{z=1}"'):
        parse_master_cf(b"a unix n n y 0 0 cmd -o{z=1}\n", "/m/master.cf", main, pytest.fail)
    assert (s.filename, s.line) == ("/m/master.cf", 1)


def test_main_cf_warnings_are_kept(tmp_path):
    cfg = load(tmp_path, "  stray = 1\na = 1\na = 2\n")
    assert len(cfg.warnings) == 2
    assert cfg.get("a") == "2" and cfg.raw("stray") is None


# -- the Postfix release whose defaults apply -------------------------------------------------

@pytest.mark.parametrize("text, release", [
    ("3.11.7", (3, 11)), ("3.11", (3, 11)), ("3.7.11", (3, 7)), ("3.12-20260821", (3, 12)),
    ("auto", None), ("3", None), ("", None), ("3.x", None)])
def test_parse_release(text, release):
    from proxymap.conventions.values import parse_release
    assert parse_release(text) == release


def test_release_chooses_proxy_read_maps_default(tmp_path):
    from proxymap.conventions.parameters import PROXY_READ_MAPS_DEFAULT, PROXY_READ_MAPS_DEFAULT_311
    old = load(tmp_path, "proxymap_postfix_version = 3.10.13\n")
    assert old.raw("proxy_read_maps") is None
    assert old.default("proxy_read_maps") == PROXY_READ_MAPS_DEFAULT
    assert old.default("debug_peer_list") is None
    new = load(tmp_path, "proxymap_postfix_version = 3.11\ndebug_peer_list = proxy:hash:/p\n")
    assert new.default("proxy_read_maps") == PROXY_READ_MAPS_DEFAULT_311
    assert len(PROXY_READ_MAPS_DEFAULT_311.split()) == 103 == 78 + 25
    assert "hash:/p" in proxy_allow_set(new.get("proxy_read_maps"))
    assert "hash:/p" not in proxy_allow_set(old.with_overrides(
        {"debug_peer_list": "proxy:hash:/p"}).get("proxy_read_maps"))
    # an override of the release takes effect in the copy only
    assert new.with_overrides({"proxymap_postfix_version": "3.7"}).postfix_release() == (3, 7)
    assert new.postfix_release() == (3, 11)


@needs_postconf
def test_auto_release_is_the_installed_postfix(tmp_path):
    main = load(tmp_path, "")
    done = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True, text=True)
    from proxymap.conventions.values import parse_release
    assert main.postfix_release() == parse_release(done.stdout.strip())


def test_bad_release_names_file_and_line(tmp_path):
    main = load(tmp_path, "mail_owner = postfix\nproxymap_postfix_version = three\n")
    with pytest.raises(ConfigError) as info:
        main.get("proxy_read_maps")
    assert str(info.value).endswith("main.cf, line 2: bad proxymap_postfix_version value: three"
                                    " (expected auto or a release such as 3.11)")


def test_allow_list_reads_file_name_values_when_asked():
    files = {"/etc/a": ["check_client_access proxy:hash:/t/a", "proxy:cidr:/t/b /etc/b"],
             "/etc/b": ["proxy:pcre:/t/c", "/etc/a"]}
    assert proxy_allow_set("proxy:hash:/x /etc/a") == {"hash:/x"}
    assert proxy_allow_set("proxy:hash:/x /etc/a", files.get) == \
        {"hash:/x", "hash:/t/a", "cidr:/t/b", "pcre:/t/c"}


def test_domain_to_ascii_macro():
    assert expand("${domain_to_ascii{$d}}", {"d": "bücher.example"}.get) == \
        "xn--bcher-kva.example"
    assert expand(".${domain_to_ascii{plain.example}}", {}.get) == ".plain.example"
