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
_PCRE_OPTION_START = frozenset(b"imnsxUJ-^)")


class _NoShortcut(Exception):
    pass


def _skip_posix_bracket(p: bytes, i: int) -> int:
    """Index after a POSIX bracket expression whose `[` is at p[i-1]."""
    n = len(p)
    if i < n and p[i] == 0x5E:
        i += 1
    if i < n and p[i] == 0x5D:
        i += 1
    while i < n:
        if p[i] == 0x5D:
            return i + 1
        if p[i] == 0x5B and i + 1 < n and p[i + 1] in b":.=":
            end = p.find(bytes([p[i + 1], 0x5D]), i + 2)
            if end < 0:
                raise _NoShortcut
            i = end + 2
            continue
        i += 1
    raise _NoShortcut


def _skip_pcre_class(p: bytes, i: int) -> int:
    """Index after a PCRE character class whose `[` is at p[i-1]."""
    n = len(p)
    if i < n and p[i] == 0x5E:
        i += 1
    if i < n and p[i] == 0x5D:
        i += 1
    while i < n:
        c = p[i]
        if c == 0x5C:
            i += 2
            continue
        if c == 0x5D:
            return i + 1
        if c == 0x5B and i + 1 < n and p[i + 1] in b":.=":
            end = p.find(bytes([p[i + 1], 0x5D]), i + 2)
            if end >= 0:
                i = end + 2
                continue
        i += 1
    raise _NoShortcut


def _longest(runs: list[bytes]) -> bytes | None:
    best = max(runs, key=len) if runs else b""
    return best or None


def posix_literal(p: bytes) -> bytes | None:
    """The longest run of literal bytes every match of the POSIX extended
    RE `p` contains, or None."""
    runs: list[bytes] = []
    run = bytearray()
    i, n, depth = 0, len(p), 0
    try:
        while i < n:
            c = p[i]
            if depth:
                if c == 0x5C:
                    i += 2
                    continue
                if c == 0x5B:
                    i = _skip_posix_bracket(p, i + 1)
                    continue
                depth += (c == 0x28) - (c == 0x29)
                i += 1
                continue
            if c == 0x5C:
                if i + 1 >= n:
                    return None
                e = p[i + 1]
                if e in ALNUM or e >= 0x80 or e in b"<>`'":  # GNU operators, back-references
                    runs.append(bytes(run))
                    run.clear()
                else:
                    run.append(e)
                i += 2
                continue
            if c in b"*+?{":
                if c == 0x7B:
                    m = _INTERVAL_POSIX.match(p, i)
                    if m is None:
                        return None
                    i = m.end()
                else:
                    i += 1
                if run:
                    run.pop()
                runs.append(bytes(run))
                run.clear()
                continue
            if c in b"|)":
                return None
            if c in b"[(.^$":
                runs.append(bytes(run))
                run.clear()
                if c == 0x5B:
                    i = _skip_posix_bracket(p, i + 1)
                    continue
                if c == 0x28:
                    depth = 1
            else:
                run.append(c)
            i += 1
    except _NoShortcut:
        return None
    if depth:
        return None
    runs.append(bytes(run))
    return _longest(runs)


def pcre_literal(p: bytes) -> bytes | None:
    """The same for a PCRE2 pattern compiled without PCRE2_EXTENDED."""
    if b"(*" in p or b"\\Q" in p or b"(?#" in p:
        return None
    runs: list[bytes] = []
    run = bytearray()
    i, n, depth = 0, len(p), 0
    try:
        while i < n:
            c = p[i]
            if depth:
                if c == 0x5C:
                    i += 2
                    continue
                if c == 0x5B:
                    i = _skip_pcre_class(p, i + 1)
                    continue
                depth += (c == 0x28) - (c == 0x29)
                i += 1
                continue
            if c == 0x5C:
                if i + 1 >= n:
                    return None
                e = p[i + 1]
                if e in _PCRE_ONE_CHAR_ESCAPES:
                    runs.append(bytes(run))
                    run.clear()
                elif e in ALNUM or e >= 0x80:
                    return None
                else:
                    run.append(e)
                i += 2
                continue
            if c in b"*+?":
                i += 1
            elif c == 0x7B:
                m = _INTERVAL_PCRE.match(p, i)
                if m is None:         # a literal brace: end the run there
                    runs.append(bytes(run))
                    run.clear()
                    i += 1
                    continue
                i = m.end()
            elif c in b"|)":
                return None
            elif c in b"[(.^$":
                runs.append(bytes(run))
                run.clear()
                if c == 0x5B:
                    i = _skip_pcre_class(p, i + 1)
                    continue
                if c == 0x28:
                    if p[i + 1:i + 2] == b"?" and i + 2 < n and p[i + 2] in _PCRE_OPTION_START:
                        if re.match(rb"\(\?[imnsxUJ^-]*\)", p[i:]):
                            return None   # an option setting for the rest
                    depth = 1
                i += 1
                continue
            else:
                run.append(c)
                i += 1
                continue
            # a quantifier
            if run:
                run.pop()
            runs.append(bytes(run))
            run.clear()
    except _NoShortcut:
        return None
    if depth:
        return None
    runs.append(bytes(run))
    return _longest(runs)


# The key of the last lookup, lower-cased once for all the rules it meets.
_last: list = [None, b""]


def guarded(find, literal: bytes, caseless: bool, match: bool):
    """`find` behind the literal test: a key without the literal gets the
    engine's "no match" (True for a negated pattern) without a call."""
    miss = not match
    if not caseless:
        def test(key: bytes):
            if literal not in key:
                return miss
            return find(key)
        return test
    literal = literal.lower()
    last = _last

    def test_caseless(key: bytes):
        if key is last[0]:
            folded = last[1]
        else:
            folded = key.lower()
            last[0], last[1] = key, folded
        if literal not in folded:
            return miss
        return find(key)
    return test_caseless
