"""Shared machinery of the pattern tables cidr:, regexp: and pcre:.

Postfix's dict_cidr, dict_regexp and dict_pcre read a rule file once at open
time and answer a lookup with the result of the first rule that matches,
with nestable `IF pattern` ... `ENDIF` blocks around groups of rules. Bad
rules are logged with file:line and skipped; the table still opens. This
module holds what the three have in common:

* `Program` / `ProgramBuilder`: the compiled rule list with IF/ENDIF jumps;
* `split_pattern`: the `[!]/re/flags` grammar with any delimiter;
* `parse_template`: the `$n ${n} $(n) $$` result substitution;
* `posix_to_python` and `pcre_to_python`: translators from POSIX (glibc
  regcomp) and PCRE2 syntax to Python `re` (bytes mode), refusing with a
  `RuleError` what has no faithful translation;
* `PatternFileTable`: the Table subclass that loads a rule file.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

from proxymap import dictflags as F
from proxymap.tables.base import Table, TableOpenError
from proxymap.tables.source import logical_lines


class RuleError(ValueError):
    """A rule (or its regular expression) is unusable; the rule is skipped."""


# ---------------------------------------------------------------------------
# Compiled rule lists with IF/ENDIF
# ---------------------------------------------------------------------------

@dataclass
class Rule:
    """One rule. `test(key)` returns a true-ish match object or None.
    `result(match)` builds the value; an IF rule has result None and
    `skip` = index of the first rule after its ENDIF."""
    line: int
    test: Callable[[bytes], object]
    result: Callable[[object], bytes] | None = None
    skip: int = 0


@dataclass
class Program:
    rules: list[Rule] = field(default_factory=list)

    def lookup(self, key: bytes) -> bytes | None:
        rules = self.rules
        i = 0
        while i < len(rules):
            rule = rules[i]
            match = rule.test(key)
            if rule.result is None:  # IF
                i = i + 1 if match else rule.skip
            elif match:
                return rule.result(match)
            else:
                i += 1
        return None


class ProgramBuilder:
    """Collects rules; IF blocks still open at the end are closed there."""

    def __init__(self):
        self.program = Program()
        self._open: list[Rule] = []

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
        """Return the program and the line numbers of unclosed IFs."""
        unclosed = []
        while self._open:
            unclosed.append(self._open[-1].line)
            self.close_if()
        return self.program, unclosed


_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_SPACE = b" \t\r\n\v\f"


def split_keyword(line: bytes) -> tuple[str, bytes] | None:
    """Recognise `IF`/`ENDIF` (any case) not followed by a letter or digit;
    return (keyword, rest) or None."""
    for word in ("ENDIF", "IF"):
        n = len(word)
        if line[:n].upper() == word.encode() and (len(line) == n or line[n] not in _ALNUM):
            return word, line[n:]
    return None


# ---------------------------------------------------------------------------
# The [!]/regex/flags grammar shared by regexp: and pcre:
# ---------------------------------------------------------------------------

@dataclass
class PatternSpec:
    negate: bool
    regex: bytes
    flags: bytes


def split_pattern(text: bytes, flags_stop_at_bang: bool) -> tuple[PatternSpec, bytes]:
    """Parse `[!...]<d>regex<d>flags` at the start of `text`: `!` (mixed with
    blanks) negates, any byte is the delimiter, `\\` escapes the next byte
    (the backslash stays in the regex). Flags run to the next blank (and to
    a `!` for regexp:). Returns the spec and the unparsed rest."""
    i, n, negate = 0, len(text), False
    while i < n and (text[i] == 0x21 or text[i] in _SPACE):
        if text[i] == 0x21:
            negate = not negate
        i += 1
    if i >= n:
        raise RuleError("no regular expression")
    delim = text[i]
    start = j = i + 1
    while j < n and text[j] != delim:
        j += 2 if text[j] == 0x5C else 1
    if j >= n:
        raise RuleError(f'closing delimiter "{chr(delim)}" not found')
    regex = text[start:j]
    k = j + 1
    while k < n and text[k] not in _SPACE and not (flags_stop_at_bang and text[k] == 0x21):
        k += 1
    return PatternSpec(negate, regex, text[j + 1:k]), text[k:]


# ---------------------------------------------------------------------------
# Result templates: $n ${n} $(n) $$
# ---------------------------------------------------------------------------

_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass
class Template:
    parts: list  # bytes literals and int group numbers
    max_group: int

    def expand(self, match) -> bytes:
        if self.max_group == 0:
            return self.parts[0] if self.parts else b""
        out = []
        for part in self.parts:
            if isinstance(part, int):
                out.append(match.group(part) or b"")
            else:
                out.append(part)
        return b"".join(out)


def parse_template(text: bytes) -> Template:
    """Split a result into literals and group references. `$$` is a dollar;
    a reference name must be all digits and at least 1; a `$` not followed
    by a name, `{` or `(` is an error, as is an unclosed brace."""
    parts: list = []
    literal = bytearray()
    max_group = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != 0x24:
            literal.append(c)
            i += 1
            continue
        if i + 1 < n and text[i + 1] == 0x24:
            literal.append(0x24)
            i += 2
            continue
        if i + 1 < n and text[i + 1] in b"{(":
            close = b"}" if text[i + 1] == 0x7B else b")"
            end = text.find(close, i + 2)
            if end < 0:
                raise RuleError(f'unterminated reference in "{text.decode("latin-1")}"')
            name, i = text[i + 2:end], end + 1
        else:
            j = i + 1
            while j < n and text[j] in _NAME:
                j += 1
            name, i = text[i + 1:j], j
        if not name:
            raise RuleError(f'"$" without a group number in "{text.decode("latin-1")}"')
        if not name.isdigit():
            raise RuleError(f'replacement "{name.decode("latin-1")}" is not a group number'
                            f' (write ${{1}}abc to follow a number with text)')
        number = int(name)
        if number < 1:
            raise RuleError(f'replacement index "{number}" is out of range (groups count from 1)')
        if literal:
            parts.append(bytes(literal))
            literal = bytearray()
        parts.append(number)
        max_group = max(max_group, number)
    if literal or not parts:
        parts.append(bytes(literal))
    return Template(parts, max_group)


# ---------------------------------------------------------------------------
# Byte sets and character classes
# ---------------------------------------------------------------------------

def _rng(a: str, b: str) -> set[int]:
    return set(range(ord(a), ord(b) + 1))


_PUNCT = set(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
POSIX_CLASSES: dict[bytes, frozenset[int]] = {
    b"alpha": frozenset(_rng("a", "z") | _rng("A", "Z")),
    b"digit": frozenset(_rng("0", "9")),
    b"alnum": frozenset(_rng("a", "z") | _rng("A", "Z") | _rng("0", "9")),
    b"upper": frozenset(_rng("A", "Z")),
    b"lower": frozenset(_rng("a", "z")),
    b"space": frozenset(b" \t\n\r\f\v"),
    b"blank": frozenset(b" \t"),
    b"punct": frozenset(_PUNCT),
    b"print": frozenset(range(0x20, 0x7F)),
    b"graph": frozenset(range(0x21, 0x7F)),
    b"cntrl": frozenset(set(range(0x20)) | {0x7F}),
    b"xdigit": frozenset(_rng("0", "9") | _rng("a", "f") | _rng("A", "F")),
}
# PCRE only: [:word:] (\w) and [:ascii:]
PCRE_EXTRA_CLASSES = {
    b"word": frozenset(POSIX_CLASSES[b"alnum"] | {0x5F}),
    b"ascii": frozenset(range(0x80)),
}
_ALL = frozenset(range(256))
_H_SPACE = frozenset(b"\t \xa0")
_V_SPACE = frozenset(b"\n\x0b\x0c\r\x85")


def byte_class(members, negate: bool = False, extra: bytes = b"") -> bytes:
    """Emit a Python class for a byte set as `\\xHH` ranges (no character is
    ever special inside it), plus pre-built escapes such as `\\d`."""
    values = sorted(set(members))
    out = bytearray(b"[^" if negate else b"[")
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out += b"\\x%02x" % values[i]
        if j > i:
            out += b"-\\x%02x" % values[j]
        i = j + 1
    out += extra
    if len(out) == (2 if negate else 1):
        # an empty set: matches nothing (or anything when negated)
        return b"[\\x00-\\xff]" if negate else b"(?!)"
    return bytes(out) + b"]"


def _literal(c: int) -> bytes:
    return re.escape(bytes([c]))


# ---------------------------------------------------------------------------
# POSIX (glibc regcomp) -> Python
# ---------------------------------------------------------------------------

RE_DUP_MAX = 0x7FFF


class _Seq:
    """The pieces of one alternative: [text, kind] with kind 'atom'
    (can take a quantifier), 'rep' (already quantified) or 'anchor'."""

    def __init__(self):
        self.items: list[list] = []

    def add(self, text: bytes, kind: str = "atom"):
        self.items.append([text, kind])

    def quantify(self, q: bytes) -> bool:
        if not self.items or self.items[-1][1] == "anchor":
            return False
        last = self.items[-1]
        if last[1] == "rep":
            last[0] = b"(?:" + last[0] + b")"
        last[0] += q
        last[1] = "rep"
        return True

    def text(self) -> bytes:
        return b"".join(item[0] for item in self.items)


def _parse_interval(p: bytes, i: int, basic: bool) -> tuple[bytes, int]:
    """Parse the inside of a POSIX interval starting at p[i] (after `{` or
    `\\{`); return the Python quantifier and the index after the close."""
    m = re.compile(rb"(\d*)(,(\d*))?" + (rb"\\\}" if basic else rb"\}")).match(p, i)
    if not m or (not m.group(1) and not m.group(2)):
        raise RuleError("invalid interval: a {min,max} count was expected")
    low = int(m.group(1) or b"0")
    high = None if m.group(2) and not m.group(3) else int(m.group(3) or m.group(1))
    if low > RE_DUP_MAX or (high is not None and (high > RE_DUP_MAX or high < low)):
        raise RuleError("invalid interval: bad repetition count")
    if high is None:
        q = b"{%d,}" % low
    elif high == low:
        q = b"{%d}" % low
    else:
        q = b"{%d,%d}" % (low, high)
    return q, m.end()


def _posix_bracket(p: bytes, i: int) -> tuple[set[int], bool, int]:
    """Parse a POSIX bracket expression whose `[` is at p[i-1]. Backslash
    is an ordinary character here. Returns (set, negated, index after)."""
    n = len(p)
    negate = i < n and p[i] == 0x5E
    if negate:
        i += 1
    members: set[int] = set()
    first = True
    while True:
        if i >= n:
            raise RuleError("unmatched [ in bracket expression")
        c = p[i]
        if c == 0x5D and not first:
            return members, negate, i + 1
        first = False
        if c == 0x5B and i + 1 < n and p[i + 1] in b":=.":
            kind = p[i + 1]
            end = p.find(bytes([kind, 0x5D]), i + 2)
            if end < 0:
                raise RuleError("unterminated [: :], [= =] or [. .] in bracket expression")
            name = p[i + 2:end]
            i = end + 2
            if kind == 0x3A:
                if name not in POSIX_CLASSES:
                    raise RuleError(f'unknown character class "[:{name.decode("latin-1")}:]"')
                members |= POSIX_CLASSES[name]
                continue
            if len(name) != 1:
                raise RuleError("multi-character collating elements are not supported")
            c = name[0]
            if kind == 0x3D:
                members.add(c)
                continue
        else:
            i += 1
        # c is a single character; a following '-x' makes a range
        if i + 1 < n and p[i] == 0x2D and p[i + 1] != 0x5D:
            hi = p[i + 1]
            i += 2
            if hi == 0x5B and i < n and p[i] == 0x2E:  # [.x.] as range end
                end = p.find(b".]", i + 1)
                if end != i + 2:
                    raise RuleError("bad range end in bracket expression")
                hi, i = p[i + 1], end + 2
            if hi < c:
                raise RuleError("invalid range end in bracket expression")
            members |= set(range(c, hi + 1))
        else:
            members.add(c)
    return members, negate, i  # pragma: no cover


_GNU_ESCAPES = {
    ord("w"): b"\\w", ord("W"): b"\\W", ord("s"): b"\\s", ord("S"): b"\\S",
}
_GNU_ANCHORS = {
    ord("b"): b"\\b", ord("B"): b"\\B", ord("<"): b"\\b(?=\\w)", ord(">"): b"\\b(?<=\\w)",
    ord("`"): b"\\A", ord("'"): b"\\Z",
}


def posix_to_python(pattern: bytes, extended: bool = True, newline: bool = False) -> bytes:
    """Translate a glibc regcomp() pattern (ERE, or BRE when not `extended`)
    into an equivalent Python bytes pattern, to be compiled with DOTALL
    unless `newline` (REG_NEWLINE) and with MULTILINE when `newline`.
    Raises RuleError for what glibc would reject or we cannot express."""
    p, n, i = pattern, len(pattern), 0
    basic = not extended
    stack: list[tuple[list[bytes], _Seq, int]] = []
    branches: list[bytes] = []
    seq = _Seq()
    groups_opened = 0
    groups_closed: set[int] = set()
    dot = b"[^\\n]" if newline else b"."
    dollar = b"$" if newline else b"\\Z"

    def quantify(q: bytes) -> bool:
        if basic and seq.items and seq.items[-1][1] == "rep":
            raise RuleError("a basic RE cannot repeat a repetition")
        return seq.quantify(q)

    def at_branch_start() -> bool:
        return not seq.items or (len(seq.items) == 1 and seq.items[0][0] == b"^" and basic)

    while i < n:
        c = p[i]
        # --- operators spelled with a backslash in BRE, plus escapes
        if c == 0x5C:
            if i + 1 >= n:
                raise RuleError("trailing backslash")
            e = p[i + 1]
            i += 2
            if basic and e == 0x28:
                c = 0x100  # open group
            elif basic and e == 0x29:
                c = 0x101  # close group
            elif basic and e == 0x7C:
                c = 0x102  # alternation
            elif basic and e == 0x7B:
                if at_branch_start():
                    raise RuleError("interval with nothing to repeat")
                q, i = _parse_interval(p, i, True)
                quantify(q)
                continue
            elif basic and e in b"+?":
                if not seq.quantify(bytes([e])):  # GNU \+ \? may follow a repetition
                    seq.add(_literal(e))
                continue
            elif 0x31 <= e <= 0x39:
                if e - 0x30 not in groups_closed:
                    raise RuleError("invalid back reference")
                seq.add(b"(?:\\%c)" % e)
                continue
            elif e in _GNU_ESCAPES:
                seq.add(_GNU_ESCAPES[e])
                continue
            elif e in _GNU_ANCHORS:
                seq.add(_GNU_ANCHORS[e], "anchor")
                continue
            elif e in _ALNUM:
                raise RuleError(f'"\\{chr(e)}" is not a POSIX regular expression escape')
            else:
                seq.add(_literal(e))
                continue
        else:
            i += 1
            if extended and c == 0x28:
                c = 0x100
            elif extended and c == 0x29 and stack:
                c = 0x101
            elif extended and c == 0x7C:
                c = 0x102
        # --- structure
        if c == 0x100:
            groups_opened += 1
            stack.append((branches, seq, groups_opened))
            branches, seq = [], _Seq()
            continue
        if c == 0x101:
            if not stack:
                raise RuleError("unmatched ) or \\)")
            inner = b"(" + b"|".join(branches + [seq.text()]) + b")"
            branches, seq, number = stack.pop()
            groups_closed.add(number)
            seq.add(inner)
            continue
        if c == 0x102:
            branches.append(seq.text())
            seq = _Seq()
            continue
        # --- ordinary characters and operators
        if c == 0x5B:
            members, negate, i = _posix_bracket(p, i)
            if negate and newline:
                members.add(0x0A)
            seq.add(byte_class(members, negate))
        elif c == 0x2E:
            seq.add(dot)
        elif c == 0x5E:
            if extended or not seq.items and not branches or not seq.items:
                seq.add(b"^", "anchor")
            else:
                seq.add(_literal(c))
        elif c == 0x24:
            if extended:
                seq.add(dollar, "anchor")
            else:
                rest = p[i:]
                if not rest or rest.startswith(b"\\)") or rest.startswith(b"\\|"):
                    seq.add(dollar, "anchor")
                else:
                    seq.add(_literal(c))
        elif c == 0x2A or (extended and c in b"+?"):
            if at_branch_start() or not quantify(bytes([c])):
                if extended:
                    raise RuleError(f'"{chr(c)}" has nothing to repeat')
                seq.add(_literal(c))
        elif extended and c == 0x7B:
            if at_branch_start() or seq.items[-1][1] == "anchor":
                raise RuleError('"{" has nothing to repeat')
            q, i = _parse_interval(p, i, False)
            seq.quantify(q)
        else:
            seq.add(_literal(c))
    if stack:
        raise RuleError("unmatched ( or \\(")
    return b"|".join(branches + [seq.text()])


def compile_posix(pattern: bytes, options: bytes) -> re.Pattern:
    """Compile a regexp: pattern with Postfix's flag letters (each toggles
    from the default extended + ignore-case): i case, x extended, m newline."""
    extended, icase, newline = True, True, False
    for f in options:
        if f == 0x69:
            icase = not icase
        elif f == 0x78:
            extended = not extended
        elif f == 0x6D:
            newline = not newline
        else:
            raise RuleError(f'unknown regexp flag "{chr(f)}"')
    text = posix_to_python(pattern, extended, newline)
    flags = (re.IGNORECASE if icase else 0) | (re.MULTILINE if newline else re.DOTALL)
    return _compile(text, flags)


def _compile(text: bytes, flags: int) -> re.Pattern:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return re.compile(text, flags)
    except (re.error, FutureWarning, DeprecationWarning, RecursionError,
            OverflowError) as exc:
        raise RuleError(f"cannot compile the translated expression: {exc}") from None


# ---------------------------------------------------------------------------
# PCRE2 -> Python
# ---------------------------------------------------------------------------

_PCRE_SIMPLE_ESCAPES = {
    ord("z"): (b"\\Z", "anchor"),
    ord("Z"): (b"(?=\\n?\\Z)", "anchor"),
    ord("A"): (b"\\A", "anchor"),
    ord("b"): (b"\\b", "anchor"),
    ord("B"): (b"\\B", "anchor"),
    ord("d"): (b"\\d", "atom"), ord("D"): (b"\\D", "atom"),
    ord("w"): (b"\\w", "atom"), ord("W"): (b"\\W", "atom"),
    ord("s"): (b"\\s", "atom"), ord("S"): (b"\\S", "atom"),
    ord("h"): (byte_class(_H_SPACE), "atom"),
    ord("H"): (byte_class(_H_SPACE, True), "atom"),
    ord("v"): (byte_class(_V_SPACE), "atom"),
    ord("V"): (byte_class(_V_SPACE, True), "atom"),
    ord("R"): (b"(?>\\r\\n|" + byte_class(_V_SPACE) + b")", "atom"),
    ord("N"): (b"[^\\n]", "atom"),
}
_PCRE_CHAR_ESCAPES = {ord("n"): 0x0A, ord("t"): 0x09, ord("r"): 0x0D, ord("f"): 0x0C,
                      ord("e"): 0x1B, ord("a"): 0x07}
_PCRE_REFUSED = {
    ord("K"): "\\K (reset of the match start)",
    ord("G"): "\\G (first matching position) other than at the start",
    ord("X"): "\\X (extended grapheme cluster)",
    ord("C"): "\\C (single code unit)",
    ord("p"): "\\p{...} (Unicode property)",
    ord("P"): "\\P{...} (Unicode property)",
}


def _pcre_char_escape(p: bytes, i: int) -> tuple[int, int] | None:
    """Decode a PCRE escape that stands for one byte, p[i] being the byte
    after the backslash. Return (value, index after) or None."""
    e = p[i]
    if e in _PCRE_CHAR_ESCAPES:
        return _PCRE_CHAR_ESCAPES[e], i + 1
    if e == 0x78:  # \x
        if i + 1 < len(p) and p[i + 1] == 0x7B:
            end = p.find(b"}", i + 2)
            digits = p[i + 2:end] if end > 0 else b""
            if end < 0 or not re.fullmatch(rb"[0-9a-fA-F]+", digits):
                raise RuleError("malformed \\x{...} escape")
            value = int(digits, 16)
            if value > 0xFF:
                raise RuleError("\\x{...} above \\x{ff} needs UTF mode, which Postfix does not use")
            return value, end + 1
        m = re.compile(rb"[0-9a-fA-F]{0,2}").match(p, i + 1)
        return int(m.group() or b"0", 16), m.end()
    if e == 0x6F and i + 1 < len(p) and p[i + 1] == 0x7B:  # \o{...}
        end = p.find(b"}", i + 2)
        digits = p[i + 2:end] if end > 0 else b""
        if end < 0 or not re.fullmatch(rb"[0-7]+", digits) or int(digits, 8) > 0xFF:
            raise RuleError("malformed or too large \\o{...} escape")
        return int(digits, 8), end + 1
    if e == 0x63:  # \cX
        if i + 1 >= len(p):
            raise RuleError("\\c at the end of the pattern")
        upper = p[i + 1] - 0x20 if 0x61 <= p[i + 1] <= 0x7A else p[i + 1]
        return upper ^ 0x40, i + 2
    if e == 0x30:  # \0 plus up to two octal digits
        m = re.compile(rb"[0-7]{0,2}").match(p, i + 1)
        return int(m.group() or b"0", 8), m.end()
    return None


def _quoted_literal(p: bytes, i: int) -> tuple[bytes, int]:
    r"""PCRE's `\Q...\E` starting at p[i]: (the literal text, index after
    it); an unterminated \Q runs to the end of the pattern."""
    end = p.find(b"\\E", i + 2)
    if end < 0:
        return p[i + 2:], len(p)
    return p[i + 2:end], end + 2


def _pcre_class(p: bytes, i: int) -> tuple[bytes, int]:
    """Translate a PCRE class whose `[` is at p[i-1]; return (python, end)."""
    n = len(p)
    negate = i < n and p[i] == 0x5E
    if negate:
        i += 1
    members: set[int] = set()
    extra = bytearray()
    first = True
    pending: int | None = None  # a single char that may start a range
    range_open = False

    def single(value: int):
        nonlocal pending, range_open
        if range_open:
            if pending is None or value < pending:
                raise RuleError("invalid range in character class")
            members.update(range(pending, value + 1))
            pending, range_open = None, False
            return
        if pending is not None:
            members.add(pending)
        pending = value

    def multi(values=None, escape: bytes = b""):
        nonlocal pending
        if range_open:
            raise RuleError("invalid range in character class")
        if pending is not None:
            members.add(pending)
            pending = None
        if values is not None:
            members.update(values)
        extra.extend(escape)

    while True:
        if i >= n:
            raise RuleError("missing terminating ] for character class")
        c = p[i]
        if c == 0x5D and not first:
            i += 1
            break
        first = False
        if c == 0x5B and i + 1 < n and p[i + 1] in b":=.":
            kind = p[i + 1]
            end = p.find(bytes([kind, 0x5D]), i + 2)
            if end >= 0:
                if kind != 0x3A:
                    raise RuleError("POSIX collating elements are not supported by PCRE")
                name = p[i + 2:end]
                neg = name.startswith(b"^")
                name = name.lstrip(b"^")
                table = POSIX_CLASSES.get(name) or PCRE_EXTRA_CLASSES.get(name)
                if table is None:
                    raise RuleError(f'unknown POSIX class name "{name.decode("latin-1")}"')
                multi(_ALL - table if neg else table)
                i = end + 2
                continue
        if c == 0x5C:
            if i + 1 >= n:
                raise RuleError("\\ at end of pattern")
            e = p[i + 1]
            if e == 0x51:  # \Q...\E
                lit, i = _quoted_literal(p, i)
                for b in lit:
                    single(b)
                continue
            if e == 0x45:
                i += 2
                continue
            if e == 0x62:
                single(0x08)
                i += 2
                continue
            if e in b"dDwWsS":
                multi(escape=b"\\" + bytes([e]))
                i += 2
                continue
            if e in b"hHvV":
                base = _H_SPACE if e in b"hH" else _V_SPACE
                multi(base if e in b"hv" else _ALL - base)
                i += 2
                continue
            decoded = _pcre_char_escape(p, i + 1)
            if decoded is not None:
                single(decoded[0])
                i = decoded[1]
                continue
            if 0x31 <= e <= 0x37:
                m = re.compile(rb"[0-7]{1,3}").match(p, i + 1)
                single(int(m.group(), 8) & 0xFF)
                i = m.end()
                continue
            if e in _ALNUM:
                raise RuleError(f'"\\{chr(e)}" is not supported inside a character class')
            single(e)
            i += 2
            continue
        if c == 0x2D and pending is not None and not range_open and i + 1 < n and p[i + 1] != 0x5D:
            range_open = True
            i += 1
            continue
        single(c)
        i += 1
    if range_open:
        members.add(0x2D)
    if pending is not None:
        members.add(pending)
    return byte_class(members, negate, bytes(extra)), i


_QUANT = re.compile(rb"\*|\+|\?|\{(\d+)(,(\d*))?\}")


class _Frame:
    def __init__(self, opener: bytes):
        self.opener = opener
        self.scopes: list[bytes] = []  # inline-flag scopes opened in this branch
        self.out = bytearray()


def pcre_to_python(pattern: bytes, options: bytes = b"", warn=None) -> tuple[bytes, int, bool]:
    """Translate a PCRE2 pattern with Postfix's pcre: flag letters into a
    Python bytes pattern. Returns (pattern, re flags, anchored); anchored
    means the caller must use match() instead of search()."""
    flags = re.IGNORECASE | re.DOTALL
    anchored = dollar_endonly = ungreedy = False
    for f in options:
        ch = chr(f)
        if ch == "i":
            flags ^= re.IGNORECASE
        elif ch == "m":
            flags ^= re.MULTILINE
        elif ch == "s":
            flags ^= re.DOTALL
        elif ch == "x":
            flags ^= re.VERBOSE
        elif ch == "A":
            anchored = not anchored
        elif ch == "E":
            dollar_endonly = not dollar_endonly
        elif ch == "U":
            ungreedy = not ungreedy
        elif ch == "X":
            if warn:
                warn('flag "X" is obsolete and ignored')
        else:
            raise RuleError(f'unknown regexp flag "{ch}"')
    p, n, i = pattern, len(pattern), 0
    # leading global option settings such as (?i) or (?is)
    while True:
        m = re.compile(rb"\(\?([imsx]*)(?:-([imsx]*))?\)").match(p, i)
        if not m or not (m.group(1) or m.group(2)):
            break
        for letter, on in [(x, True) for x in m.group(1)] + [(x, False) for x in m.group(2) or b""]:
            bit = {0x69: re.IGNORECASE, 0x6D: re.MULTILINE, 0x73: re.DOTALL, 0x78: re.VERBOSE}[letter]
            flags = flags | bit if on else flags & ~bit
        i = m.end()
    verbose = bool(flags & re.VERBOSE)
    multiline = bool(flags & re.MULTILINE)
    stack = [_Frame(b"")]
    groups = 0
    last_kind = "none"  # kind of the last emitted item: none/atom/anchor/open

    def emit(text: bytes, kind: str = "atom"):
        nonlocal last_kind
        stack[-1].out += text
        last_kind = kind

    def close_scopes(frame: _Frame):
        frame.out += b")" * len(frame.scopes)

    start = i
    while i < n:
        c = p[i]
        if verbose and c in _SPACE:
            i += 1
            continue
        if verbose and c == 0x23:  # comment to the end (patterns are one line)
            break
        if c == 0x5C:
            if i + 1 >= n:
                raise RuleError("\\ at end of pattern")
            e = p[i + 1]
            if e == 0x51:  # \Q...\E
                lit, i = _quoted_literal(p, i)
                for b in lit:
                    emit(_literal(b))
                continue
            if e == 0x45:
                i += 2
                continue
            if e == 0x47 and i == start:
                emit(b"\\A", "anchor")
                i += 2
                continue
            if e in _PCRE_REFUSED:
                raise RuleError(f"{_PCRE_REFUSED[e]} is not supported by Python re")
            if e == 0x4E and i + 2 < n and p[i + 2] == 0x7B:
                raise RuleError("\\N{...} is not supported")
            if e in _PCRE_SIMPLE_ESCAPES:
                text, kind = _PCRE_SIMPLE_ESCAPES[e]
                emit(text, kind)
                i += 2
                continue
            if e in b"gk":
                m = re.compile(rb"g\{(-?\d+)\}|g(-?\d+)|[gk]\{([A-Za-z_]\w*)\}|k<([A-Za-z_]\w*)>"
                               rb"|k'([A-Za-z_]\w*)'").match(p, i + 1)
                if not m:
                    raise RuleError(f"unsupported \\{chr(e)} reference (subroutine calls are not supported)")
                number = m.group(1) or m.group(2)
                if number is not None:
                    ref = int(number)
                    if ref < 0:
                        ref = groups + 1 + ref
                    if ref < 1:
                        raise RuleError("relative back reference before the first group")
                    emit(b"(?:\\%d)" % ref)
                else:
                    name = m.group(3) or m.group(4) or m.group(5)
                    emit(b"(?P=" + name + b")")
                i = m.end()
                continue
            decoded = _pcre_char_escape(p, i + 1)
            if decoded is not None:
                emit(_literal(decoded[0]))
                i = decoded[1]
                continue
            if 0x31 <= e <= 0x39:
                m = re.compile(rb"\d+").match(p, i + 1)
                emit(b"(?:\\" + m.group() + b")")
                i = m.end()
                continue
            if e in _ALNUM:
                raise RuleError(f'unknown escape "\\{chr(e)}"')
            emit(_literal(e))
            i += 2
            continue
        if c == 0x5B:
            text, i = _pcre_class(p, i + 1)
            emit(text)
            continue
        if c == 0x28:
            depth = len(stack)
            i, capturing = _pcre_group_open(p, i, stack, emit)
            groups += capturing
            if len(stack) != depth or p[i - 1:i] == b")" and last_kind != "atom":
                last_kind = "open"
            continue
        if c == 0x29:
            if len(stack) == 1:
                raise RuleError("unmatched closing parenthesis")
            frame = stack.pop()
            close_scopes(frame)
            emit(frame.opener + bytes(frame.out) + b")")
            i += 1
            continue
        if c == 0x7C:
            frame = stack[-1]
            close_scopes(frame)
            frame.out += b"|" + b"".join(frame.scopes)
            last_kind = "open"
            i += 1
            continue
        if c in b"*+?{":
            m = _QUANT.match(p, i)
            if m and c == 0x7B and m.group(2) is not None and not m.group(1):
                m = None
            if m is None:  # a literal brace
                emit(_literal(c))
                i += 1
                continue
            if last_kind != "atom":
                raise RuleError(f'quantifier "{m.group().decode("latin-1")}" has nothing to repeat')
            q = m.group()
            i = m.end()
            mode = b""
            if i < n and p[i] in b"?+":
                mode = p[i:i + 1]
                i += 1
            if ungreedy and mode != b"+":
                mode = b"" if mode == b"?" else b"?"
            stack[-1].out += q + mode
            last_kind = "rep"
            continue
        if c == 0x24:
            if multiline or not dollar_endonly:
                emit(b"$", "anchor")
            else:
                emit(b"\\Z", "anchor")
            i += 1
            continue
        if c == 0x5E:
            emit(b"^", "anchor")
            i += 1
            continue
        if c == 0x2E:
            emit(b".")
            i += 1
            continue
        emit(_literal(c))
        i += 1
    if len(stack) > 1:
        raise RuleError("missing closing parenthesis")
    close_scopes(stack[0])
    return bytes(stack[0].out), flags & ~re.VERBOSE, anchored


_INLINE_FLAGS = re.compile(rb"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")


def _pcre_group_open(p: bytes, i: int, stack: list, emit) -> tuple[int, bool]:
    """Handle a `(` at p[i]: push a frame for a group, or apply an inline
    option setting; return the index after the opener and whether the
    group captures."""
    rest = p[i:i + 4]
    if rest.startswith(b"(*"):
        raise RuleError("(*VERB) and (*...) constructs are not supported by Python re")
    if not rest.startswith(b"(?"):
        frame = _Frame(b"(")
        stack.append(frame)
        return i + 1, True
    m = _INLINE_FLAGS.match(p, i)
    if m and (m.group(1) or m.group(2)) and set(m.group(1) + (m.group(2) or b"")) <= set(b"imsxnUJ"):
        letters = m.group(1) + (m.group(2) or b"")
        bad = set(letters) - set(b"ims")
        if bad:
            raise RuleError(f'inline option "{chr(min(bad))}" is not supported here')
        spec = m.group(1) + (b"-" + m.group(2) if m.group(2) else b"")
        if m.group(3) == b":":
            stack.append(_Frame(b"(?" + spec + b":"))
        else:
            frame = stack[-1]
            scope = b"(?" + spec + b":"
            frame.out += scope
            frame.scopes.append(scope)
        return m.end(), False
    two = p[i + 2:i + 3]
    if two in (b":", b"=", b"!", b">", b"|") or p.startswith(b"(?<=", i) or p.startswith(b"(?<!", i):
        if two == b"|":
            raise RuleError("(?| branch reset groups are not supported by Python re")
        opener = p[i:i + 4] if two == b"<" else p[i:i + 3]
        stack.append(_Frame(opener))
        return i + len(opener), False
    if two == b"#":
        end = p.find(b")", i)
        if end < 0:
            raise RuleError("missing ) after (?# comment")
        return end + 1, False
    m = re.compile(rb"\(\?(?:P?<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)')").match(p, i)
    if m:
        frame = _Frame(b"(?P<" + (m.group(1) or m.group(2)) + b">")
        stack.append(frame)
        return m.end(), True
    m = re.compile(rb"\(\?P=([A-Za-z_]\w*)\)").match(p, i)
    if m:
        emit(m.group())
        return m.end(), False
    m = re.compile(rb"\(\?\((?:(\d+)|<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'|([A-Za-z_]\w*))\)").match(p, i)
    if m and not (m.group(4) or b"").startswith(b"R"):
        ref = m.group(1) or m.group(2) or m.group(3) or m.group(4)
        stack.append(_Frame(b"(?(" + ref + b")"))
        return m.end(), False
    raise RuleError("recursion, subroutine calls, callouts and this (?... construct"
                    " are not supported by Python re")


class PcrePattern:
    """A compiled pcre: pattern: search() or, with the A flag, match()."""

    def __init__(self, compiled: re.Pattern, anchored: bool):
        self.compiled = compiled
        self.groups = compiled.groups
        self.find = compiled.match if anchored else compiled.search


def compile_pcre_pattern(pattern: bytes, options: bytes, warn=None) -> PcrePattern:
    text, flags, anchored = pcre_to_python(pattern, options, warn)
    return PcrePattern(_compile(text, flags), anchored)


# ---------------------------------------------------------------------------
# Rule files of regexp: and pcre:
# ---------------------------------------------------------------------------

def compile_regex_rules(data: bytes, kind: str, name: str, flags: int, warn,
                        compile_pattern) -> Program:
    """Compile a regexp:/pcre: rule file. `kind` is "regexp" or "pcre";
    `compile_pattern(spec, warn)` returns an object with `.find(key)` and
    `.groups`. Every problem goes to warn("<kind> map <name>, line N: ...")."""
    builder = ProgramBuilder()
    two_patterns = kind == "regexp"

    for number, line in logical_lines(data.splitlines()):
        def say(text, number=number):
            if warn:
                warn(f"{kind} map {name}, line {number}: {text}")
        if line[:1] in (b" ", b"\t"):
            say("continuation line without a preceding rule: ignored")
            continue
        try:
            if line[0] in _ALNUM:
                keyword = split_keyword(line)
                if keyword is None:
                    raise RuleError("unknown command (expected IF, ENDIF or a /pattern/)")
                word, rest = keyword
                if word == "ENDIF":
                    if rest.strip(_SPACE):
                        say("text after ENDIF is ignored")
                    if not builder.close_if():
                        say("ENDIF without a matching IF is ignored")
                    continue
                test, _groups, rest = _parse_patterns(rest, two_patterns, compile_pattern, say)
                if rest.strip(_SPACE):
                    say(f'text after the IF pattern is ignored: "{rest.strip(_SPACE).decode("latin-1")}"'
                        " (rules inside IF must not be indented)")
                builder.open_if(number, test)
                continue
            first, second, rest = _split_patterns(line, two_patterns)
            value = rest.strip(_SPACE)
            if not value:
                say("no result text: the rule returns an empty string")
            template = parse_template(value)
            if template.max_group and first.negate:
                raise RuleError("$number in the result of a negated pattern")
            if template.max_group and flags & F.NO_REGSUB:
                raise RuleError("$number substitution is not allowed for this table")
            test, groups = _make_test(first, second, compile_pattern, say)
            if template.max_group > groups:
                raise RuleError(f'replacement index "{template.max_group}" exceeds the'
                                f" {groups} group(s) of the pattern")
            builder.add(Rule(number, test, template.expand))
        except RuleError as exc:
            say(f"{exc}: skipping this rule")
    program, unclosed = builder.finish()
    for number in unclosed:
        if warn:
            warn(f"{kind} map {name}, line {number}: IF has no matching ENDIF")
    return program


def _split_patterns(text: bytes, two_patterns: bool):
    first, rest = split_pattern(text, two_patterns)
    second = None
    if two_patterns and rest[:1] == b"!" and len(rest) > 1 and rest[1] not in _SPACE:
        second, rest = split_pattern(rest, True)
    return first, second, rest


def _parse_patterns(text, two_patterns, compile_pattern, say):
    first, second, rest = _split_patterns(text, two_patterns)
    test, groups = _make_test(first, second, compile_pattern, say)
    return test, groups, rest


def _make_test(first: PatternSpec, second, compile_pattern, say):
    one = compile_pattern(first, say)
    two = compile_pattern(second, say) if second is not None else None
    neg1 = first.negate
    find1 = one.find
    if two is None:
        if neg1:
            return (lambda key: None if find1(key) else True), one.groups
        return find1, one.groups
    neg2 = second.negate
    find2 = two.find

    def test(key):
        m = find1(key)
        if (m is None) != neg1:
            return None
        if (find2(key) is None) != neg2:
            return None
        return m if m is not None else True
    return test, one.groups


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
