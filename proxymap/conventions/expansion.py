"""`$name` expansion of parameter values, Postfix's mac_expand().

`$name`, `${name}`, `$(name)`, `${name?text}`, `${name:text}`, the braced
`${name?{a}:{b}}` forms, relational and compatibility-level operators
(`${{$compatibility_level} <level {2} ? {x} : {y}}`), Postfix 3.11's
`${domain_to_ascii{...}}`, and a nesting limit of 100.
"""

from __future__ import annotations

import re
from typing import Callable

from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.values import find_close
from proxymap.util.logical_lines import BLANKS

MAX_NESTING = 100
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]+")


class MacroError(ConfigError):
    """A syntax or nesting error inside a parameter value."""


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in BLANKS:
        i += 1
    return i


def _braced(text: str, i: int, context: str) -> tuple[str, int]:
    """Parse `{...}` at text[i]; return (inside, index after '}')."""
    close = find_close(text, i, "{", "}")
    if close < 0:
        raise MacroError(f"missing '}}' in \"{context}\"")
    return text[i + 1:close], close + 1


_RELATIONAL_OPS = ("<=level", ">=level", "==level", "!=level", "<level", ">level",
                   "==", "!=", "<=", ">=", "<", ">")


def parse_compat_level(text: str) -> tuple[int, int, int]:
    """'3.6' -> (3, 6, 0); Postfix compatibility levels are major[.minor[.patch]]."""
    parts = text.strip(BLANKS).split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise MacroError(f"malformed compatibility level: \"{text}\"")
    nums = [int(p) for p in parts] + [0, 0]
    return nums[0], nums[1], nums[2]


def compare(left: str, op: str, right: str) -> bool:
    """Relational test of ${{a} OP {b}}: levels for `...level`, numbers when
    both sides are all digits, otherwise byte order."""
    if op.endswith("level"):
        a, b = parse_compat_level(left), parse_compat_level(right)
        op = op[:-5]
    elif left.isdigit() and right.isdigit() and left.isascii() and right.isascii():
        a, b = int(left), int(right)
    else:
        a, b = left.encode("utf-8", "surrogateescape"), right.encode("utf-8", "surrogateescape")
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b,
            ">": a > b, ">=": a >= b}[op]


def _conditional(body: str, i: int, op: str, truth: bool, again, depth: int) -> str:
    """Evaluate the part of `${...}` from the `?`/`:` at body[i]."""
    j = _skip_blanks(body, i + 1)
    if j >= len(body) or body[j] != "{":
        chosen = body[i + 1:] if (truth if op == "?" else not truth) else ""
        return again(chosen, depth + 1) if chosen else ""
    first, j = _braced(body, j, body)
    j = _skip_blanks(body, j)
    second = None
    if j < len(body):
        if op != "?" or body[j] != ":":
            raise MacroError(f"unexpected input at: \"...{body[:j]}>>>{body[j:]}\"")
        k = _skip_blanks(body, j + 1)
        if k < len(body) and body[k] == "{":
            second, k = _braced(body, k, body)
            k = _skip_blanks(body, k)
            if k < len(body):
                raise MacroError(f"unexpected input at: \"...{body[:k]}>>>{body[k:]}\"")
        else:
            second = body[j + 1:]
    if op == "?":
        chosen = first if truth else (second or "")
    else:
        chosen = first if not truth else ""
    return again(chosen, depth + 1) if chosen else ""


def _relational(body: str, again, depth: int) -> str:
    """`{a} OP {b}` optionally followed by `?...`/`:...`."""
    left, i = _braced(body, 0, body)
    i = _skip_blanks(body, i)
    op = next((o for o in _RELATIONAL_OPS if body.startswith(o, i)), None)
    if op is None:
        raise MacroError(f"\"==\" or \"!=\" or \"<\" or \"<=\" or \">=\" or \">\" expected at: "
                         f"\"...{body[:i]}>>>{body[i:]}\"")
    i = _skip_blanks(body, i + len(op))
    if i >= len(body) or body[i] != "{":
        raise MacroError(f"\"{{expression}}\" expected at: \"...{body[:i]}>>>{body[i:]}\"")
    right, i = _braced(body, i, body)
    truth = compare(again(left, depth + 1), op, again(right, depth + 1))
    i = _skip_blanks(body, i)
    if i >= len(body):
        return "true" if truth else ""
    if body[i] not in "?:":
        raise MacroError(f"\"?\" or \":\" expected at: \"...{body[:i]}>>>{body[i:]}\"")
    return _conditional(body, i, body[i], truth, again, depth)


def expand(text: str, lookup: Callable[[str], str | None], depth: int = 0) -> str:
    """Expand `$` references in `text`. lookup(name) returns the raw value of
    a parameter (main.cf or default) or None if undefined; substituted values
    are expanded in turn. Raises MacroError on bad syntax or on nesting
    deeper than MAX_NESTING."""

    def again(inner: str, level: int) -> str:
        return expand(inner, lookup, level)

    if depth > MAX_NESTING:
        raise MacroError(f"unreasonable macro call nesting: \"{text[:60]}\"")
    out = []
    i = 0
    n = len(text)
    while i < n:
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        i = dollar + 1
        if i >= n:
            raise MacroError(f"empty macro name: \"{text}\"")
        c = text[i]
        if c == "$":
            out.append("$")
            i += 1
            continue
        if c in "{(":
            close_ch = "}" if c == "{" else ")"
            close = find_close(text, i, c, close_ch)
            if close < 0:
                raise MacroError(f"truncated macro reference: \"{text[dollar:]}\"")
            out.append(_expand_braced(text[i + 1:close], lookup, again, depth))
            i = close + 1
            continue
        match = _NAME_CHARS.match(text, i)
        if not match:
            raise MacroError(f"empty macro name: \"{text[dollar:]}\"")
        out.append(_substitute(match.group(), lookup, again, depth))
        i = match.end()
    return "".join(out)


def _substitute(name: str, lookup, again, depth: int) -> str:
    if depth + 1 > MAX_NESTING:
        raise MacroError(f"unreasonable macro call nesting: \"{name}\"")
    value = lookup(name)
    return again(value, depth + 1) if value else ""


def domain_to_ascii(text: str) -> str:
    """Postfix 3.11's ${domain_to_ascii{text}}: the domain in IDNA (A-label) form."""
    try:
        return text.encode("idna").decode("ascii") if text else text
    except UnicodeError:
        return text


#: Postfix 3.11's ${function{text}} forms
MACRO_FUNCTIONS = {"domain_to_ascii": domain_to_ascii}


def _expand_braced(body: str, lookup, again, depth: int) -> str:
    """The inside of ${...} or $(...)."""
    i = _skip_blanks(body, 0)
    if i < len(body) and body[i] == "{":
        return _relational(body[i:], again, depth)
    match = _NAME_CHARS.match(body, i)
    j = _skip_blanks(body, match.end()) if match else i
    if match and match.group() in MACRO_FUNCTIONS and body[j:j + 1] == "{":
        close = find_close(body, j, "{", "}")
        if close >= 0 and not body[close + 1:].strip(BLANKS):
            return MACRO_FUNCTIONS[match.group()](again(body[j + 1:close], depth + 1))
    if not match or (j < len(body) and body[j] not in "?:"):
        raise MacroError(f"attribute name syntax error at: \"...{body[:j]}>>>{body[j:]}\"")
    name = match.group()
    if j >= len(body):
        return _substitute(name, lookup, again, depth)
    truth = bool(lookup(name))
    return _conditional(body, j, body[j], truth, again, depth)



_REFERENCE = re.compile(r"\$[{(]?[ \t]*([A-Za-z0-9_]+)")


def referenced_names(value: str) -> list[str]:
    """Parameter names a value refers to as $name, ${name...} or $(name)."""
    return _REFERENCE.findall(value)
