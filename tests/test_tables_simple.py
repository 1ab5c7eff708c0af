"""The simple table types against real Postfix 3.7 postmap.

texthash, inline, static, fail, environ, unix, unionmap and pipemap must
answer what `postmap -q` / `postmap -s` answer for the same table with the
same flags (postmap opens with DUP_WARN|FOLD_FIX|UTF8_REQUEST; `-f` drops
FOLD_FIX, `-u` drops UTF8_REQUEST, `-r`/`-w` add DUP_REPLACE/DUP_IGNORE),
and fail to open with Postfix's reason where postmap dies.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

import pytest

from proxymap import dictflags as F
from proxymap import tables
from proxymap.conventions import maillog
from proxymap.protocol import CONFIG, RETRY
from proxymap.tables import Table, TableError, TableOpenError, open_table
from proxymap.tables.composite import member_specs
from proxymap.tables.inline import (BraceError, parse_inline, split_braced, split_name_value,
                                    strip_braces)
from proxymap.tables.texthash import fold_source_key, load_source, printable, utf8_enabled
from tests.instance import POSTMAP

HAVE_POSTMAP = POSTMAP is not None
needs_postmap = pytest.mark.skipif(not HAVE_POSTMAP, reason="real Postfix postmap not installed")

POSTMAP_FLAGS = F.DUP_WARN | F.FOLD_FIX | F.UTF8_REQUEST | F.LOCK


def postmap_flags(options: list[str]) -> int:
    """The dict flags real postmap opens with for these options."""
    flags = POSTMAP_FLAGS
    if "-f" in options:
        flags &= ~F.FOLD_FIX
    if "-u" in options:
        flags &= ~F.UTF8_REQUEST
    if "-r" in options:
        flags |= F.DUP_REPLACE
    if "-w" in options:
        flags |= F.DUP_IGNORE
    return flags


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("pfconf")
    (base / "queue").mkdir()
    (base / "data").mkdir()
    (base / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {base}/queue\n"
        f"data_directory = {base}/data\n"
        "mail_owner = postfix\n")
    return str(base)


@pytest.fixture
def warnings_seen(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(maillog, "warning", seen.append)
    return seen


def real(config_dir, *args, env=None):
    """Run real postmap; (exit status, stdout bytes, stderr lines without
    the program prefix, duplicates removed in order)."""
    proc = subprocess.run([POSTMAP, "-c", config_dir, *args], capture_output=True,
                          timeout=20, env=env)
    lines = []
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        line = line.removeprefix("postmap: ")
        if line not in lines:
            lines.append(line)
    return proc.returncode, proc.stdout, lines


def real_query(config_dir, spec, key, *options, env=None):
    """The value real postmap finds (bytes) or None; raises on a fatal."""
    status, out, err = real(config_dir, *options, "-q", key, spec, env=env)
    fatal = [line for line in err if line.startswith("fatal: ")]
    if fatal:
        raise RuntimeError(fatal[0])
    return out[:-1] if status == 0 else None


def real_fatals(config_dir, cases) -> dict:
    """Run `postmap -q key spec` for every (spec, key) concurrently (real
    postmap sleeps 1 s after a fatal); map each case to the text after
    `fatal: `. Every process is waited for and killed by pid if it hangs."""
    procs = {case: subprocess.Popen([POSTMAP, "-c", config_dir, "-q", case[1], case[0]],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for case in cases}
    reasons = {}
    for case, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
            raise
        fatal = [line.removeprefix("postmap: fatal: ")
                 for line in err.decode("utf-8", "replace").splitlines()
                 if line.startswith("postmap: fatal: ")]
        assert proc.returncode == 1 and fatal, (case, err)
        reasons[case] = fatal[0]
    return reasons


@pytest.fixture(scope="module")
def fatals(config_dir):
    """Real postmap's fatal reasons for every failing case of this module."""
    cases = [(spec, "x") for spec in INLINE_BAD + STATIC_BAD + COMPOSITE_BAD + UNIX_BAD]
    cases += [(spec, "foo") for spec in COMPOSITE_FAILING + ["fail:x"]]
    return real_fatals(config_dir, cases)


def real_records(config_dir, spec, *options) -> set[bytes]:
    status, out, err = real(config_dir, *options, "-s", spec)
    assert status == 0, err
    return set(out.splitlines())


def our_query(spec, key: str, *options, params=None):
    """Look the key up the way a postmap client + our dispatcher would:
    the client's UTF-8 layer case-folds the key when FOLD_FIX is on."""
    flags = postmap_flags(list(options))
    table = open_table(spec, flags, False, params or {})
    raw = key.encode()
    if flags & F.UTF8_REQUEST and flags & F.FOLD_FIX and table.flags & F.FIXED:
        raw = key.casefold().encode()
    return table.lookup(raw)


def our_records(spec, *options, params=None) -> set[bytes]:
    table = open_table(spec, postmap_flags(list(options)), False, params or {})
    records = set()
    record = table.sequence(True)
    while record is not None:
        records.add(record[0] + b"\t" + record[1])
        record = table.sequence(False)
    return records


def set_old_mtime(path):
    """Postfix re-reads a texthash file modified within the current second
    until the clock moves on; an old mtime keeps real postmap fast."""
    os.utime(path, (1_600_000_000, 1_600_000_000))


# ---------------------------------------------------------------------------
# brace syntax helpers (Postfix extpar / mystrtokq behaviour)

@pytest.mark.parametrize("text, inner", [
    (b"{a}", b"a"), (b"{ a b }", b"a b"), (b"{{a}}", b"{a}"),
    (b"plain}", b"plain}"), (b" x ", b" x "), (b"{}", b""),
])
def test_strip_braces(text, inner):
    assert strip_braces(text) == inner


@pytest.mark.parametrize("text, reason", [
    (b"{foo", "missing '}' in \"{foo\""),
    (b"{ a } x", "syntax error after '}' in \"{ a } x\""),
    (b"{a}}", "syntax error after '}' in \"{a}}\""),
    (b"{a} ", "syntax error after '}' in \"{a} \""),
])
def test_strip_braces_errors(text, reason):
    with pytest.raises(BraceError) as info:
        strip_braces(text)
    assert str(info.value) == reason


def test_split_braced_keeps_groups_and_drops_empty_tokens():
    assert split_braced(b"a=b,, {c = d e}\tx{y z}w ,") == [b"a=b", b"{c = d e}", b"x{y z}w"]
    assert split_braced(b" ,\n") == []


@pytest.mark.parametrize("entry, pair", [
    (b"a=b", (b"a", b"b")), (b"a = b c ", (b"a", b"b c")), (b"a=", (b"a", b"")),
    (b"=b", (b"", b"b")), (b'"x y" = z', (b'"x y"', b"z")), (b"a\\=b=c", (b"a\\=b", b"c")),
    (b"a==b", (b"a", b"=b")), (b'a=b"c', (b"a", b'b"c')), (b"x{c=d}y", (b"x{c", b"d}y")),
])
def test_split_name_value(entry, pair):
    assert split_name_value(entry) == pair


@pytest.mark.parametrize("entry, reason", [
    (b"a", "missing '=' after attribute name"), (b"a b=c", "missing '=' after attribute name"),
    (b'"a=b"', "missing '=' after attribute name"), (b'a"b=c', "unbalanced '\"'"),
    (b"", "no key found; expected format: key = value"),
])
def test_split_name_value_errors(entry, reason):
    with pytest.raises(ValueError) as info:
        split_name_value(entry)
    assert str(info.value) == reason


def test_parse_inline_order_and_errors():
    assert parse_inline(b"{z=1,a=2 {m = 3 4}}") == [(b"z", b"1"), (b"a", b"2"), (b"m", b"3 4")]
    for bad, reason in [(b"a=b", "bad syntax"), (b"{a=b", "bad syntax"), (b"{}", "bad syntax"),
                        (b"{ }", "empty table"), (b"{,}", "empty table")]:
        with pytest.raises(ValueError, match=reason):
            parse_inline(bad)


# ---------------------------------------------------------------------------
# inline:

INLINE_GOOD = [
    "inline:{a=b, {c = d e}}", "inline:{A=b}", "inline:{a=b a=c}", "inline:{a=b,A=c}",
    "inline:{a=b,,c=d}", "inline:{{a=b c}}", "inline:{a==b}", "inline:{{ a = b c }}",
    'inline:{{"x y"=z}}', 'inline:{"x"=z}', 'inline:{{a = "b c"}}', "inline:{{x\\ y=z}}",
    'inline:{a=b"c}', "inline:{a={b c}}", "inline:{a=b x{c=d}y}", "inline:{a=b;c=d}",
    "inline:{a=b\tc=d}", "inline:{a\\=b=c}", 'inline:{{a\\"b=c}}', "inline:{z=1,a=2,m=3,a=4}",
    "inline:{Mixed=Case, UPPER=x}",
]


@needs_postmap
@pytest.mark.parametrize("spec", INLINE_GOOD)
@pytest.mark.parametrize("options", [[], ["-f"]])
def test_inline_records_match_postmap(config_dir, spec, options):
    assert our_records(spec, *options) == real_records(config_dir, spec, *options)


@needs_postmap
@pytest.mark.parametrize("spec, key", [
    ("inline:{a=b, {c = d e}}", "c"), ("inline:{A=b}", "A"), ("inline:{A=b}", "a"),
    ("inline:{Mixed=Case}", "MIXED"), ("inline:{a=b a=c}", "a"), ("inline:{a=}", "a"),
    ("inline:{ä=b}", "Ä"), ("inline:{Ä=b}", "ä"),
])
@pytest.mark.parametrize("options", [[], ["-f"], ["-u"]])
def test_inline_query_matches_postmap(config_dir, spec, key, options):
    assert our_query(spec, key, *options) == real_query(config_dir, spec, key, *options)


INLINE_BAD = [
    "inline:{ a = b }", "inline:{a}", "inline:{}", 'inline:{"x y"=z}', "inline:a=b",
    "inline:{a=b", 'inline:{a="b c"}', "inline:{x\\ y=z}", 'inline:{a"b=c}', "inline:{{x y = z}}",
    "inline:{ {a=b}x }", "inline:{{a=b}}extra", "inline:{ }", "inline:{,}", "inline:{a=b}}",
    "inline:{{a=b}", 'inline:{"a=b"}', "inline:{a=b, {}}", "inline:{{ }}", "inline:{} ",
    "inline: {a=b}", "inline:{a=b} ",
]


@needs_postmap
@pytest.mark.parametrize("spec", INLINE_BAD)
def test_inline_syntax_errors_match_postmap(fatals, spec):
    with pytest.raises(TableOpenError) as info:
        open_table(spec, POSTMAP_FLAGS, False, {})
    assert str(info.value) == fatals[spec, "x"]


def test_inline_folding_only_with_fold_fix_at_open():
    # The proxymap caveat: an instance opened with flags 0 keeps "A".
    table = open_table("inline:{A=b}", 0, False, {})
    table.flags |= F.FOLD_FIX
    assert table.lookup(b"a") is None and table.lookup(b"A") is None
    table.flags &= ~F.FOLD_FIX
    assert table.lookup(b"A") == b"b"
    folded = open_table("inline:{A=b}", F.FOLD_FIX, False, {})
    assert folded.lookup(b"a") == b"b" and folded.flags & F.IMPL_MASK == F.FIXED


def test_inline_refuses_write_mode_and_sequences():
    with pytest.raises(TableOpenError, match="requires O_RDONLY"):
        open_table("inline:{a=b}", 0, True, {})
    table = open_table("inline:{a=b, c=d}", 0, False, {})
    assert table.sequence(False) is None  # NEXT before FIRST
    assert table.sequence(True) == (b"a", b"b")
    assert table.sequence(False) == (b"c", b"d")
    assert table.sequence(False) is None and table.sequence(False) is None
    assert table.sequence(True) == (b"a", b"b")
    with pytest.raises(TableError) as info:
        table.update(b"x", b"y")
    assert info.value.status == CONFIG


# ---------------------------------------------------------------------------
# texthash:

TEXTHASH_SOURCE = (
    b"Foo bar\n"
    b"foo dup\n"
    b'"a b" v1\n'
    b"key value with  spaces\n"
    b"next line\n"
    b"  continued here\n"
    b"# a comment\n"
    b"novalue\n"
    b"x: y\n"
    b"\xe9t\xe9 latin\n"
    b"Mixed MiXed\n"
    b'a"b c\n'
    b"utf8 \xc3\xa4\n"
    b"\xc3\x84rger caps\n"
)


@pytest.fixture
def texthash_file(tmp_path):
    path = tmp_path / "th"
    path.write_bytes(TEXTHASH_SOURCE)
    set_old_mtime(path)
    return str(path)


@needs_postmap
@pytest.mark.parametrize("options", [[], ["-f"], ["-u"], ["-r"], ["-w"], ["-f", "-u"]])
def test_texthash_records_and_warnings_match_postmap(config_dir, texthash_file, options,
                                                     warnings_seen):
    spec = f"texthash:{texthash_file}"
    ours = our_records(spec, *options)
    status, out, err = real(config_dir, *options, "-s", spec)
    assert status == 0
    assert ours == set(out.splitlines())
    expected = [line.removeprefix("warning: ") for line in err]
    assert warnings_seen == expected


@needs_postmap
@pytest.mark.parametrize("key", ["foo", "Foo", '"a b"', "next", "x:", "mixed", "Mixed",
                                 "novalue", "utf8", "ärger", "ÄRGER", "été"])
@pytest.mark.parametrize("options", [[], ["-f"], ["-r"]])
def test_texthash_query_matches_postmap(config_dir, texthash_file, key, options, warnings_seen):
    spec = f"texthash:{texthash_file}"
    assert our_query(spec, key, *options) == real_query(config_dir, spec, key, *options)


def test_texthash_proxy_folding_caveat(texthash_file, warnings_seen):
    # Opened by a proxymap `open` (flags 0): keys stay as written, so a
    # folding client never reaches "Foo"; both duplicates are kept.
    table = open_table(f"texthash:{texthash_file}", 0, False, {})
    table.flags = (table.flags & ~F.RQST_MASK) | F.FOLD_FIX | F.LOCK
    assert table.lookup(b"FOO") == b"dup"  # folded to "foo": the second line
    assert table.lookup(b"mixed") is None
    table.flags &= ~F.FOLD_FIX
    assert table.lookup(b"Foo") == b"bar"
    assert table.flags & F.IMPL_MASK == F.FIXED
    # No UTF-8 request at open: the Latin-1 line is loaded.
    assert table.lookup(b"\xe9t\xe9") == b"latin"


def test_texthash_smtputf8_off_keeps_non_utf8_lines(texthash_file, warnings_seen):
    spec = f"texthash:{texthash_file}"
    table = open_table(spec, POSTMAP_FLAGS, False, {"smtputf8_enable": "no"})
    assert table.lookup(b"\xe9t\xe9") == b"latin"
    assert not any("non-UTF-8" in w for w in warnings_seen)
    table = open_table(spec, POSTMAP_FLAGS, False, {"smtputf8_enable": "yes"})
    assert table.lookup(b"\xe9t\xe9") is None


def test_texthash_open_errors(tmp_path):
    with pytest.raises(TableOpenError, match="open database .*missing: No such file"):
        open_table(f"texthash:{tmp_path}/missing", 0, False, {})
    path = tmp_path / "t"
    path.write_bytes(b"a b\n")
    with pytest.raises(TableOpenError, match="requires O_RDONLY access mode"):
        open_table(f"texthash:{path}", 0, True, {})


def test_texthash_change_is_noticed(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"a 1\n")
    set_old_mtime(path)
    table = open_table(f"texthash:{path}", F.FOLD_FIX, False, {})
    assert table.lookup(b"a") == b"1" and not table.changed()
    path.write_bytes(b"a 2\n")
    assert table.changed()
    assert open_table(f"texthash:{path}", F.FOLD_FIX, False, {}).lookup(b"a") == b"2"
    os.unlink(path)
    assert table.changed()


def test_texthash_sequence_cursor(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"b 2\na 1\n")
    table = open_table(f"texthash:{path}", 0, False, {})
    assert table.sequence(False) is None
    assert [table.sequence(True), table.sequence(False), table.sequence(False)] == \
        [(b"b", b"2"), (b"a", b"1"), None]


def test_load_source_duplicate_policies():
    lines = [b"k 1\n", b"K 2\n", b"k 3\n"]
    warned: list[str] = []
    assert load_source(lines, "f", F.FOLD_FIX, False, warned.append) == {b"k": b"1"}
    assert warned == ['f, line 2: duplicate entry: "k"', 'f, line 3: duplicate entry: "k"']
    warned.clear()
    assert load_source(lines, "f", F.FOLD_FIX | F.DUP_IGNORE, False, warned.append) == {b"k": b"1"}
    assert load_source(lines, "f", F.FOLD_FIX | F.DUP_REPLACE, False, warned.append) == {b"k": b"3"}
    assert load_source(lines, "f", 0, False, warned.append) == {b"k": b"1", b"K": b"2"}
    assert warned == ['f, line 3: duplicate entry: "k"']
    assert load_source([b" lead x\n", b"k v\n"], "f", 0, False, warned.append) == {b"k": b"v"}
    assert warned[-1] == 'f: logical line must not start with whitespace: " lead x"'


def test_key_folding_helpers():
    assert fold_source_key(b"AbC", 0, True) == b"AbC"
    assert fold_source_key(b"AbC\xc3\x84", F.FOLD_FIX, False) == b"abc\xc3\x84"
    assert fold_source_key("AbCÄß".encode(), F.FOLD_FIX, True) == "abcäss".encode()
    assert fold_source_key(b"A\xe9", F.FOLD_FIX, True) == b"a\xe9"
    assert utf8_enabled(F.UTF8_REQUEST, None) and not utf8_enabled(0, {})
    assert not utf8_enabled(F.UTF8_REQUEST, {"smtputf8_enable": "No"})
    assert printable(b"a\xe9\tb") == "a??b"


# ---------------------------------------------------------------------------
# static:, fail:, environ:, unix:

@needs_postmap
@pytest.mark.parametrize("spec", ["static:foo", "static:{ foo bar }", "static:foo}",
                                  "static:{{a}}", "static: x ", "static:{}",
                                  "static: {x}"])
def test_static_matches_postmap(config_dir, spec):
    value = our_query(spec, "Anything")
    assert value == open_table(spec, 0, False, {}).lookup(b"")
    if value == b"":  # real postmap warns about an empty result, then prints it
        status, out, _ = real(config_dir, "-q", "k", spec)
        assert (status, out) == (0, b"\n")
    else:
        assert value == real_query(config_dir, spec, "Anything")


STATIC_BAD = ["static:{foo", "static:{ a } x", "static:{x} "]


@needs_postmap
@pytest.mark.parametrize("spec", STATIC_BAD)
def test_static_syntax_errors_match_postmap(fatals, spec):
    with pytest.raises(TableOpenError) as info:
        open_table(spec, POSTMAP_FLAGS, False, {})
    assert str(info.value) == fatals[spec, "x"]


def test_static_supports_lookup_only():
    table = open_table("static:x", 0, True, {})
    assert table.flags & F.IMPL_MASK == F.FIXED
    for call in (lambda: table.update(b"a", b"b"), lambda: table.sequence(True),
                 lambda: table.delete(b"a")):
        with pytest.raises(TableError) as info:
            call()
        assert info.value.status == CONFIG


@needs_postmap
def test_fail_always_retries(fatals):
    table = open_table("fail:x", POSTMAP_FLAGS, True, {})
    assert table.flags & F.IMPL_MASK == F.PATTERN
    for call in (lambda: table.lookup(b"a"), lambda: table.update(b"a", b"b"),
                 lambda: table.delete(b"a"), lambda: table.sequence(True)):
        with pytest.raises(TableError) as info:
            call()
        assert info.value.status == RETRY and "fail:x" in info.value.reason
    assert fatals["fail:x", "foo"] == "table fail:x: query error: Application error"


@needs_postmap
@pytest.mark.parametrize("key", ["PM_TEST_UPPER", "pm_test_lower", "PM_TEST_unset", "A=B"])
@pytest.mark.parametrize("options", [[], ["-f"]])
def test_environ_matches_postmap(config_dir, monkeypatch, key, options):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PM_TEST_UPPER": "up",
           "pm_test_lower": "low value"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PM_TEST_unset", raising=False)
    assert our_query("environ:x", key, *options) == \
        real_query(config_dir, "environ:x", key, *options, env=env)


def _group_with_members():
    return next((g.gr_name for g in grp.getgrall() if g.gr_mem), "root")


@needs_postmap
@pytest.mark.parametrize("spec, key", [
    ("unix:passwd.byname", "root"), ("unix:passwd.byname", "ROOT"),
    ("unix:passwd.byname", pwd.getpwuid(os.getuid()).pw_name),
    ("unix:passwd.byname", "no-such-user-x"), ("unix:group.byname", "root"),
    ("unix:group.byname", _group_with_members()), ("unix:group.byname", "no-such-group-x"),
])
@pytest.mark.parametrize("options", [[], ["-f"]])
def test_unix_matches_postmap(config_dir, spec, key, options):
    assert our_query(spec, key, *options) == real_query(config_dir, spec, key, *options)


UNIX_BAD = ["unix:foo", "unix:passwd.byuid"]


@needs_postmap
@pytest.mark.parametrize("spec", UNIX_BAD)
def test_unix_unknown_map(fatals, spec):
    with pytest.raises(TableOpenError) as info:
        open_table(spec, 0, False, {})
    assert str(info.value) == fatals[spec, "x"]


# ---------------------------------------------------------------------------
# unionmap: and pipemap:

COMPOSITES = [
    ("unionmap:{inline:{foo=bar}, static:x}", ["foo", "FOO", "none"]),
    ("unionmap:{inline:{foo=bar}}", ["foo", "none"]),
    ("unionmap:{inline:{foo=}}", ["foo"]),
    ("unionmap:{inline:{foo=x}, inline:{foo=}}", ["foo"]),
    ("unionmap:{inline:{foo=x}, inline:{foo=}, inline:{foo=z}}", ["foo"]),
    ("unionmap:{inline:{foo=}, inline:{foo=y}}", ["foo"]),
    ("unionmap:{static:{a b}, inline:{foo=x}}", ["foo"]),
    ("unionmap:{ inline:{foo=bar} }", ["foo"]),
    ("unionmap:{inline:{foo=bar} inline:{Foo=x},}", ["Foo"]),
    ("unionmap:{inline:{FOO=HOME}, environ:x}", ["FOO", "HOME"]),
    ("pipemap:{inline:{foo=bar}, inline:{bar=baz}}", ["foo", "bar", "none"]),
    ("pipemap:{inline:{foo=bar}}", ["foo"]),
    ("pipemap:{inline:{foo=BAR}, inline:{bar=baz}}", ["FOO"]),
    ("pipemap:{inline:{foo=}, static:z}", ["foo", "none"]),
    ("pipemap:{inline:{FOO=HOME}, environ:x}", ["FOO", "foo"]),
    ("pipemap:{inline:{foo=bar}, fail:x}", ["none"]),
]


@needs_postmap
@pytest.mark.parametrize("spec, keys", COMPOSITES)
@pytest.mark.parametrize("options", [[], ["-f"]])
def test_composites_match_postmap(config_dir, monkeypatch, spec, keys, options):
    monkeypatch.setenv("HOME", "/home/test")
    for key in keys:
        assert our_query(spec, key, *options) == real_query(config_dir, spec, key, *options), key


COMPOSITE_FAILING = ["unionmap:{inline:{foo=bar}, fail:x}", "unionmap:{fail:x, inline:{foo=bar}}",
                     "pipemap:{inline:{foo=bar}, fail:x}"]


@needs_postmap
@pytest.mark.parametrize("spec", COMPOSITE_FAILING)
def test_composite_member_error_aborts(fatals, spec):
    table = open_table(spec, POSTMAP_FLAGS, False, {})
    with pytest.raises(TableError) as info:
        table.lookup(b"foo")
    assert info.value.status == RETRY
    assert fatals[spec, "foo"] == f"table {spec}: query error: Application error"


COMPOSITE_BAD = ["unionmap:{}", "unionmap:{ }", "unionmap:inline:{a=b}",
                 "unionmap:{inline:{foo=bar}", "unionmap:{inline:{foo=bar}}x", "pipemap:{}",
                 "pipemap:x", "unionmap:{nosuch:x}", "unionmap:{{inline:{foo=bar}} x}",
                 "pipemap:{inline:{a}}", "unionmap:{static:x} ", "unionmap: {static:x}"]


@needs_postmap
@pytest.mark.parametrize("spec", COMPOSITE_BAD)
def test_composite_open_errors_match_postmap(fatals, spec):
    with pytest.raises(TableOpenError) as info:
        open_table(spec, POSTMAP_FLAGS, False, {})
    assert str(info.value) == fatals[spec, "x"]


def test_member_specs_strip_proxy():
    assert member_specs("{proxy:proxy:inline:{a=b}, static:x}") == ["inline:{a=b}", "static:x"]


class EchoTable(Table):
    """Test-only PATTERN table that answers the key it was given and
    records the flags it saw."""

    impl_flags = F.PATTERN
    seen: list[tuple[bytes, int]] = []

    def lookup(self, key):
        EchoTable.seen.append((key, self.flags))
        return key


@pytest.fixture
def echo_type(monkeypatch):
    real_class = tables.table_class
    monkeypatch.setattr(tables, "table_class",
                        lambda name: EchoTable if name == "echo" else real_class(name))
    EchoTable.seen = []


def test_composite_folds_with_first_member_impl_flags(echo_type):
    # First member FIXED: the composite folds before the pattern member sees the key.
    union = open_table("unionmap:{inline:{abc=1}, echo:x}", F.FOLD_FIX, False, {})
    assert union.flags & F.IMPL_MASK == F.FIXED
    assert union.lookup(b"ABC") == b"1,abc"
    # First member PATTERN without FOLD_MUL: no folding by the composite,
    # but the inline member still folds for itself.
    union = open_table("unionmap:{echo:x, inline:{abc=1}}", F.FOLD_FIX, False, {})
    assert union.flags & F.IMPL_MASK == F.PATTERN
    assert union.lookup(b"ABC") == b"ABC,1"


def test_composite_passes_request_bits_to_members(echo_type):
    pipe = open_table("pipemap:{proxy:echo:x, inline:{abc=done}}", 0, False, {})
    pipe.flags = (pipe.flags & ~F.RQST_MASK) | F.FOLD_MUL | F.LOCK
    assert pipe.lookup(b"ABC") == b"done"  # FOLD_MUL on the PATTERN composite
    key, flags = EchoTable.seen[-1]
    assert key == b"abc" and flags & F.RQST_MASK == F.FOLD_MUL | F.LOCK
    assert flags & F.IMPL_MASK == F.PATTERN
    pipe.flags &= ~F.RQST_MASK
    assert pipe.lookup(b"ABC") is None
    assert EchoTable.seen[-1][1] & F.RQST_MASK == 0


def test_composite_change_and_write_mode(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"k v\n")
    set_old_mtime(path)
    union = open_table(f"unionmap:{{static:s, texthash:{path}}}", 0, False, {})
    assert union.lookup(b"k") == b"s,v" and not union.changed()
    path.write_bytes(b"k w\n")
    assert union.changed()
    with pytest.raises(TableOpenError, match="requires O_RDONLY"):
        open_table("pipemap:{static:s}", 0, True, {})
    with pytest.raises(TableError) as info:
        union.sequence(True)
    assert info.value.status == CONFIG


# ---------------------------------------------------------------------------
# through the dispatcher, as proxymap clients see these tables

def _ask(dispatcher, **attrs):
    from proxymap.protocol import Decoder, encode
    raw = dispatcher.handle(Decoder().feed(encode(list(attrs.items())))[0])
    return dict(Decoder().feed(raw)[0])


def test_open_reply_flags_and_proxy_folding_caveat(tmp_path, warnings_seen):
    from proxymap.dispatch import Dispatcher
    path = tmp_path / "th"
    path.write_bytes(b"Foo bar\nlow er\n")
    specs = {f"texthash:{path}": b"16", "inline:{A=b}": b"16", "static:x": b"16",
             "environ:x": b"16", "unix:passwd.byname": b"16", "fail:x": b"32",
             "unionmap:{inline:{a=b}, static:x}": b"16", "pipemap:{fail:x, static:y}": b"32"}
    d = Dispatcher("proxymap", set(specs), {})
    for spec, flags in specs.items():
        assert _ask(d, request="open", table=f"proxy:{spec}", flags=0) == \
            {b"status": b"0", b"flags": flags}, spec
    # Instances created by `open` (flags 0) keep upper-case source keys; a
    # UTF-8 client (flags 524353) sends folded keys and never finds them.
    client_flags = F.DUP_WARN | F.LOCK | F.UTF8_REQUEST
    for spec in (f"texthash:{path}", "inline:{A=b}"):
        for key in ("foo", "a"):
            assert _ask(d, request="lookup", table=spec, flags=client_flags, key=key)[b"status"] \
                == b"1"
    assert _ask(d, request="lookup", table=f"texthash:{path}", flags=client_flags,
                key="low") == {b"status": b"0", b"value": b"er"}
    assert _ask(d, request="lookup", table="fail:x", flags=client_flags, key="k")[b"status"] == b"2"
    assert _ask(d, request="lookup", table="unionmap:{inline:{a=b}, static:x}",
                flags=client_flags, key="a") == {b"status": b"0", b"value": b"b,x"}
