"""The cidr: table: IPv4/IPv6 network rules, first matching rule wins.

Mirrors Postfix's dict_cidr: rules `[!]address[/len] result`, the address
optionally in brackets, nestable `IF [!]pattern` ... `ENDIF` blocks, bad
rules logged with file:line and skipped. A key matches only rules of its
own address family; IPv4 keys must be plain dotted quads.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxymap.tables.patterns import (PatternFileTable, Program, ProgramBuilder, Rule,
                                      RuleError, split_keyword)
from proxymap.tables.source import logical_lines

_SPACE = b" \t\r\n\v\f"


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as inet_pton() accepts it: IPv6 when it contains a colon
    (no zone index), otherwise a strict dotted quad; None if invalid."""
    try:
        if ":" in text:
            if "%" in text:
                return None
            return ipaddress.IPv6Address(text)
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


# The key of the last lookup and its parsed form: every rule of a table
# tests the same key, so it is parsed once per lookup, not once per rule.
_last_key: list = [None, None]


def key_address(key: bytes) -> tuple[int, int] | None:
    """(IP version, address as an integer) for a lookup key, or None."""
    if key == _last_key[0]:
        return _last_key[1]
    try:
        address = parse_address(key.decode("ascii"))
    except UnicodeDecodeError:
        address = None
    parsed = None if address is None else (address.version, int(address))
    _last_key[0], _last_key[1] = key, parsed
    return parsed


@dataclass
class CidrPattern:
    negate: bool
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    def __post_init__(self):
        self.version = self.network.version
        self.base = int(self.network.network_address)
        self.mask = int(self.network.netmask)

    def test(self, key: bytes):
        parsed = key_address(key)
        if parsed is None or parsed[0] != self.version:
            return None
        return True if ((parsed[1] & self.mask) == self.base) != self.negate else None


def parse_cidr_pattern(text: str) -> CidrPattern:
    """Parse `[!]addr[/len]`, `[!][addr]/len` or `[!][addr/len]`."""
    negate = False
    i = 0
    while i < len(text) and (text[i] == "!" or text[i] in " \t"):
        negate ^= text[i] == "!"
        i += 1
    pattern = text[i:]
    if not pattern:
        raise RuleError("no address pattern")
    body = pattern
    if body.startswith("["):
        close = body.find("]")
        if close < 0:
            raise RuleError(f'missing "]" after "{body}"')
        after = body[close + 1:]
        if after and not after.startswith("/"):
            raise RuleError(f'bad address pattern: "{pattern}"')
        body = body[1:close] + after
    address_text, slash, mask_text = body.partition("/")
    address = parse_address(address_text)
    if address is None:
        raise RuleError(f'bad address pattern: "{pattern}"')
    if slash:
        if not mask_text.isascii() or not mask_text.isdigit():
            raise RuleError(f'bad mask value in "{pattern}"')
        mask = int(mask_text)
        if mask > address.max_prefixlen:
            raise RuleError(f'bad mask length in "{pattern}"')
    else:
        mask = address.max_prefixlen
    try:
        network = ipaddress.ip_network(f"{address}/{mask}")
    except ValueError:
        fixed = ipaddress.ip_network(f"{address}/{mask}", strict=False)
        raise RuleError(f'"{pattern}" has host bits set beyond the /{mask} mask;'
                        f' did you mean "{fixed}"?') from None
    return CidrPattern(negate, network)


def compile_cidr(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a cidr: rule file; problems go to warn()."""
    builder = ProgramBuilder()

    for number, raw in logical_lines(data.splitlines()):
        def say(text, number=number):
            if warn:
                warn(f"cidr map {name}, line {number}: {text}")
        if raw[:1] in (b" ", b"\t"):
            say("continuation line without a preceding rule: ignored")
            continue
        line = raw.decode("latin-1")
        try:
            keyword = split_keyword(raw)
            if keyword is not None and keyword[0] == "ENDIF":
                if keyword[1].strip(_SPACE):
                    raise RuleError("text after ENDIF")
                if not builder.close_if():
                    raise RuleError("ENDIF without a matching IF")
                continue
            if keyword is not None:
                pattern = parse_cidr_pattern(keyword[1].decode("latin-1").strip(" \t\r\n\v\f"))
                builder.open_if(number, pattern.test)
                continue
            negation, rest = _take_negation(line)
            token, _, value = _split_token(rest)
            value = value.strip(" \t\r\n\v\f")
            pattern = parse_cidr_pattern(negation + token)
            if not value:
                raise RuleError("no result after the address pattern")
            result = value.encode("latin-1")
            builder.add(Rule(number, pattern.test, lambda _m, r=result: r))
        except RuleError as exc:
            say(f"{exc}: skipping this rule")
    program, unclosed = builder.finish()
    for number in unclosed:
        if warn:
            warn(f"cidr map {name}, line {number}: IF has no matching ENDIF")
    return IndexedCidrProgram.of(program) or program


class IndexedCidrProgram(Program):
    """A cidr table without IF blocks or negations, looked up through an
    index instead of rule by rule: for each prefix length in use, a dict
    from network to the first rule with it. The first matching rule is the
    one with the lowest index among the networks that contain the key, so
    the answer is the same as the linear scan's, in a few dict probes."""

    @classmethod
    def of(cls, program: Program) -> "IndexedCidrProgram | None":
        index: dict[tuple[int, int], dict[int, int]] = {}
        for position, rule in enumerate(program.rules):
            pattern = getattr(rule.test, "__self__", None)
            if rule.result is None or not isinstance(pattern, CidrPattern) or pattern.negate:
                return None
            bucket = index.setdefault((pattern.version, pattern.mask), {})
            bucket.setdefault(pattern.base, position)
        indexed = cls(program.rules)
        indexed.index = [(version, mask, bucket) for (version, mask), bucket in index.items()]
        return indexed

    def lookup(self, key: bytes) -> bytes | None:
        parsed = key_address(key)
        if parsed is None:
            return None
        version, address = parsed
        best = None
        for rule_version, mask, bucket in self.index:
            if rule_version == version:
                position = bucket.get(address & mask)
                if position is not None and (best is None or position < best):
                    best = position
        if best is None:
            return None
        rule = self.rules[best]
        return rule.result(True)


def _take_negation(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line) and (line[i] == "!" or line[i] in " \t"):
        i += 1
    return line[:i].replace(" ", "").replace("\t", ""), line[i:]


def _split_token(text: str) -> tuple[str, str, str]:
    for i, ch in enumerate(text):
        if ch in " \t\r\n\v\f":
            return text[:i], ch, text[i + 1:]
    return text, "", ""


class CidrTable(PatternFileTable):
    compile_rules = staticmethod(compile_cidr)
