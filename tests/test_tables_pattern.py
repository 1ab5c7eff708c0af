"""cidr:, regexp: and pcre: tables: answers compared with real Postfix
postmap(1) for the same rule files, plus direct tests of the translators."""

from __future__ import annotations

import os
import subprocess

import time
import pytest

from proxymap import dictflags as F
from proxymap.tables import TableOpenError, Unsupported, open_table
from proxymap.tables.cidr import compile_cidr
from proxymap.tables.patterns import (RuleError, parse_template)
from proxymap.tables.pcre import compile_pcre
from proxymap.tables.regexp import compile_regexp
from tests.instance import POSTMAP

HAVE_POSTMAP = POSTMAP is not None


@pytest.fixture(scope="module")
def pfconf(tmp_path_factory):
    d = tmp_path_factory.mktemp("pfconf")
    (d / "queue").mkdir()
    (d / "data").mkdir()
    (d / "main.cf").write_text(f"compatibility_level = 3.6\nqueue_directory = {d}/queue\n"
                               f"data_directory = {d}/data\nmail_owner = postfix\n")
    return d


def postfix_answers(conf, spec: str, keys: list[bytes]) -> dict[bytes, bytes]:
    proc = subprocess.run([POSTMAP, "-c", str(conf), "-q", "-", spec],
                          input=b"".join(k + b"\n" for k in keys),
                          capture_output=True, timeout=30)
    answers = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(b"\t")
        answers[key] = value
    return answers


def our_answers(compile_fn, data: bytes, keys: list[bytes]) -> dict[bytes, bytes]:
    program = compile_fn(data, "t", 0, None)
    answers = {}
    for k in keys:
        v = program.lookup(k)
        if v is not None:
            answers[k] = v
    return answers


CIDR_RULES = b"""\
1.2.3.0/24 net24
1.2.3.4/24 hostbits
[10.0.0.0]/8 br1
[11.0.0.0/8] br2
!192.168.0.0/16 notpriv
if 172.16.0.0/12
172.16.1.1 inner
endif
"""
CIDR_RULES2 = b"""\
IF 10.0.0.0/8
IF !10.1.0.0/16
10.2.0.0/16 ten-two
ENDIF
10.1.2.3 ten-one-exact
10.0.0.0/8\tten   with  space  
EnDiF
If! 20.0.0.0/8
0.0.0.0/0 not-twenty
endif
IF 2001:db8::/32
2001:DB8:0:1::/64 doc64
[2001:db8::1] doc1
ENDIF
[::1/128] loop
::ffff:0:0/96 mapped
1.2.3.4/33 badmask
1.2.3.4/ emptymask
01.2.3.4 leadingzero
1.2.3 short
fe80::1%eth0 zone
foo bar
30.0.0.0/8
30.0.0.0/8 thirty
   orphan continued
Endif junk
! 40.0.0.0/8 notforty
IF 50.0.0.0/8
50.1.1.1 fifty
"""
CIDR_RULES3 = b"""\
[1.2.3.4 x
[1.2.3.4]x y
[1.2.3.0]/24 brnet
[1.2.4.0/24] brnet2
1.2.3.4/ emptymask
1.2.3.4/+5 plusmask
1.2.3.4/24/5 twoslashes
::1/129 v6mask
1.2.3.999/8 badnet
1.2.3.999 badaddr
2001:db8::1/32 v6hostbits
0.0.0.1/0 zero
10.0.0.0/8
!
IF
IF 10.0.0.0/8 trailing
ENDIF junk
ENDIF
   lead
1.1.1.1 one
  continued
"""
CIDR_KEYS = [b"1.2.3.5", b"1.2.3.4", b"10.1.1.1", b"11.1.1.1", b"192.168.1.1", b"8.8.8.8",
             b"172.16.1.1", b"::1", b"2001:db8::5", b"::ffff:1.2.3.4", b"1.2.3.05",
             b"01.2.3.4", b"[1.2.3.4]", b"1.2.3", b"2001:db8::1", b"10.2.3.4",
             b"10.1.2.3", b"10.1.9.9", b"10.9.9.9", b"20.1.1.1", b"21.1.1.1",
             b"2001:db8:0:1::7", b"2001:DB8::1", b"::2", b"::ffff:102:304",
             b"30.1.1.1", b"40.1.1.1", b"50.1.1.1", b"1.2.3.4/32", b"fe80::1%eth0",
             b"1.2.3.4.", b"0.0.0.0", b"255.255.255.255", b"abc", b""]


@pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed")
@pytest.mark.parametrize("rules", [CIDR_RULES, CIDR_RULES2, CIDR_RULES3])
def test_cidr_matches_postfix(pfconf, tmp_path, rules):
    path = tmp_path / "t.cidr"
    path.write_bytes(rules)
    keys = [k for k in CIDR_KEYS if k]
    expected = postfix_answers(pfconf, f"cidr:{path}", keys)
    assert expected  # the comparison must not be vacuous
    assert our_answers(compile_cidr, rules, keys) == expected


REGEXP_RULES = rb"""
/^(a+)(b)?c$/ got=$1,${2},$(1)x$$
/^neg/ neg
!/^x/ notx$1
/^d(.)/ $2
/^e(.)/ $1abc
/^f(.)/ ${1}abc $ end $
/^g/Q unk
/^h/ix casesens
/^i\/j/ slash
|^k\|l| pipe
/^l(x)|^l(y)/ [$1][$2]
/^m/!/mm/ m_not_mm
/^n/ !/nn/ spaced
/^o/
/^p(.)/ $0
/^r(.)/ $100
/^s/ ${xyz}
/^t/ $(1
/^[[:digit:]]+$/ digits
/^B\(x\)\{2\}$/x bre[$1]
/^C+$/x brecplus
/^D|E$/x brebar
/^(F)\1$/ backref
/^open
/^fo\/o/i!/bar/ combo
IF /^if/
/x$/ ifx
IF !/y/
/z$/ ifz
ENDIF trailing
ENDIF
/^if/ ifend
ENDIF
if/^kw/ kwif
endif
/^ww/  value with   inner   space  
!!/^dd/ dd
/^ee/!!/ff/ eeff
/^\.\*$/ dotstar
/^c{2,}$/ crange
/\bword\b/ wordb
/\<start/ wstart
/^[]a]+$/ bracket
/^[^]a]$/ negbracket
/^[a\]+$/ backslashclass
/^[[:upper:]][[:punct:]]$/ upperpunct
/^[[:space:][:xdigit:]]+$/ spacexdigit
/^[^[:alnum:]]+$/ nonalnum
/^y{1,3}$/ yrange
/^zz$/i zcase
/^u(.*)v(.*)$/ [$2][$1]
"""
REGEXP_KEYS = [b"aaac", b"aaabc", b"AC", b"neg", b"xx", b"dd", b"ee", b"ff", b"g", b"hH", b"h",
               b"i/j", b"k|l", b"kl", b"lx", b"ly", b"m", b"mm", b"n", b"nn", b"pz", b"rz",
               b"sz", b"tz", b"123", b"Bxx", b"bxX", b"C+", b"CCC", b"D|E", b"D", b"FF", b"Ff",
               b"fo/o", b"fo/obar", b"ifx", b"ifz", b"ify", b"ifa", b"kw", b"ww", b"dd",
               b"eeff", b"ee", b".*", b"ccc", b"a word b", b"swordy", b"the startx", b"]a]",
               b"b", b"\\a\\", b"A!", b"a!", b"1f 2", b"+-+", b"y", b"yyy", b"yyyy", b"ZZ",
               b"zz", b"uAvB", b"uvv", b"qq@@", b"Z"]

PCRE_RULES = rb"""
/^(a+)(b)?c$/ got=$1,${2},$(1)x$$
/^(?<nm>n)(x)$/ named[$1][$2]
/^[[:digit:]]+$/ digits
/^[[:^alpha:]]+x$/ nonalphax
/^ca$/i casesens
/^dot.x$/ dotall
/^anch/A Aflag
/end$/E endE
/^ug(a+)/U ungreedy[$1]
/^gr(a+?)/U greedyU[$1]
/^xx a b/x extended
/^X/X obsolete
/^q\Q.*\E$/ quoted
/^hex\x{41}\x42$/ hexbrace
/^zz\z/ zlower
/^h\h$/ hspace
/^(p)?q(r)?$/ [$1][$2]
/^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$/ $10
/^ab\Kc/ keep

/^Q/Q unknownflag
/^(x|xy)/ [$1]
/^in(?i)Line$/-i inlineflag
/^sc(?-i)Ase|^Other$/ scoped
/^k\d{2,}$/ kdigits
/^w{,2}$/ literalbrace
/^v(?=1)/ lookahead
/(?<=L)ook$/ lookbehind
/^re(\w)\1$/ backref
/^gname(?P<g>.)(?P=g)$/ pnamed
/^[\w.-]+@[^@]+$/ address
"""
PCRE_KEYS = [b"aaac", b"aaabc", b"nx", b"123", b"12x", b"CA", b"ca", b"dotzx", b"zanch",
             b"anchz", b"end", b"endx", b"ugaaa", b"graaa", b"xxab", b"X", b"q.*", b"qaa",
             b"hexAB", b"hexab", b"zz", b"h ", b"hx", b"q", b"pq", b"qr",
             b"abcdefghij", b"abc", b"rec", b"Q", b"xy", b"inLINE", b"INline", b"scAse",
             b"scase", b"OTHER", b"k12", b"k1", b"w{,2}", b"ww", b"v1", b"v2", b"Look",
             b"reaa", b"reab", b"gnamexx", b"gnamexy", b"a.b-c@d"]


@pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed")
@pytest.mark.parametrize("kind,rules,keys,compile_fn", [
    ("regexp", REGEXP_RULES, REGEXP_KEYS, compile_regexp),
    ("pcre", PCRE_RULES, PCRE_KEYS, compile_pcre),
])
def test_regex_tables_match_postfix(pfconf, tmp_path, kind, rules, keys, compile_fn):
    path = tmp_path / f"t.{kind}"
    path.write_bytes(rules)
    expected = postfix_answers(pfconf, f"{kind}:{path}", keys)
    # leftmost-longest (POSIX) vs leftmost-first (Python) is a documented
    # difference; it shows only in the text captured, never in found/not found.
    ours = our_answers(compile_fn, rules, keys)
    assert expected
    assert ours == expected


# --- engines, templates, warnings ---------------------------------------------

def test_regexp_alternation_is_posix_leftmost_longest():
    assert compile_regexp(b"/^(x|xy)/ [$1]\n").lookup(b"xy") == b"[xy]"
    assert compile_pcre(b"/^(x|xy)/ [$1]\n").lookup(b"xy") == b"[x]"


def test_pcre_constructs_python_re_lacks_are_served():
    program = compile_pcre(b"/^\\p{Lu}+$/ upper\n/^ab\\Kc(.)/ keep$1\n/(?<=a|bc)x/ behind\n")
    assert program.lookup(b"ABC") == b"upper"
    assert program.lookup(b"abcd") == b"keepd"
    assert program.lookup(b"bcx") == b"behind"


def test_bad_patterns_are_reported_with_the_engines_words_and_skipped():
    warnings = []
    program = compile_pcre(b"/ok/ 1\n/a(/ 2\n/x/ 3\n", "/etc/x.pcre", 0, warnings.append)
    assert program.lookup(b"ok") == b"1" and program.lookup(b"x") == b"3"
    assert warnings == ["pcre map /etc/x.pcre, line 2: error in regex at offset 2: "
                        "missing closing parenthesis"]
    warnings.clear()
    program = compile_regexp(b"/a(/ 2\n/x/ 3\n", "/etc/x.regexp", 0, warnings.append)
    assert program.lookup(b"x") == b"3"
    assert warnings == ["regexp map /etc/x.regexp, line 1: Unmatched ( or \\("]


def test_template_parsing():
    from proxymap.tables.patterns import Say
    said = []
    say = Say("p: ", said.append)
    t = parse_template(b"a$1${2}$(3)$$b", "out of range", say)
    assert t.parts == [b"a", 1, 2, 3, b"$b"] and t.max_sub == 3 and not said
    assert parse_template(b"plain$$", "out of range", say).literal == b"plain$"
    for bad, expected in [(b"$1abc", ['p: non-numeric replacement index "1abc"']),
                          (b"$a$b", ['p: non-numeric replacement index "a"',
                                     'p: non-numeric replacement index "b"']),
                          (b"${1", ['truncated macro reference: "${1"']),
                          (b"x$", ['empty macro name: "x$"']),
                          (b"$0", ['p: out of range replacement index "0"'])]:
        said.clear()
        with pytest.raises(RuleError, match="bad replacement syntax: skipping this rule"):
            parse_template(bad, "out of range", say)
        assert said == expected


def test_no_regsub_skips_substitution_rules():
    warnings = []
    data = b"/^(a)/ $1\n/^a/ plain\n"
    program = compile_regexp(data, "f", F.NO_REGSUB, warnings.append)
    assert program.lookup(b"a") == b"plain"
    assert warnings == ["regexp map f, line 1: regular expression substitution is not allowed:"
                        " skipping this rule"]
    assert compile_regexp(data, "f", 0, None).lookup(b"a") == b"a"


def test_cidr_warnings_name_file_and_line():
    warnings = []
    compile_cidr(b"1.2.3.4/24 x\nIF 1.0.0.0/8\n", "/m.cidr", 0, warnings.append)
    assert warnings == ['cidr map /m.cidr, line 1: non-null host address bits in "1.2.3.4/24",'
                        ' perhaps you should use "1.2.3.0/24" instead: skipping this rule',
                        "cidr map /m.cidr, line 2: IF has no matching ENDIF"]


@pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed")
@pytest.mark.parametrize("kind,rules", [("cidr", CIDR_RULES), ("cidr", CIDR_RULES2),
                                        ("cidr", CIDR_RULES3), ("regexp", REGEXP_RULES),
                                        ("pcre", PCRE_RULES)])
def test_warnings_are_the_real_postmaps(pfconf, tmp_path, kind, rules):
    """Every line we log about a rule file is the line real postmap writes
    to stderr when it opens the same file."""
    path = tmp_path / f"t.{kind}"
    path.write_bytes(rules)
    proc = subprocess.run([POSTMAP, "-c", str(pfconf), "-q", "nothing", f"{kind}:{path}"],
                          capture_output=True, timeout=30)
    real = [line.partition(": warning: ")[2] for line in proc.stderr.decode("latin-1").splitlines()
            if ": warning: " in line]
    assert real
    ours = []
    {"cidr": compile_cidr, "regexp": compile_regexp, "pcre": compile_pcre}[kind](
        rules, str(path), 0, ours.append)
    assert ours == real


# --- the Table objects ------------------------------------------------------

@pytest.mark.parametrize("kind,rules,key,value", [
    ("cidr", b"10.0.0.0/8 ten\n", b"10.1.2.3", b"ten"),
    ("regexp", b"/^ab(c)$/ x$1\n", b"ABC", b"xC"),
    ("pcre", b"/^ab(c)$/ x$1\n", b"ABC", b"xC"),
])
def test_table_open_lookup_reload(tmp_path, kind, rules, key, value):
    path = tmp_path / f"t.{kind}"
    path.write_bytes(rules)
    past = time.time() - 10   # a stamp taken just after a write is not trusted
    os.utime(path, (past, past))
    table = open_table(f"{kind}:{path}", F.FOLD_MUL, False, {})
    assert table.flags & F.PATTERN
    assert table.lookup(key) == value.lower()
    table.flags &= ~F.FOLD_MUL
    assert table.lookup(key) == value
    assert table.lookup(b"nomatch") is None
    for call in (lambda: table.update(b"a", b"b"), lambda: table.delete(b"a"),
                 lambda: table.sequence(True)):
        with pytest.raises(Unsupported):
            call()
    assert not table.changed()
    path.write_bytes(rules + b"# changed\n")
    assert table.changed()
    with pytest.raises(TableOpenError):
        open_table(f"{kind}:{path}", 0, True, {})
    with pytest.raises(TableOpenError):
        open_table(f"{kind}:{tmp_path}/missing", 0, False, {})


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_literal_shortcut_never_changes_an_answer(kind):
    """Random patterns over a small alphabet, each compiled with and
    without the necessary-literal shortcut: for every subject both must
    give the engine's answer, negated patterns included."""
    import random
    from proxymap.tables import literals
    from proxymap.tables import pcre as pcre_mod, regexp as regexp_mod
    pieces = [b"a", b"b", b"ab", b"(", b")", b"|", b"*", b"+", b"?", b"[ab]", b"[^a]", b"^", b"$",
              b".", b"{1,2}", b"{2}", b"\\.", b"\\w", b"\\b", b"-", b"B", b"(a|b)", b"\\(",
              b"[]a]", b"[[:alpha:]]", b"\\<"]
    if kind == "pcre":
        pieces += [b"(?i)", b"(?=a)", b"(?<!b)", b"\\Kb", b"a++", b"a*?", b"\\d", b"{,2}", b"(?:ab)",
                   b"\\Q.\\E", b"(?#)", b"\\x61"]
    subjects = [b"", b"a", b"b", b"ab", b"AB", b"aab", b"ba", b"a.b", b"-", b"a-b", b"abab", b"(",
                b"{", b"xab", b"B", b"aB", b"a b", b"bab."]
    rng = random.Random(11)
    compared = shortcut = 0
    for _ in range(2500):
        pattern = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        if b"/" in pattern:
            continue
        flags = rng.choice([b"", b"i"])
        negate = rng.random() < 0.3
        line = (b"!" if negate else b"") + b"/" + pattern + b"/" + flags
        if kind == "regexp" and rng.random() < 0.3:     # /re1/!/re2/
            second = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
            if b"/" not in second:
                line += b"!" * rng.randint(1, 2) + b"/" + second + b"/"
        line += b" hit\n"
        engine = regexp_mod if kind == "regexp" else pcre_mod
        program = engine.compile_regexp(line) if kind == "regexp" else engine.compile_pcre(line)
        if not program.rules:
            continue
        if kind == "regexp":
            literal = literals.posix_literal(pattern)
        else:
            literal = literals.pcre_literal(pattern)
        shortcut += literal is not None
        slow = _without_shortcut(kind, line)
        for subject in subjects:
            assert program.lookup(subject) == slow.lookup(subject), (line, subject)
            compared += 1
    assert compared > 15000 and shortcut > 300


def _without_shortcut(kind, line):
    from proxymap.tables import literals
    saved = literals.posix_literal, literals.pcre_literal
    literals.posix_literal = literals.pcre_literal = lambda _p: None
    try:
        return compile_regexp(line) if kind == "regexp" else compile_pcre(line)
    finally:
        literals.posix_literal, literals.pcre_literal = saved


def test_indexed_cidr_lookup_agrees_with_the_rule_by_rule_scan():
    import ipaddress
    import random
    from proxymap.tables.cidr import IndexedCidrProgram
    from proxymap.tables.patterns import Program
    rng = random.Random(5)
    lines = []
    for i in range(1500):
        if rng.random() < 0.1:
            net = ipaddress.ip_network(f"2001:db8:{rng.randrange(65536):x}::/{rng.choice([32, 48, 64, 128])}",
                                       strict=False)
        else:
            address = ".".join(str(rng.randrange(256)) for _ in range(4))
            net = ipaddress.ip_network(f"{address}/{rng.choice([8, 12, 16, 24, 32])}", strict=False)
        lines.append(f"{net} result{i}")
    program = compile_cidr("\n".join(lines).encode())
    assert isinstance(program, IndexedCidrProgram)
    linear = Program(program.rules)
    keys = [".".join(str(rng.randrange(256)) for _ in range(4)).encode() for _ in range(2000)]
    keys += [f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(65536):x}".encode() for _ in range(300)]
    keys += [b"not-an-address", b"1.2.3", b"::ffff:1.2.3.4"]
    answers = [program.lookup(k) for k in keys]
    assert answers == [linear.lookup(k) for k in keys]
    assert sum(a is not None for a in answers) > 100
    # negations and IF blocks keep the rule-by-rule scan
    assert not isinstance(compile_cidr(b"!10.0.0.0/8 x\n"), IndexedCidrProgram)
    assert not isinstance(compile_cidr(b"IF 10.0.0.0/8\n10.1.0.0/16 x\nENDIF\n"),
                          IndexedCidrProgram)


def test_a_match_error_is_logged_and_the_rule_does_not_apply():
    """dict_pcre: a pcre2_match() error (here a (*UTF) pattern meeting a
    key that is not UTF-8) logs PCRE2's message and counts as "no", even
    for a negated pattern; the next rule still gets its turn."""
    warnings = []
    program = compile_pcre(b"/(*UTF)^.$/ one\n!/(*UTF)x/ negated\n/./ next\n", "/u.pcre", 0,
                           warnings.append)
    assert program.lookup("é".encode()) == b"one"
    assert not warnings
    assert program.lookup(b"\xff") == b"next"
    assert warnings == ["pcre map /u.pcre, line 1: UTF-8 error: illegal byte (0xfe or 0xff)",
                        "pcre map /u.pcre, line 2: UTF-8 error: illegal byte (0xfe or 0xff)"]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_literal_index_gives_the_rule_by_rule_answer(kind):
    """Random tables of 20-60 rules (literals of several lengths, cases,
    negations, IF blocks, rules without a literal): the indexed lookup,
    the rule-by-rule scan and the engine alone agree on every key."""
    import random
    from proxymap.tables.patterns import LiteralIndex, Program
    rng = random.Random(3)
    words = [b"ab", b"abc", b"bc", b"xyz", b"Ab", b"q.", b"zz"]
    compiled_fn = compile_regexp if kind == "regexp" else compile_pcre
    indexed_tables = 0
    for _ in range(60):
        lines = []
        for n in range(rng.randint(20, 60)):
            word = rng.choice(words).replace(b".", b"\\.")
            pattern = rng.choice([b"^%s", b"%s$", b"%s[a-c]", b"x?%s", b"[0-9]+", b"(a|b)%s"])
            pattern = pattern % word if b"%s" in pattern else pattern
            flags = rng.choice([b"", b"i"])
            r = rng.random()
            if r < 0.08:
                lines.append(b"IF /" + pattern + b"/" + flags)
            elif r < 0.14:
                lines.append(b"ENDIF")
            else:
                neg = b"!" if rng.random() < 0.1 else b""
                lines.append(neg + b"/" + pattern + b"/" + flags + b" r%d" % n)
        data = b"\n".join(lines) + b"\n"
        program = compiled_fn(data)
        linear = Program(program.rules)
        plain = _without_shortcut(kind, data)
        indexed_tables += isinstance(program, LiteralIndex)
        for _ in range(40):
            key = b"".join(rng.choice([b"a", b"b", b"c", b"x", b"y", b"z", b"A", b"B", b"q", b".",
                                       b"1"]) for _ in range(rng.randint(1, 8)))
            expected = plain.lookup(key)
            assert linear.lookup(key) == expected, (data, key)
            assert program.lookup(key) == expected, (data, key)
    assert indexed_tables > 30
