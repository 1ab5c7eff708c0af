"""Necessary literals of regexp: and pcre: patterns: a shortcut, never a
different answer.

Postfix runs every rule's regular expression against the key. Calling the
C engines from Python costs about a microsecond per call, many times what
the match itself costs in C, so before calling them we ask a cheaper
question with the same "no": a pattern whose top level is a plain
sequence (no `|` outside groups) can only match a key that contains each
run of literal characters of that sequence, so when the longest such run
is absent from the key the engine would say "no match" too, and we say it
without asking. Whatever the scanner does not fully understand (basic REs,
PCRE's `x` flag, option settings, verbs, `\\Q`, escapes with arguments,
unusual braces) gets no shortcut: the engine is always asked then.
Quantified characters are dropped from a run and groups and classes end
it, so a run is always text every match contains.
"""

from __future__ import annotations

import re

from proxymap.tables.patterns import ALNUM

_INTERVAL_POSIX = re.compile(rb"\{[0-9]*(,[0-9]*)?\}")
_INTERVAL_PCRE = re.compile(rb"\{[0-9]+(,[0-9]*)?\}")
#: PCRE escapes of one character that match a class or an assertion
_PCRE_ONE_CHAR_ESCAPES = frozenset(b"dDwWsSbBhHvVRAzZGKXC")
_PCRE_OPTION_SETTING = re.compile(rb"\(\?[imnsxUJ^-]*\)")


class _NoShortcut(Exception):
    pass


def _skip_class(p: bytes, i: int, backslash_escapes: bool) -> int:
    """Index after a bracket expression whose `[` is at p[i-1]: `]` first
    is a member, `[:name:]`, `[.x.]`, `[=x=]` are single items, and in
    PCRE (not POSIX) a backslash escapes the next byte."""
    n = len(p)
    if i < n and p[i] == 0x5E:
        i += 1
    if i < n and p[i] == 0x5D:
        i += 1
    while i < n:
        c = p[i]
        if c == 0x5C and backslash_escapes:
            i += 2
            continue
        if c == 0x5D:
            return i + 1
        if c == 0x5B and i + 1 < n and p[i + 1] in b":.=":
            end = p.find(bytes([p[i + 1], 0x5D]), i + 2)
            if end >= 0:
                i = end + 2
                continue
            if not backslash_escapes:
                raise _NoShortcut
        i += 1
    raise _NoShortcut


def posix_literal(p: bytes) -> bytes | None:
    """The longest run of literal bytes every match of the POSIX extended
    RE `p` contains, or None."""
    return _scan(p, pcre=False)


def pcre_literal(p: bytes) -> bytes | None:
    """The same for a PCRE2 pattern compiled without PCRE2_EXTENDED."""
    if b"(*" in p or b"\\Q" in p or b"(?#" in p:
        return None
    return _scan(p, pcre=True)


def _scan(p: bytes, pcre: bool) -> bytes | None:
    runs: list[bytes] = []
    run = bytearray()
    i, n, depth = 0, len(p), 0

    def end_run():
        runs.append(bytes(run))
        run.clear()
    try:
        while i < n:
            c = p[i]
            if depth:                       # inside a group: only find its end
                if c == 0x5C:
                    i += 2
                    continue
                if c == 0x5B:
                    i = _skip_class(p, i + 1, pcre)
                    continue
                depth += (c == 0x28) - (c == 0x29)
                i += 1
                continue
            if c == 0x5C:
                if i + 1 >= n:
                    return None
                e = p[i + 1]
                if pcre and e in _PCRE_ONE_CHAR_ESCAPES:
                    end_run()
                elif pcre and (e in ALNUM or e >= 0x80):
                    return None             # escapes with arguments, code points, ...
                elif not pcre and (e in ALNUM or e >= 0x80 or e in b"<>`'"):
                    end_run()               # GNU operators, back-references
                else:
                    run.append(e)
                i += 2
                continue
            if c in b"*+?{":
                if c == 0x7B:
                    m = (_INTERVAL_PCRE if pcre else _INTERVAL_POSIX).match(p, i)
                    if m is None:
                        if not pcre:
                            return None
                        end_run()           # PCRE: a literal brace
                        i += 1
                        continue
                    i = m.end()
                else:
                    i += 1
                if run:
                    run.pop()               # the quantified byte is optional
                end_run()
                continue
            if c in b"|)":
                return None
            if c in b"[(.^$":
                end_run()
                if c == 0x5B:
                    i = _skip_class(p, i + 1, pcre)
                    continue
                if c == 0x28:
                    if pcre and _PCRE_OPTION_SETTING.match(p, i):
                        return None         # changes the options of what follows
                    depth = 1
            else:
                run.append(c)
            i += 1
    except _NoShortcut:
        return None
    if depth:
        return None
    end_run()
    best = max(runs, key=len)
    return best or None
