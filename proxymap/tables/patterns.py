"""The one rule-file engine of the pattern tables cidr:, regexp: and pcre:.

Postfix's dict_cidr, dict_regexp and dict_pcre each read a rule file once at
open time with readllines(), hand every logical line to a per-type parser,
keep nestable `IF` ... `ENDIF` blocks on a stack, log a bad rule with file
and line and go on with the rest, and answer a lookup with the result of the
first rule that matches. This module is that common part, in one place:

* `compile_rules`: the line loop, with the per-line parser supplied by the
  table type (`parse_line(line, number, nesting, say)`);
* `Program` / `ProgramBuilder`: the compiled rule list with IF/ENDIF jumps;
* `keyword`: Postfix's test for `IF` / `ENDIF` at the start of a line;
* `parse_template`: the `$n ${n} $(n) $$` result text, checked the way
  Postfix's mac_parse() and its pre-scan callbacks check it, with their
  warnings;
* `PatternFileTable`: the Table subclass that loads a rule file.

The regular expressions themselves are compiled and run by the engines
Postfix uses (regexp.py: the C library's POSIX regex; pcre.py: PCRE2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from proxymap import dictflags as F
from proxymap.tables.base import Table, TableOpenError
from proxymap.tables.source import logical_lines

#: Postfix's ISSPACE() and ISALNUM() (ASCII only, the C locale)
SPACE = b" \t\n\v\f\r"
ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


class RuleError(ValueError):
    """A rule is unusable and skipped. The message is the text Postfix logs
    after `<type> map <file>, line <n>: `."""


def text(data: bytes) -> str:
    """Bytes from a rule file as they go into a log line."""
    return data.decode("latin-1")


# ---------------------------------------------------------------------------
# Compiled rule lists with IF/ENDIF
# ---------------------------------------------------------------------------

@dataclass
class Rule:
    """One rule. `test(key)` says whether the rule applies; `result(key)`,
    called right after a true test, builds the value. An IF rule has
    result None and `skip` = index of the first rule after its ENDIF."""
    line: int
    test: Callable[[bytes], object]
    result: Callable[[bytes], bytes] | None = None
    skip: int = 0


@dataclass
class Program:
    rules: list[Rule] = field(default_factory=list)

    def lookup(self, key: bytes) -> bytes | None:
        rules = self.rules
        i, n = 0, len(rules)
        while i < n:
            rule = rules[i]
            if rule.result is None:  # IF
                i = i + 1 if rule.test(key) else rule.skip
            elif rule.test(key):
                return rule.result(key)
            else:
                i += 1
        return None


class ProgramBuilder:
    """Collects rules; IF blocks still open at the end are closed there
    (an IF without ENDIF that does not match ends the lookup, as in
    Postfix)."""

    def __init__(self):
        self.program = Program()
        self._open: list[Rule] = []

    @property
    def nesting(self) -> int:
        return len(self._open)

    def add(self, rule: Rule) -> None:
        self.program.rules.append(rule)

    def open_if(self, line: int, test) -> None:
        rule = Rule(line, test, None)
        self.program.rules.append(rule)
        self._open.append(rule)

    def close_if(self) -> bool:
        """Close the innermost IF; False when there is none."""
        if not self._open:
            return False
        self._open.pop().skip = len(self.program.rules)
        return True

    def finish(self) -> tuple[Program, list[int]]:
        """Return the program and the line numbers of unclosed IFs,
        innermost first."""
        unclosed = []
        while self._open:
            unclosed.append(self._open[-1].line)
            self.close_if()
        return self.program, unclosed


def keyword(line: bytes, word: bytes) -> bytes | None:
    """The text after `word` (IF or ENDIF, any case) when the line starts
    with it and no letter or digit follows, else None."""
    n = len(word)
    if line[:n].upper() == word and (len(line) == n or line[n] not in ALNUM):
        return line[n:]
    return None


#: what a per-line parser returns for an ENDIF line
ENDIF = object()


@dataclass
class IfRule:
    """What a per-line parser returns for an IF line."""
    test: Callable[[bytes], object]


def compile_rules(data: bytes, kind: str, name: str, parse_line, warn) -> Program:
    """Compile a rule file the way Postfix's dict_<kind>_open() does.

    `parse_line(line, number, nesting, say)` gets each logical line (C
    string semantics: up to a NUL byte) and returns a `Rule`, an `IfRule`,
    `ENDIF`, or None for a line it has already reported; it raises
    `RuleError` for a rule to skip. `say(text)` logs
    "<kind> map <name>, line <n>: text"; every message goes to warn()."""
    warn = warn or (lambda _text: None)
    builder = ProgramBuilder()
    for number, line in logical_lines(data.split(b"\n")):
        line = line.split(b"\0", 1)[0].rstrip(SPACE)
        if not line:
            continue
        if line[:1] in SPACE_BYTES:
            more = "..." if len(line) > 30 else ""
            warn(f'{name}: logical line must not start with whitespace: "{text(line[:30])}{more}"')
            continue

        say = Say(f"{kind} map {name}, line {number}: ", warn)
        try:
            op = parse_line(line, number, builder.nesting, say)
        except RuleError as exc:
            say(str(exc))
            continue
        if op is None:
            continue
        if op is ENDIF:
            builder.close_if()
        elif isinstance(op, IfRule):
            builder.open_if(number, op.test)
        else:
            builder.add(op)
    program, unclosed = builder.finish()
    for number in unclosed:
        warn(f"{kind} map {name}, line {number}: IF has no matching ENDIF")
    return program


SPACE_BYTES = frozenset(bytes([c]) for c in SPACE)


class Say:
    """Logs a message about one line: `say(text)` with the map and line in
    front, `say.plain(text)` as is (mac_parse's own warnings)."""

    __slots__ = ("prefix", "plain")

    def __init__(self, prefix: str, warn):
        self.prefix, self.plain = prefix, warn

    def __call__(self, message: str) -> None:
        self.plain(self.prefix + message)


def skip_space(line: bytes, i: int = 0) -> int:
    n = len(line)
    while i < n and line[i] in SPACE:
        i += 1
    return i


def negations(line: bytes, i: int = 0) -> tuple[bool, int]:
    """Postfix's loop over leading `!` and blanks: (match, index after)."""
    match = True
    n = len(line)
    while i < n and (line[i] == 0x21 or line[i] in SPACE):
        if line[i] == 0x21:
            match = not match
        i += 1
    return match, i


# ---------------------------------------------------------------------------
# Result templates: $n ${n} $(n) $$ (mac_parse plus the $number pre-scan)
# ---------------------------------------------------------------------------

_NAME = frozenset(ALNUM | {0x5F})


@dataclass
class Template:
    parts: list      # bytes literals and int group numbers
    max_sub: int     # largest $number, 0 for a constant result
    literal: bytes   # the constant result when max_sub == 0 ($$ already $)


def _c_atoi_size_t(digits: bytes) -> int:
    """`size_t n = atoi(digits)` on a 64-bit Linux host."""
    value = min(int(digits), 2 ** 63 - 1)
    as_int = (value + 2 ** 31) % 2 ** 32 - 2 ** 31
    return as_int % 2 ** 64


def c_int(value: int) -> int:
    """`(int) value` for a size_t value."""
    return (value + 2 ** 31) % 2 ** 32 - 2 ** 31


def parse_template(value: bytes, range_word: str, say: Say) -> Template:
    """Check a result text as Postfix does before accepting a rule.

    mac_parse() splits it into literal text (`$$` is a dollar) and `$name`,
    `${name}` or `$(name)` references; the pre-scan wants every name to be
    all digits and at least 1. Problems are reported as Postfix reports
    them (`say` prefixes the map and line, `say.plain` does not), then
    RuleError("bad replacement syntax: skipping this rule") is raised.
    `range_word` is "out-of-range" (regexp) or "out of range" (pcre)."""
    parts: list = []
    literal = bytearray()
    max_sub = 0
    error = False
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c != 0x24:
            literal.append(c)
            i += 1
            continue
        if i + 1 < n and value[i + 1] == 0x24:
            literal.append(0x24)
            i += 2
            continue
        if literal:
            parts.append(bytes(literal))
            literal = bytearray()
        i += 1
        if i < n and value[i] in b"{(":
            open_c = value[i]
            close_c = 0x7D if open_c == 0x7B else 0x29
            i += 1
            level, j = 1, i
            while level > 0:
                if j >= n:
                    break
                if value[j] == open_c:
                    level += 1
                if value[j] == close_c:
                    level -= 1
                j += 1
            if level > 0:
                say.plain(f'truncated macro reference: "{text(value)}"')
                error = True
                break
            name, i = value[i:j - 1], j
        else:
            j = i
            while j < n and value[j] in _NAME:
                j += 1
            name, i = value[i:j], j
        if not name:
            say.plain(f'empty macro name: "{text(value)}"')
            error = True
            break
        if not name.isdigit() or not name.isascii():
            say(f'non-numeric replacement index "{text(name)}"')
            error = True
            continue
        number = _c_atoi_size_t(name)
        if number < 1:
            say(f'{range_word} replacement index "{text(name)}"')
            error = True
            continue
        parts.append(number)
        max_sub = max(max_sub, number)
    if error:
        raise RuleError("bad replacement syntax: skipping this rule")
    if literal:
        parts.append(bytes(literal))
    constant = b"".join(p for p in parts if isinstance(p, bytes)) if not max_sub else b""
    return Template(parts, max_sub, constant)


# ---------------------------------------------------------------------------
# The Table
# ---------------------------------------------------------------------------

class PatternFileTable(Table):
    """A read-only table compiled from a rule file at open time. Subclasses
    set `compile_rules(data, name, flags, warn) -> Program`."""

    impl_flags = F.PATTERN
    compile_rules: Callable = None  # type: ignore[assignment]

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        from master import maillog
        try:
            self.remember_file(name)
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise TableOpenError(f"open {name}: {exc.strerror}") from None
        self.program = type(self).compile_rules(data, name, flags, maillog.warning)

    def lookup(self, key: bytes) -> bytes | None:
        return self.program.lookup(self.fold(key))


def rule_file_warnings(type_name: str, path: str, flags: int = 0) -> list[str]:
    """Every warning opening `type_name:path` would log (skipped rules,
    unclosed IFs, ...), for `check` before a reload makes the file live.
    Raises OSError when the file cannot be read."""
    from proxymap.tables import table_class
    cls = table_class(type_name)
    with open(path, "rb") as f:
        data = f.read()
    warnings: list[str] = []
    cls.compile_rules(data, path, flags, warnings.append)
    return warnings
