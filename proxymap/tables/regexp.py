"""The regexp: table: POSIX regular expressions, first matching rule wins.

Mirrors Postfix's dict_regexp on the engine it uses: the C library's
regcomp()/regexec(), reached through ctypes, bytes in and bytes out, with
REG_EXTENDED and REG_ICASE by default (the flags `x` and `i` toggle them,
`m` toggles REG_NEWLINE) and REG_NOSUB when the result needs no `$n`.
Patterns are compiled in the C locale, as Postfix runs, so the answers
(POSIX leftmost-longest captures included) are the C library's own. Rule
syntax, `/re1/!/re2/`, IF/ENDIF and every warning follow dict_regexp.c.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from proxymap.tables.patterns import (ALNUM, ENDIF, IfRule, PatternFileTable, Program, Rule,
                                      RuleError, SPACE, c_int, compile_rules, keyword,
                                      negations, parse_template, skip_space, text)
from proxymap.tables import literals
from proxymap import dictflags as F

REG_EXTENDED, REG_ICASE, REG_NEWLINE, REG_NOSUB = 1, 2, 4, 8
REG_NOMATCH = 1


class _RegexT(ctypes.Structure):
    """glibc's regex_t (re_pattern_buffer), plus room to spare."""
    _fields_ = [("buffer", ctypes.c_void_p), ("allocated", ctypes.c_size_t),
                ("used", ctypes.c_size_t), ("syntax", ctypes.c_ulong),
                ("fastmap", ctypes.c_void_p), ("translate", ctypes.c_void_p),
                ("re_nsub", ctypes.c_size_t), ("bits", ctypes.c_uint),
                ("spare", ctypes.c_char * 64)]


class _RegMatch(ctypes.Structure):
    _fields_ = [("rm_so", ctypes.c_int), ("rm_eo", ctypes.c_int)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_regcomp = _libc.regcomp
_regcomp.argtypes = [ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_int]
_regexec = _libc.regexec
_regexec.argtypes = [ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_size_t,
                     ctypes.c_void_p, ctypes.c_int]
_regerror = _libc.regerror
_regerror.argtypes = [ctypes.c_int, ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_size_t]
_regerror.restype = ctypes.c_size_t
_regfree = _libc.regfree
_regfree.argtypes = [ctypes.POINTER(_RegexT)]
_newlocale = _libc.newlocale
_newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
_newlocale.restype = ctypes.c_void_p
_uselocale = _libc.uselocale
_uselocale.argtypes = [ctypes.c_void_p]
_uselocale.restype = ctypes.c_void_p
#: LC_CTYPE_MASK | LC_COLLATE_MASK of glibc: what regcomp() consults
_C_LOCALE = _newlocale((1 << 0) | (1 << 3), b"C", None)


class PosixRegex:
    """One compiled pattern. `find(key)` is True/False like Postfix's
    DICT_REGEXP_REGEXEC (an execution error is logged and counts as "does
    not apply"); after a true find, `group(n)` is the text of `$n`."""

    def __init__(self, pattern: bytes, options: int, match: bool, nsub_wanted: int, say):
        self.regex = _RegexT()
        previous = _uselocale(_C_LOCALE)
        try:
            error = _regcomp(ctypes.byref(self.regex), pattern, options)
        finally:
            _uselocale(previous)
        if error:
            raise RuleError(regerror(error, self.regex))
        self._compiled = True
        self.groups = self.regex.re_nsub
        self.match = match
        self.say = say
        self.nmatch = nsub_wanted + 1 if nsub_wanted else 0
        self.pmatch = (_RegMatch * self.nmatch)() if self.nmatch else None
        self.prefilter = None

    def __del__(self):
        if getattr(self, "_compiled", False):
            _regfree(ctypes.byref(self.regex))

    def find(self, key: bytes) -> bool:
        error = _regexec(self.regex, key, self.nmatch, self.pmatch, 0)
        if error == REG_NOMATCH:
            return not self.match
        if error == 0:
            return self.match
        self.say(regerror(error, self.regex))
        return False

    def group(self, key: bytes, n: int) -> bytes:
        m = self.pmatch[n]
        if m.rm_so < 0 or m.rm_so == m.rm_eo:
            return b""
        return key[m.rm_so:m.rm_eo]


def regerror(error: int, regex: _RegexT) -> str:
    buf = ctypes.create_string_buffer(256)
    _regerror(error, ctypes.byref(regex), buf, 256)
    return text(buf.value)


class _Pattern:
    """`[!]<d>regex<d>flags` before compiling (DICT_REGEXP_PATTERN)."""

    def __init__(self, regex: bytes, options: int, match: bool):
        self.regex, self.options, self.match = regex, options, match


def get_pattern(line: bytes, i: int) -> tuple[_Pattern, int]:
    """dict_regexp_get_pat(): negations, any delimiter (a backslash keeps
    the next byte, and stays in the pattern), flags up to a blank or `!`."""
    match, i = negations(line, i)
    n = len(line)
    if i >= n:
        raise RuleError("no regexp: skipping this rule")
    delim = line[i]
    start = j = i + 1
    while j < n:
        if line[j] == 0x5C:
            if j + 1 < n:
                j += 1
            else:
                break
        elif line[j] == delim:
            break
        j += 1
    if j >= n:
        raise RuleError(f'no closing regexp delimiter "{chr(delim)}": skipping this rule')
    regex = line[start:j]
    options = REG_EXTENDED | REG_ICASE
    k = j + 1
    while k < n and line[k] not in SPACE and line[k] != 0x21:
        c = line[k]
        if c == 0x69:
            options ^= REG_ICASE
        elif c == 0x6D:
            options ^= REG_NEWLINE
        elif c == 0x78:
            options ^= REG_EXTENDED
        else:
            raise RuleError(f'unknown regexp option "{chr(c)}": skipping this rule')
        k += 1
    return _Pattern(regex, options, match), k


def compile_pattern(pat: _Pattern, max_sub: int, say) -> PosixRegex:
    compiled = PosixRegex(pat.regex, pat.options | (0 if max_sub else REG_NOSUB),
                          pat.match, max_sub, say)
    if pat.options & REG_EXTENDED:
        literal = literals.posix_literal(pat.regex)
        if literal is not None:
            compiled.prefilter = (literal, bool(pat.options & REG_ICASE))
    return compiled


def _tester(first: PosixRegex, second: PosixRegex | None):
    """The rule's test: first pattern, then the optional second one, each
    skipped when its necessary literal is missing from the key."""
    tests = []
    for compiled in (first, second):
        if compiled is None:
            continue
        find, must, match = compiled.find, compiled.prefilter, compiled.match
        if must is None:
            tests.append(find)
        else:
            tests.append(literals.guarded(find, must[0], must[1], match))
    if len(tests) == 1:
        return tests[0]
    one, two = tests
    return lambda key: one(key) and two(key)


def parse_line(line: bytes, number: int, nesting: int, say, flags: int = 0):
    """dict_regexp_parseline()."""
    if line[0] not in ALNUM:
        first, i = get_pattern(line, 0)
        second = None
        if i < len(line) and line[i] == 0x21:
            second, i = get_pattern(line, i)
        i = skip_space(line, i)
        value = line[i:]
        if not value:
            say("no replacement text: using empty string")
        template = parse_template(value, "out-of-range", say)
        if template.max_sub and not first.match:
            raise RuleError("$number found in negative match replacement text: skipping this rule")
        if template.max_sub and flags & F.NO_REGSUB:
            raise RuleError("regular expression substitution is not allowed: skipping this rule")
        one = compile_pattern(first, template.max_sub, say)
        if template.max_sub > one.groups:
            raise RuleError(f'out of range replacement index "{c_int(template.max_sub)}": '
                            "skipping this rule")
        two = compile_pattern(second, 0, say) if second is not None else None
        test = _tester(one, two)
        if not template.max_sub:
            constant = template.literal
            return Rule(number, test, lambda _key: constant)
        parts = [(p, True) if isinstance(p, int) else (p, False) for p in template.parts]
        group = one.group

        def result(key: bytes) -> bytes:
            return b"".join(group(key, p) if is_group else p for p, is_group in parts)
        return Rule(number, test, result)
    rest = keyword(line, b"IF")
    if rest is not None:
        pat, i = get_pattern(line, skip_space(line, 2))
        i = skip_space(line, i)
        if i < len(line):
            say(f'ignoring extra text after IF statement: "{text(line[i:])}"')
            say("do not prepend whitespace to statements between IF and ENDIF")
        return IfRule(_tester(compile_pattern(pat, 0, say), None))
    rest = keyword(line, b"ENDIF")
    if rest is not None:
        if nesting == 0:
            say("ignoring ENDIF without matching IF")
            return None
        if skip_space(rest) < len(rest):
            say("ignoring extra text after ENDIF")
        return ENDIF
    say("ignoring unrecognized request")
    return None


def compile_regexp(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a regexp: rule file; problems go to warn()."""
    return compile_rules(data, "regexp", name,
                         lambda line, number, nesting, say: parse_line(line, number, nesting,
                                                                       say, flags), warn)


class RegexpTable(PatternFileTable):
    compile_rules = staticmethod(compile_regexp)
