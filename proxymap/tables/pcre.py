"""The pcre: table: Perl-compatible regular expressions, first matching rule wins.

Mirrors Postfix's dict_pcre on the engine it uses: the system's libpcre2-8
(the library Debian's postfix-pcre links), reached through ctypes and called
as dict_pcre.c calls it: pcre2_compile() with PCRE2_CASELESS | PCRE2_DOTALL
by default and the flags `i m s x A E U` toggling their options, match data
from the pattern, pcre2_match() on the key's bytes with no match options,
no JIT and no UTF mode unless the pattern asks for it. Every warning
follows dict_pcre.c, including PCRE2's own error texts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from proxymap.tables import literals
from proxymap.tables.patterns import (SPACE, PatternFileTable, PatternSpec, Program,
                                      RegexDialect, RuleError, compile_regex_rules, delimited,
                                      text)

CASELESS, MULTILINE, DOTALL, EXTENDED = 0x8, 0x400, 0x20, 0x80
ANCHORED, DOLLAR_ENDONLY, UNGREEDY = 0x80000000, 0x10, 0x40000
ERROR_NOMATCH = -1
INFO_CAPTURECOUNT = 4
ZERO_TERMINATED = ctypes.c_size_t(-1).value
UNSET = ZERO_TERMINATED

FLAG_OPTIONS = {ord("i"): CASELESS, ord("m"): MULTILINE, ord("s"): DOTALL, ord("x"): EXTENDED,
                ord("A"): ANCHORED, ord("E"): DOLLAR_ENDONLY, ord("U"): UNGREEDY}

_lib = ctypes.CDLL(ctypes.util.find_library("pcre2-8") or "libpcre2-8.so.0")
_compile = _lib.pcre2_compile_8
_compile.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32,
                     ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
_compile.restype = ctypes.c_void_p
_match_data = _lib.pcre2_match_data_create_from_pattern_8
_match_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_match_data.restype = ctypes.c_void_p
_match = _lib.pcre2_match_8
_match.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
_match.restype = ctypes.c_int
_ovector = _lib.pcre2_get_ovector_pointer_8
_ovector.argtypes = [ctypes.c_void_p]
_ovector.restype = ctypes.POINTER(ctypes.c_size_t)
_info = _lib.pcre2_pattern_info_8
_info.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
_error_message = _lib.pcre2_get_error_message_8
_error_message.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_code_free = _lib.pcre2_code_free_8
_code_free.argtypes = [ctypes.c_void_p]
_match_data_free = _lib.pcre2_match_data_free_8
_match_data_free.argtypes = [ctypes.c_void_p]


def error_message(code: int) -> str:
    """dict_pcre_get_error()."""
    buf = ctypes.create_string_buffer(256)
    if _error_message(code, buf, 256) > 0:
        return text(buf.value)
    return f"unexpected pcre2 error code {code}"


class Pcre2Pattern:
    """One compiled pattern with its match data. `find(key)` is True/False
    like Postfix's DICT_PCRE_EXEC (an execution error is logged and counts
    as "does not apply"); after a true find, `group(key, n)` is `$n`."""

    def __init__(self, pattern: bytes, options: int, match: bool, say):
        error, offset = ctypes.c_int(), ctypes.c_size_t()
        code = _compile(pattern, ZERO_TERMINATED, options, ctypes.byref(error),
                        ctypes.byref(offset), None)
        if not code:
            raise RuleError(f"error in regex at offset {offset.value}: "
                            f"{error_message(error.value)}")
        self.code = code
        self.data = _match_data(code, None)
        if not self.data:
            raise MemoryError("out of memory in pcre2_match_data_create_from_pattern()")
        count = ctypes.c_uint32()
        _info(code, INFO_CAPTURECOUNT, ctypes.byref(count))
        self.groups = count.value
        self.ovector = _ovector(self.data)
        self.match = match
        self.say = say

    def __del__(self):
        if getattr(self, "data", None):
            _match_data_free(self.data)
        if getattr(self, "code", None):
            _code_free(self.code)

    def find(self, key: bytes) -> bool:
        rc = _match(self.code, key, len(key), 0, 0, self.data, None)
        if rc > 0:
            return self.match
        if rc == ERROR_NOMATCH:
            return not self.match
        self.say(error_message(rc))
        return False

    def group(self, key: bytes, n: int) -> bytes:
        start, end = self.ovector[2 * n], self.ovector[2 * n + 1]
        if start == UNSET or end <= start:
            return b""
        return key[start:end]


class Pcre2Dialect(RegexDialect):
    """dict_pcre.c's pattern syntax and calls."""

    kind = "pcre"
    range_word = "out of range"

    def get_pattern(self, line: bytes, i: int, say) -> tuple[PatternSpec, int]:
        """dict_pcre_get_pattern(): flags run to a blank."""
        match, regex, k = delimited(line, i, "ignoring")
        options = CASELESS | DOTALL
        n = len(line)
        while k < n and line[k] not in SPACE:
            c = line[k]
            if c in FLAG_OPTIONS:
                options ^= FLAG_OPTIONS[c]
            elif c == 0x58:
                say(f'ignoring obsolete regexp option "{chr(c)}"')
            else:
                raise RuleError(f'unknown regexp option "{chr(c)}": skipping this rule')
            k += 1
        return PatternSpec(regex, options, match), k

    def compile(self, spec: PatternSpec, max_sub: int, say):
        compiled = Pcre2Pattern(spec.regex, spec.options, spec.match, say)
        literal = None if spec.options & EXTENDED else literals.pcre_literal(spec.regex)
        return compiled, None if literal is None else (literal, bool(spec.options & CASELESS))


DIALECT = Pcre2Dialect()


def compile_pcre(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a pcre: rule file; problems go to warn()."""
    return compile_regex_rules(DIALECT, data, name, flags, warn)


class PcreTable(PatternFileTable):
    compile_rules = staticmethod(compile_pcre)
