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

from proxymap.tables import literals
from proxymap.tables.patterns import (SPACE, PatternFileTable, PatternSpec, Program,
                                      RegexDialect, RuleError, compile_regex_rules, delimited,
                                      text)

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
_regexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
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
        # plain addresses: the cheapest arguments for ctypes to pass
        self._regex_at = ctypes.addressof(self.regex)
        self._pmatch_at = ctypes.addressof(self.pmatch) if self.nmatch else None

    def __del__(self):
        if getattr(self, "_compiled", False):
            _regfree(ctypes.byref(self.regex))

    def find(self, key: bytes) -> bool:
        error = _regexec(self._regex_at, key, self.nmatch, self._pmatch_at, 0)
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


class PosixDialect(RegexDialect):
    """dict_regexp.c's pattern syntax and calls."""

    kind = "regexp"
    range_word = "out-of-range"
    second_pattern = True

    def get_pattern(self, line: bytes, i: int, say) -> tuple[PatternSpec, int]:
        """dict_regexp_get_pat(): flags run to a blank or `!`."""
        match, regex, k = delimited(line, i, "skipping")
        options = REG_EXTENDED | REG_ICASE
        n = len(line)
        while k < n and line[k] not in SPACE and line[k] != 0x21:
            bit = FLAG_OPTIONS.get(line[k])
            if bit is None:
                raise RuleError(f'unknown regexp option "{chr(line[k])}": skipping this rule')
            options ^= bit
            k += 1
        return PatternSpec(regex, options, match), k

    def compile(self, spec: PatternSpec, max_sub: int, say):
        compiled = PosixRegex(spec.regex, spec.options | (0 if max_sub else REG_NOSUB),
                              spec.match, max_sub, say)
        literal = literals.posix_literal(spec.regex) if spec.options & REG_EXTENDED else None
        return compiled, None if literal is None else (literal, bool(spec.options & REG_ICASE))


FLAG_OPTIONS = {ord("i"): REG_ICASE, ord("m"): REG_NEWLINE, ord("x"): REG_EXTENDED}
DIALECT = PosixDialect()


def compile_regexp(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a regexp: rule file; problems go to warn()."""
    return compile_regex_rules(DIALECT, data, name, flags, warn)


class RegexpTable(PatternFileTable):
    compile_rules = staticmethod(compile_regexp)
