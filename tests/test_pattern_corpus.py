"""regexp: and pcre: answers against the real Postfix, byte for byte.

A corpus of rule files (alternation, back-references, case folding, anchors,
classes, Unicode properties, \\K, lookarounds, possessive and lazy
quantifiers, UTF-8 keys, substitutions with empty groups, IF/ENDIF,
negation, broken rules). For every file: the real `postmap -q -` output
and the warnings on its stderr must equal what our compiled program answers
and logs, and the same keys through `proxy:` to our worker must give the
real postmap's direct answers. Keys are batched, one postmap run per file.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from proxymap.tables.pcre import compile_pcre
from proxymap.tables.regexp import compile_regexp
from tests.instance import POSTMAP, needs_postmap
from worker_fixture import WorkerInstance

pytestmark = [pytest.mark.interop,
              needs_postmap]

# (kind, theme, rule file, keys)
CORPUS = [
    ("regexp", "alternation", rb"""
/^(x|xy)/ [$1]
/^(a|ab)(c|bcd)(d*)$/ [$1][$2][$3]
/^(wee|week)(knights|night)$/ [$1][$2]
/^(a*)(ab)*(b*)$/ [$1][$2][$3]
/^(one|two|three)+$/ rep[$1]
/^m(a|b|ab)*c$/ mc[$1]
""", [b"xy", b"x", b"xyz", b"abcd", b"abcdd", b"acd", b"weeknights", b"weeknight",
      b"aabb", b"ab", b"b", b"onetwothree", b"threeone", b"mabc", b"mabac", b"mc", b"zz"]),
    ("regexp", "backreferences", rb"""
/^(.)\1$/ double[$1]
/^([a-z]+)-\1$/ same[$1]
/^(a+)(b+)\2\1$/ pal[$1][$2]
/^\(x*\)y\1$/x bre[$1]
""", [b"aa", b"AA", b"aA", b"ab", b"foo-foo", b"foo-FOO", b"foo-bar", b"aabbbbaa", b"abba",
      b"abbba", b"xxyxx", b"yxx", b"y", b"xyx"]),
    ("regexp", "case", rb"""
/^CaSe$/ folded
/^exact$/i sensitive
/^[[:upper:]]+$/ upper
/^[[:lower:]]+[0-9]$/i lower
/^[A-C]x$/ range
""", [b"case", b"CASE", b"Case", b"exact", b"EXACT", b"Exact", b"abc", b"ABC", b"abc1",
      b"ABC1", b"bx", b"BX", b"dx"]),
    ("regexp", "anchors and escapes", rb"""
/^start/ s
/end$/ e
/\bword\b/ w
/\Bmid\B/ m
/\<pre/ p
/post\>/ q
/^\w+@\w+$/ addr
/^\W+$/ nonword
/^a\sb$/ space
/^\S+\.txt$/ txt
/\`back/ bq
/fwd\'/ fq
/^\.\*\+\?$/ meta
""", [b"starter", b"the end", b"ends", b"a word here", b"swordfish", b"amidst", b"mid",
      b"prefix", b"apre", b"post", b"postal", b"me@host", b"me@host.x", b"--", b"a b",
      b"a\tb", b"file.txt", b"my file.txt", b"backwards", b"aback", b"fwd", b"fwdx",
      b".*+?", b"x"]),
    ("regexp", "classes", rb"""
/^[]a]+$/ bracket
/^[^]a]$/ notbracket
/^[a\]+$/ backslash
/^[[:digit:]]{3}$/ three
/^[[:alpha:]][[:alnum:]_-]*$/ ident
/^[[:space:][:punct:]]+$/ spunct
/^[[:xdigit:]]+$/ hex
/^[[.-.]a]+$/ collating
/^[[=e=]]x$/ equiv
/^[^[:alnum:]]+$/ nonalnum
/^[[:cntrl:][:blank:]]+$/ ctl
""", [b"]a]", b"b", b"]", b"\\a", b"123", b"12", b"1234", b"a_b-c", b"_a", b"!? ;",
      b"DEADbeef", b"-a-", b"ex", b"Ex", b"+++", b"\x01 ", b"zz9"]),
    ("regexp", "intervals and quantifiers", rb"""
/^a{2}$/ two
/^b{2,}$/ twoplus
/^c{,2}$/ uptotwo
/^d{1,3}e$/ range
/^(fg){2}$/ group[$1]
/^h+i*j?$/ hij
/^k**$/ kk
""", [b"aa", b"a", b"aaa", b"bb", b"bbbbb", b"b", b"", b"c", b"cc", b"ccc", b"de", b"ddde",
      b"dddde", b"fgfg", b"fg", b"hhh", b"hij", b"hiiijj", b"kkk"]),
    ("regexp", "basic RE (x flag)", rb"""
/^a\(b\)\{2\}$/x bre[$1]
/^c+$/x plus
/^*d/x star
/^e\|^f/x alt
/^g$h/x dollar
/^i\+$/x gnuplus
""", [b"abb", b"ab", b"c+", b"cc", b"*d", b"d", b"e", b"f", b"g$h", b"gh", b"iii", b"i+"]),
    ("regexp", "UTF-8 keys", """
/^.$/ onebyte
/^..$/ twobytes
/^é/ eacute
/^[é]$/ bracketbyte
/^Ü(.*)$/ uml[$1]
/straße/ strasse
""".encode(), ["é".encode(), b"e", "éa".encode(), "Über".encode(), "über".encode(),
               "Straße".encode(), "STRASSE".encode(), "日".encode(), b"ab", "ÜBER".encode(),
               "Ü".encode(), "straßenbahn".encode(), "É".encode()]),
    ("regexp", "substitutions", rb"""
/^(a)?(b)(c*)$/ [$1][$2][$3]
/^d(e)(f)?$/ ${1}x$(2)y$$z
/^g(h*)$/ <$1>
/^i(j)(k)(l)(m)(n)(o)(p)(q)(r)(s)$/ $10-$1
/^t(.)/ $$1
/^u(.)(.)/ $2$1$2$1
/^v/ $$$$
/^w/ no subst ${}
/^x(y)/ $0
/^y(z)/ $(1
/^z/ ${abc}
/^A(.)/ ${01}
""", [b"b", b"abc", b"bcc", b"de", b"def", b"g", b"ghh", b"ijklmnopqrs", b"tx", b"uab",
      b"v", b"w", b"xy", b"yz", b"z", b"AB"]),
    ("regexp", "IF and negation", rb"""
IF /^if/
/x$/ ifx
IF !/y/
/z$/ ifz
ENDIF
/^if/ ifend
ENDIF
!/^n/ notn
/^nm/!/nmm/ nm_not_nmm
/^no/!!/nox/ no_and_nox
/^ns/ !/nss/ spaced
/^nt/! /ntt/ bangspace
if/^nu/
/./ nu
endif
IF /^nv/
/^nvw/ nvw
""", [b"ifx", b"ifz", b"ifyz", b"ifa", b"abc", b"nm", b"nmm", b"no", b"nox", b"ns", b"nss",
      b"nt", b"ntt", b"nu", b"nv", b"nvw", b"n"]),
    ("regexp", "delimiters and broken rules", rb"""
|^a\|b| pipe
/^c\/d/ slash
,^e\,f, comma
/^g/Q unknownflag
/^h/m newline
/(unclosed/ paren
/[z-a]/ range
/^i/
/^j(.)/ $2
!/^k(.)/ $1
/^l
   continued/ cont
/^m/   value with   inner   space
IFX /^n/
/^o/ o
""", [b"a|b", b"ab", b"c/d", b"e,f", b"g", b"h", b"i", b"j1", b"k1", b"zz", b"lcontinued",
      b"l   continued", b"m", b"n", b"o"]),

    ("pcre", "alternation", rb"""
/^(x|xy)/ [$1]
/^(a|ab)(c|bcd)(d*)$/ [$1][$2][$3]
/^(?:one|two)+$/ rep
/^(wee|week)(knights|night)$/ [$1][$2]
""", [b"xy", b"x", b"abcd", b"abcdd", b"onetwo", b"weeknights", b"q", b"xyz", b"XY", b"acd",
      b"abcdddd", b"two", b"onethree", b"weeknight", b"weeknightsx", b"ab"]),
    ("pcre", "Unicode properties and \\K", rb"""
/^\p{Lu}+$/ upper
/^\p{Ll}\P{Ll}$/ lowthen
/^\p{L}+\d$/ letters
/^\pN+$/ numbers
/^foo\Kbar(.*)/ keep[$1]
/^(\w+)@\K(.+)/ domain[$2]
/^(*UTF)\x{e9}$/ utf_eacute
/^(*UTF)\p{Lu}.$/ utfupper
/^(*UCP)\w+$/ ucpword
""", [b"ABC", b"abc", b"aB", b"aa", b"abc1", b"123", b"foobarbaz", b"foobar", b"me@example",
      "é".encode(), "É".encode(), "Éa".encode(), "Ñx".encode(), b"abc", "über".encode(),
      b"aB1", b"Ab", b"ab", b"x1", b"x", b"fooba", b"a@b", b"@b", b"EE",
      "Ü".encode(), "üx".encode(), b"foobarfoobar"]),
    ("pcre", "lookarounds", rb"""
/^v(?=1)(.)/ ahead[$1]
/^w(?!1)(.)/ notahead[$1]
/(?<=L)ook$/ behind
/(?<!N)ope$/ notbehind
/(?<=a|bc)x$/ varbehind
/^(?=.*\d)(?=.*[a-z]).{4}$/ password
""", [b"v1", b"v2", b"w1", b"w2", b"Look", b"look", b"hope", b"Nope", b"ax", b"bcx", b"cx",
      b"ab12", b"abcd", b"1234", b"v", b"w", b"ook", b"ope", b"x", b"a1b2", b"1a", b"zz1z",
      b"LLook", b"NNope"]),
    ("pcre", "possessive, lazy, atomic", rb"""
/^(a++)b/ poss[$1]
/^(c*+)c/ posfail[$1]
/^(d+?)(d*)$/ lazy[$1][$2]
/^(?>e+)e/ atomic
/^(f.*?)g(.*)$/ lazyg[$1][$2]
/^(h{2,}?)(h*)$/ lazyrange[$1][$2]
/^ug(a+)/U ungreedy[$1]
/^gr(a+?)/U greedyU[$1]
""", [b"aaab", b"ccc", b"dddd", b"eee", b"fxgygz", b"hhhh", b"ugaaa", b"graaa", b"ab", b"b",
      b"d", b"e", b"ee", b"fg", b"fgg", b"hh", b"hhh", b"uga", b"gra", b"cccd"]),
    ("pcre", "flags", rb"""
/^ca$/i casesens
/^dot.x$/ dotall
/^dot.y$/s nodotall
/^anch/A Aflag
/end$/E endE
/^xx a b/x extended
/^X/X obsolete
/^q/Z unknown
/^m$/m multiline
/^(?i)in(?-i)LINE$/i inline
/^sc(?i:ase)$/i scoped
""", [b"CA", b"ca", b"dotzx", b"dotzy", b"zanch", b"anchz", b"end", b"endx", b"xxab",
      b"X", b"q", b"m", b"inLINE", b"INLINE", b"inline", b"scASE", b"SCase", b"Ca", b"DOTZX",
      b"ANCH", b"END", b"x", b"xx ab", b"Xy", b"M", b"scase"]),
    ("pcre", "escapes", rb"""
/^q\Q.*\E$/ quoted
/^hex\x{41}\x42$/ hexbrace
/^oct\o{101}\101$/ octal
/^ctl\cA$/ control
/^h\h$/ hspace
/^zz\z/ zlower
/^zZ\Z/ zupper
/^\Aanchor/ bigA
/^\d{2,}$/ digits
/^\N+$/ notnl
/^w{,2}$/ literalbrace
/^y{2}$/ twoy
/^[\w.-]+@[^@]+$/ address
/^[[:^alpha:]]+x$/ nonalphax
""", [b"q.*", b"qaa", b"hexAB", b"hexab", b"octAA", b"ctl\x01", b"h ", b"hx", b"zz", b"zZ",
      b"anchor", b"12", b"1", b"abc", b"w{,2}", b"ww", b"yy", b"a.b-c@d", b"12x", b"ax",
      b"QQ.*", b"HEXAB", b"oct", b"ctlA", b"h\t", b"ZZ", b"ANCHOR", b"123456", b"w", b"y", b"yyy",
      b"a@b@c", b"@x", b"--x"]),
    ("pcre", "groups", rb"""
/^(?<nm>n)(x)$/ named[$1][$2]
/^gname(?P<g>.)(?P=g)$/ pnamed
/^k(?<c>.)\k<c>$/ kref
/^r(e)\g{-1}$/ relative
/^(?|(a)|(b))(c)$/ reset[$1][$2]
/^\((?:[^()]|(?R))*\)$/ recursive
/^(p)(?1)$/ subroutine[$1]
/^(c)?(?(1)d|e)$/ conditional[$1]
/^(?#comment)co$/ comment
/^callout(?C1)$/ callout
""", [b"nx", b"gnamexx", b"gnamexy", b"kzz", b"ree", b"ac", b"bc", b"(a(b)c)", b"(a(b)",
      b"pp", b"cd", b"e", b"co", b"callout", b"NX", b"kzy", b"rEe", b"abc", b"()", b"((()))",
      b"p", b"d", b"ce", b"CALLOUT"]),
    ("pcre", "substitutions", rb"""
/^(a)?(b)(c*)$/ [$1][$2][$3]
/^(p)?q(r)?$/ [$1][$2]
/^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)x$/ $10
/^d(e)(f)?$/ ${1}x$(2)y$$z
/^(k)(l)$/ $3
/^m/ ${0}
""", [b"b", b"abc", b"bcc", b"q", b"pq", b"qr", b"pqr", b"abcdefghijx", b"de", b"def", b"kl",
      b"m", b"ABC", b"PQR", b"kl1", b"dex", b"mm"]),
    ("pcre", "IF and negation", rb"""
IF /^if/
/x$/ ifx
IF !/y/
/z$/ ifz
ENDIF trailing
/^if/ ifend
ENDIF
!/^n/ notn
!/^nn(.)/ neg$1
/^no/ no
IF /^p/ extra
/^p/ p
ENDIF
ENDIF
IF /^u/
""", [b"ifx", b"ifz", b"ifyz", b"ifa", b"abc", b"nn1", b"no", b"p", b"u", b"n", b"IFX",
      b"ifyx", b"nn", b"nnn", b"noo", b"pp", b"uu", b"xyz"]),
    ("pcre", "UTF-8 keys and bytes", """
/^.$/ onebyte
/^..$/ twobytes
/^é/ eacute
/^[é]$/ bytebracket
/^(*UTF).$/ onechar
/ß/i sharp
/^\\x{c3}/ leadbyte
""".encode(), ["é".encode(), b"e", "éa".encode(), "日".encode(), "ß".encode(), "ẞ".encode(),
               "Ã".encode(), "ÃÃ".encode(), "ña".encode(), "€".encode(), b"ss", b"SS"]),
]


def _write(tmp_path, index, kind, rules) -> str:
    path = tmp_path / f"c{index:02d}.{kind}"
    path.write_bytes(rules.lstrip(b"\n"))
    return str(path)


def _postmap(etc, spec, keys):
    proc = subprocess.run([POSTMAP, "-c", str(etc), "-q", "-", spec],
                          input=b"".join(k + b"\n" for k in keys if k),
                          capture_output=True, timeout=60)
    return proc


def _warnings(stderr: bytes) -> list[str]:
    """The table's warnings on postmap's stderr (without postmap's own
    complaints about empty results, which come from the client side)."""
    client = ("empty string result is not allowed", "should return NO RESULT")
    return [line.partition(": warning: ")[2] for line in stderr.decode("latin-1").splitlines()
            if ": warning: " in line and not any(c in line for c in client)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = [(kind, theme, _write(root, i, kind, rules), rules, keys)
             for i, (kind, theme, rules, keys) in enumerate(CORPUS)]
    inst = WorkerInstance(root / "inst", read_maps=" ".join(f"proxy:{kind}:{path}"
                                                        for kind, _, path, _, _ in files))
    yield inst, files
    inst.stop()


def test_corpus_is_large_enough():
    pairs = {kind: sum(len([k for k in keys if k]) for kd, _, _, keys in CORPUS if kd == kind)
             for kind in ("regexp", "pcre")}
    assert pairs["regexp"] + pairs["pcre"] >= 300 and min(pairs.values()) >= 150, pairs


@pytest.mark.parametrize("index", range(len(CORPUS)),
                         ids=[f"{kind}-{theme}" for kind, theme, _, _ in CORPUS])
def test_answers_and_warnings_equal_real_postmap(corpus, index):
    inst, files = corpus
    kind, _theme, path, rules, keys = files[index]
    real = _postmap(inst.config_dir, f"{kind}:{path}", keys)
    compile_fn = compile_regexp if kind == "regexp" else compile_pcre
    logged: list[str] = []
    program = compile_fn(rules.lstrip(b"\n"), path, 0, logged.append)
    ours = b""
    for key in keys:
        if not key:
            continue
        value = program.lookup(key)
        if value is not None:
            ours += key + b"\t" + value + b"\n"
    assert ours == real.stdout
    assert real.stdout.count(b"\n") >= 2   # not a vacuous comparison
    assert logged == _warnings(real.stderr)


def test_the_same_answers_through_proxy(corpus):
    inst, files = corpus
    inst.start("proxymap")
    for kind, theme, path, _rules, keys in files:
        direct = _postmap(inst.config_dir, f"{kind}:{path}", keys)
        proxied = _postmap(inst.config_dir, f"proxy:{kind}:{path}", keys)
        assert proxied.stdout == direct.stdout, (kind, theme, proxied.stderr)


def test_check_lists_every_rule_a_reload_would_skip(instance):
    """`proxymap-master check` reports, before a reload makes them live,
    the very warnings a worker (and real postmap) gives for each pattern
    table in proxy_read_maps."""
    tables = instance.table_dir
    files = {"regexp": b"/^ok/ fine\n/(/ broken\n/^a(.)/ $2\nIF /x/\n",
             "pcre": b"/^ok/ fine\n/a\\K(/ broken\n/x/Q flag\n/^(y)/ $3\n",
             "cidr": b"10.0.0.0/8 ten\n1.2.3.4/24 hostbits\n1.2.3.4/33 mask\nENDIF\n"}
    specs = []
    for kind, rules in files.items():
        path = os.path.join(tables, f"check.{kind}")
        with open(path, "wb") as f:
            f.write(rules)
        os.chmod(path, 0o644)
        specs.append(f"{kind}:{path}")
    instance.write_main_cf(proxy_read_maps=" ".join(f"proxy:{s}" for s in specs))
    result = instance.control("check")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    got = [line.split(": warning: ", 1)[1] for line in result.stderr.splitlines()
           if ": warning: " in line]
    for spec in specs:
        real = subprocess.run([POSTMAP, "-c", instance.config_dir, "-q", "nothing", spec],
                              capture_output=True, timeout=30)
        expected = _warnings(real.stderr)
        assert len(expected) >= 3, expected
        for text in expected:
            assert text in got, (text, got)
