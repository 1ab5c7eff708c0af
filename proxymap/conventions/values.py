"""Parameter values as Postfix converts them: lists, integers, times, booleans.

Postfix's get_mail_conf_int/_time/_bool and its list splitting: a list
is split on commas and whitespace with `{...}` groups kept whole; an
integer is strtol() over the whole string within int (or long) range; a
time is `N[unit]` where only the first letter after the digits counts;
a boolean is yes or no, in any case.
"""

from __future__ import annotations

import re

from proxymap.conventions.config_error import ConfigError
from proxymap.util.logical_lines import BLANKS

LIST_SEPARATORS = ", \t\r\n"
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1


def find_close(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing text[start] (== open_ch), or -1."""
    level = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            level += 1
        elif text[i] == close_ch:
            level -= 1
            if level == 0:
                return i
    return -1


def split_grouped(text: str, separators: str) -> list[str]:
    """Tokens of `text` between `separators`, where a `{...}` group, at the
    start of a token or inside it (`type:{...}`), nested or not, is part of
    its token, braces intact: Postfix's mystrtokq, which splits both a list
    value and master.cf's command arguments. Raises ConfigError on an
    unbalanced `{`."""
    tokens = []
    i = 0
    n = len(text)
    while i < n:
        if text[i] in separators:
            i += 1
            continue
        start = i
        level = 0
        while i < n and (level > 0 or text[i] not in separators):
            if text[i] == "{":
                level += 1
            elif text[i] == "}" and level > 0:
                level -= 1
            i += 1
        if level > 0:
            raise ConfigError(f"missing '}}' in \"{text[start:]}\"")
        tokens.append(text[start:i])
    return tokens


def parse_table_list(value: str) -> list[str]:
    """Split a list on commas and whitespace, keeping `{...}` groups (and
    `type:{...}` names) as single tokens with their braces intact.
    Raises ConfigError on an unbalanced `{`."""
    return split_grouped(value, LIST_SEPARATORS)


def strip_group(token: str) -> str:
    """`{ text }` -> `text` (outer braces and the blanks just inside them
    removed); any other token is returned unchanged."""
    if token.startswith("{") and find_close(token, 0, "{", "}") == len(token) - 1:
        return token[1:-1].strip(BLANKS)
    return token


def split_list(value: str) -> list[str]:
    """A Postfix list value as items: separators are `,` and whitespace and
    a `{...}` group is one item with its outer braces removed."""
    return [strip_group(t) for t in parse_table_list(value)]


def parse_bool(value: str) -> bool:
    low = value.lower()
    if low == "yes":
        return True
    if low == "no":
        return False
    raise ValueError(value)


def parse_int(value: str, maximum: int = INT_MAX) -> int:
    """strtol()-style decimal over the whole string, within +-maximum."""
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ValueError(value)
    number = int(value)
    if not -maximum - 1 <= number <= maximum:
        raise ValueError(value)
    return number


TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, default_unit: str = "s") -> int:
    """Seconds from `N[unit]`; only the first character after the digits is
    looked at (`5sec` is 5 s, as in Postfix). Raises ValueError."""
    match = re.match(r"[0-9]+", value)
    if not match:
        raise ValueError(value)
    rest = value[match.end():]
    unit = rest[:1] or default_unit
    if unit not in TIME_UNITS:
        raise ValueError(value)
    seconds = int(match.group()) * TIME_UNITS[unit]
    if seconds > INT_MAX:
        raise ValueError(value)
    return seconds


def parse_release(text: str) -> tuple[int, int] | None:
    """(major, minor) of a Postfix version such as 3.11.7 or 3.11; None if
    it is not one."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?(?:[-.~+].*)?", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None
