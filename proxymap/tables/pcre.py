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

from proxymap import dictflags as F
from proxymap.tables import literals
from proxymap.tables.patterns import (ALNUM, ENDIF, IfRule, PatternFileTable, Program, Rule,
                                      RuleError, SPACE, c_int, compile_rules, keyword,
                                      negations, parse_template, skip_space, text)

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
        self.prefilter = None

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


def get_pattern(line: bytes, i: int, say) -> tuple[bytes, int, bool, int]:
    """dict_pcre_get_pattern(): (regex, options, match, index after)."""
    match, i = negations(line, i)
    n = len(line)
    if i >= n:
        raise RuleError("no regexp: skipping this rule")
    delim = line[i]
    start = j = i + 1
    while j < n:
        if line[j] == 0x5C:
            j += 1
            if j >= n:
                break
        elif line[j] == delim:
            break
        j += 1
    if j >= n:
        raise RuleError(f'no closing regexp delimiter "{chr(delim)}": ignoring this rule')
    regex = line[start:j]
    options = CASELESS | DOTALL
    k = j + 1
    while k < n and line[k] not in SPACE:
        c = line[k]
        if c in FLAG_OPTIONS:
            options ^= FLAG_OPTIONS[c]
        elif c == 0x58:
            say(f'ignoring obsolete regexp option "{chr(c)}"')
        else:
            raise RuleError(f'unknown regexp option "{chr(c)}": skipping this rule')
        k += 1
    return regex, options, match, k


def compile_pattern(regex: bytes, options: int, match: bool, say):
    """The compiled pattern and its test (behind the literal shortcut when
    the pattern has one)."""
    compiled = Pcre2Pattern(regex, options, match, say)
    literal = None if options & EXTENDED else literals.pcre_literal(regex)
    if literal is None:
        return compiled, compiled.find
    return compiled, literals.guarded(compiled.find, literal, bool(options & CASELESS), match)


def parse_line(line: bytes, number: int, nesting: int, say, flags: int = 0):
    """dict_pcre_parse_rule()."""
    if line[0] not in ALNUM:
        regex, options, match, i = get_pattern(line, 0, say)
        i = skip_space(line, i)
        value = line[i:]
        if not value:
            say("no replacement text: using empty string")
        template = parse_template(value, "out of range", say)
        if template.max_sub and not match:
            raise RuleError("$number found in negative match replacement text: skipping this rule")
        if template.max_sub and flags & F.NO_REGSUB:
            raise RuleError("regular expression substitution is not allowed: skipping this rule")
        compiled, test = compile_pattern(regex, options, match, say)
        if template.max_sub > compiled.groups:
            raise RuleError(f'out of range replacement index "{c_int(template.max_sub)}": '
                            "skipping this rule")
        if not template.max_sub:
            constant = template.literal
            return Rule(number, test, lambda _key: constant)
        parts = [(p, isinstance(p, int)) for p in template.parts]
        group = compiled.group

        def result(key: bytes) -> bytes:
            return b"".join(group(key, p) if is_group else p for p, is_group in parts)
        return Rule(number, test, result)
    rest = keyword(line, b"IF")
    if rest is not None:
        regex, options, match, i = get_pattern(line, skip_space(line, 2), say)
        i = skip_space(line, i)
        if i < len(line):
            say(f'ignoring extra text after IF statement: "{text(line[i:])}"')
            say("do not prepend whitespace to statements between IF and ENDIF")
        return IfRule(compile_pattern(regex, options, match, say)[1])
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


def compile_pcre(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a pcre: rule file; problems go to warn()."""
    return compile_rules(data, "pcre", name,
                         lambda line, number, nesting, say: parse_line(line, number, nesting,
                                                                       say, flags), warn)


class PcreTable(PatternFileTable):
    compile_rules = staticmethod(compile_pcre)
