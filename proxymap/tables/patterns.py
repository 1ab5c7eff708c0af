"""The one rule-file engine of the pattern tables cidr:, regexp: and pcre:.

Postfix's dict_cidr, dict_regexp and dict_pcre each read a rule file once at
open time with readllines(), hand every logical line to a per-type parser,
keep nestable `IF` ... `ENDIF` blocks on a stack, log a bad rule with file
and line and go on with the rest, and answer a lookup with the result of the
first rule that matches. This module is that common part, in one place:

* `compile_rules`: the line loop, with the per-line parser supplied by the
  table type (`parse_line(line, number, nesting, say)`);
* `Program` / `ProgramBuilder`: the compiled rule list with IF/ENDIF jumps,
  and `LiteralIndex`, the same list looked up through its rules'
  necessary literals (literals.py);
* `keyword`: Postfix's test for `IF` / `ENDIF` at the start of a line;
* `parse_template`: the `$n ${n} $(n) $$` result text, checked the way
  Postfix's mac_parse() and its pre-scan callbacks check it, with their
  warnings;
* `parse_regex_line`: the rule line of regexp: and pcre: (Postfix's two
  parsers are the same but for what a `RegexDialect` supplies: pattern
  flags, the engine, `/re1/!/re2/`, a word in one warning);
* `PatternFileTable`: the Table subclass that loads a rule file.

The regular expressions themselves are compiled and run by the engines
Postfix uses (regexp.py: the C library's POSIX regex; pcre.py: PCRE2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from proxymap import dictflags as F
from proxymap.tables.base import Table, TableOpenError, require_read_only
from proxymap.util.logical_lines import logical_lines

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
    result None and `skip` = index of the first rule after its ENDIF.

    `literal` (with `caseless`) is text every match contains: a key
    without it is decided at once, as the engine would decide it (the rule
    applies only when `negated`), without calling `test`."""
    line: int
    test: Callable[[bytes], object]
    result: Callable[[bytes], bytes] | None = None
    skip: int = 0
    literal: bytes | None = None
    caseless: bool = False
    negated: bool = False


@dataclass
class Program:
    rules: list[Rule] = field(default_factory=list)

    def lookup(self, key: bytes) -> bytes | None:
        rules = self.rules
        i, n = 0, len(rules)
        folded = None
        while i < n:
            rule = rules[i]
            literal = rule.literal
            if literal is None:
                applies = rule.test(key)
            else:
                if rule.caseless:
                    if folded is None:
                        folded = key.lower()
                    present = literal in folded
                else:
                    present = literal in key
                applies = rule.test(key) if present else rule.negated
            if rule.result is None:  # IF
                i = i + 1 if applies else rule.skip
            elif applies:
                return rule.result(key)
            else:
                i += 1
        return None


class LiteralIndex(Program):
    """A rule list looked up through its rules' necessary literals.

    When most rules carry a literal, the literals present in a key are
    found by slicing the key at every position for each literal length in
    use (a few dict probes for a short key) instead of testing every rule.
    The rules then evaluated, in their order, are the ones whose literal
    is in the key plus every rule that must always be asked (no literal,
    negated, IF); IF blocks keep their jumps. A rule left out has a
    literal the key lacks: the engine would say "no" to it too. Long keys
    against many literal lengths go the rule-by-rule way."""

    #: fewer rules with a literal than this: the plain scan is as quick
    MIN_RULES = 16

    @classmethod
    def of(cls, program: Program) -> Program:
        rules = program.rules
        indexed = [i for i, r in enumerate(rules)
                   if r.literal is not None and not r.negated and r.result is not None]
        if len(indexed) < cls.MIN_RULES:
            return program
        lengths = sorted({len(rules[i].literal) for i in indexed})
        table = cls(rules)
        table.always = [i for i, r in enumerate(rules)
                        if not (r.literal is not None and not r.negated and r.result is not None)]
        table.lengths = lengths
        table.caseless, table.exact = {}, {}
        for i in indexed:
            rule = rules[i]
            (table.caseless if rule.caseless else table.exact).setdefault(rule.literal, []).append(i)
        table.width = len(indexed) // len(lengths)
        return table

    def lookup(self, key: bytes) -> bytes | None:
        m = len(key)
        if m > self.width:
            return Program.lookup(self, key)
        folded = key.lower()
        found: list[int] = []
        caseless, exact = self.caseless, self.exact
        for length in self.lengths:
            for pos in range(m - length + 1):
                if caseless:
                    hit = caseless.get(folded[pos:pos + length])
                    if hit:
                        found += hit
                if exact:
                    hit = exact.get(key[pos:pos + length])
                    if hit:
                        found += hit
        if found:
            order = sorted(set(found).union(self.always))
        else:
            order = self.always
        rules = self.rules
        allowed = 0
        for index in order:
            if index < allowed:
                continue
            rule = rules[index]
            literal = rule.literal
            if literal is None:
                applies = rule.test(key)
            elif literal in (folded if rule.caseless else key):
                applies = rule.test(key)
            else:
                applies = rule.negated
            if rule.result is None:
                if not applies:
                    allowed = rule.skip
            elif applies:
                return rule.result(key)
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

    def open_if(self, rule: Rule) -> None:
        """Add an IF rule (its result is None)."""
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


def compile_rules(data: bytes, kind: str, name: str, parse_line, warn) -> Program:
    """Compile a rule file the way Postfix's dict_<kind>_open() does.

    `parse_line(line, number, nesting, say)` gets each logical line (C
    string semantics: up to a NUL byte) and returns a `Rule` (an IF when
    its result is None), `ENDIF`, or None for a line it has already
    reported; it raises
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
        elif op.result is None:
            builder.open_if(op)
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
# Rule lines of regexp: and pcre: (dict_regexp_parseline / dict_pcre_parse_rule)
# ---------------------------------------------------------------------------

@dataclass
class PatternSpec:
    """`[!]<d>regex<d>flags` before compiling: the regex (backslashes kept),
    the engine's option bits and whether the pattern is negated."""
    regex: bytes
    options: int
    match: bool


class RegexDialect:
    """What differs between the regexp: and pcre: rule parsers of Postfix.
    `get_pattern(line, i, say)` returns (PatternSpec, index after);
    `compile(spec, max_sub, say)` returns (compiled, shortcut) where
    `compiled.find(key)` runs the engine (negation applied),
    `compiled.groups` is the pattern's group count,
    `compiled.group(key, n)` the text of `$n` after a true find, and
    `shortcut` is None or (literal, caseless) from literals.py."""

    kind = ""
    range_word = ""            # mac_parse pre-scan wording for $0
    second_pattern = False     # /re1/!/re2/ (regexp only)

    def get_pattern(self, line: bytes, i: int, say) -> tuple[PatternSpec, int]:
        raise NotImplementedError

    def compile(self, spec: PatternSpec, max_sub: int, say):
        raise NotImplementedError


def delimited(line: bytes, i: int, verb: str) -> tuple[bool, bytes, int]:
    """The shared part of dict_regexp_get_pat() and dict_pcre_get_pattern():
    negations, any delimiter (a backslash keeps the next byte and stays in
    the pattern). Returns (match, regex, index after the closing delimiter)."""
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
        raise RuleError(f'no closing regexp delimiter "{chr(delim)}": {verb} this rule')
    return match, line[start:j], j + 1


def parse_regex_line(dialect: RegexDialect, line: bytes, number: int, nesting: int,
                     say, flags: int):
    """A regexp:/pcre: line, checked in Postfix's order: patterns and flags,
    result text, `$n` pre-scan, negation and NO_REGSUB, compilation, group
    count; then IF, ENDIF, anything else."""
    if line[0] not in ALNUM:
        first, i = dialect.get_pattern(line, 0, say)
        second = None
        if dialect.second_pattern and i < len(line) and line[i] == 0x21:
            second, i = dialect.get_pattern(line, i, say)
        value = line[skip_space(line, i):]
        if not value:
            say("no replacement text: using empty string")
        template = parse_template(value, dialect.range_word, say)
        if template.max_sub and not first.match:
            raise RuleError("$number found in negative match replacement text: skipping this rule")
        if template.max_sub and flags & F.NO_REGSUB:
            raise RuleError("regular expression substitution is not allowed: skipping this rule")
        compiled, shortcut = dialect.compile(first, template.max_sub, say)
        if template.max_sub > compiled.groups:
            raise RuleError(f'out of range replacement index "{c_int(template.max_sub)}": '
                            "skipping this rule")
        result = template_result(template, compiled.group)
        if second is None:
            return shortcut_rule(number, compiled, shortcut, result)
        one = guarded(compiled, shortcut)
        two = guarded(*dialect.compile(second, 0, say))

        def test(key: bytes) -> bool:
            return one(key) and two(key)
        return Rule(number, test, result)
    rest = keyword(line, b"IF")
    if rest is not None:
        spec, i = dialect.get_pattern(line, skip_space(line, 2), say)
        i = skip_space(line, i)
        if i < len(line):
            say(f'ignoring extra text after IF statement: "{text(line[i:])}"')
            say("do not prepend whitespace to statements between IF and ENDIF")
        return shortcut_rule(number, *dialect.compile(spec, 0, say), None)
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


def shortcut_rule(number: int, compiled, shortcut, result) -> Rule:
    """A rule of one pattern, with its necessary literal when it has one."""
    rule = Rule(number, compiled.find, result, negated=not compiled.match)
    if shortcut is not None:
        rule.literal, rule.caseless = shortcut
        if rule.caseless:
            rule.literal = rule.literal.lower()
    return rule


def guarded(compiled, shortcut):
    """compiled.find behind its literal (for rules of two patterns)."""
    find = compiled.find
    if shortcut is None:
        return find
    literal, caseless = shortcut
    miss = not compiled.match
    if caseless:
        literal = literal.lower()
        return lambda key: find(key) if literal in key.lower() else miss
    return lambda key: find(key) if literal in key else miss


def template_result(template: Template, group) -> Callable[[bytes], bytes]:
    """The function that builds a rule's value after its test was true;
    `group(key, n)` gives the text of `$n` (empty when unmatched)."""
    if not template.max_sub:
        constant = template.literal
        return lambda _key: constant
    parts = [(p, isinstance(p, int)) for p in template.parts]

    def result(key: bytes) -> bytes:
        return b"".join(group(key, p) if is_group else p for p, is_group in parts)
    return result


def compile_regex_rules(dialect: RegexDialect, data: bytes, name: str, flags: int,
                        warn) -> Program:
    """Compile a regexp:/pcre: rule file with the dialect's parser."""
    program = compile_rules(data, dialect.kind, name,
                            lambda line, number, nesting, say:
                            parse_regex_line(dialect, line, number, nesting, say, flags), warn)
    return LiteralIndex.of(program)


# ---------------------------------------------------------------------------
# The Table
# ---------------------------------------------------------------------------

class PatternFileTable(Table):
    """A read-only table compiled from a rule file at open time. Subclasses
    set `compile_rules(data, name, flags, warn) -> Program`."""

    answers_cacheable = True

    impl_flags = F.PATTERN
    compile_rules: Callable = None  # type: ignore[assignment]

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        require_read_only(f"{type_name}:{name}", writable)
        from proxymap.conventions import maillog
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
