"""The cidr: table: IPv4/IPv6 network rules, first matching rule wins.

Mirrors Postfix's dict_cidr: rules `[!]address[/len] result`, the address
optionally in brackets, nestable `IF [!]pattern` ... `ENDIF` blocks, bad
rules logged with file:line and skipped. A key matches only rules of its
own address family; IPv4 keys must be plain dotted quads.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxymap.tables.patterns import (ENDIF, PatternFileTable, Program, Rule, RuleError,
                                      SPACE, compile_rules, keyword, negations, skip_space, text)


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


def parse_cidr_pattern(pattern: str, match: bool = True) -> CidrPattern:
    """cidr_match_parse(): `addr`, `addr/len`, `[addr]/len` or `[addr/len]`;
    the RuleError text is Postfix's reason."""
    mask_search = pattern
    if pattern.startswith("["):
        pattern = pattern[1:]
        close = pattern.find("]")
        if close < 0:
            raise RuleError(f'missing \']\' character after "[{pattern}"')
        after, pattern = pattern[close + 1:], pattern[:close]
        if after and not after.startswith("/"):
            raise RuleError(f'garbage after "[{pattern}]"')
        mask_search = after if after else pattern
    else:
        mask_search = pattern
    if "/" in mask_search:
        if mask_search is pattern:
            pattern, _, mask_text = pattern.partition("/")
        else:
            mask_text = mask_search.partition("/")[2]
        bits = 128 if ":" in pattern else 32
        if not (mask_text.isascii() and mask_text.isdigit()):
            reason = "bad mask value"
        elif int(mask_text) > bits:
            reason = "bad mask length"
        elif parse_address(pattern) is None or parse_address(pattern).max_prefixlen != bits:
            reason = "bad network value"
        else:
            reason = None
        if reason:
            raise RuleError(f'{reason} in "{pattern}/{mask_text}"')
        address, mask = parse_address(pattern), int(mask_text)
        network = ipaddress.ip_network(f"{address}/{mask}", strict=False)
        if int(network.network_address) != int(address):
            raise RuleError(f'non-null host address bits in "{pattern}/{mask_text}", '
                            f'perhaps you should use "{network.network_address}/{mask}" instead')
    else:
        address = parse_address(pattern)
        if address is None:
            raise RuleError(f'bad address pattern: "{pattern}"')
        network = ipaddress.ip_network(address)
    return CidrPattern(not match, network)


def parse_line(line: bytes, number: int, nesting: int, say):
    """dict_cidr_parse_rule(); a RuleError is logged with ": skipping this
    rule" after Postfix's reason."""
    try:
        return _parse_line(line, number, nesting)
    except RuleError as exc:
        raise RuleError(f"{exc}: skipping this rule") from None


def _parse_line(line: bytes, number: int, nesting: int):
    rest = keyword(line, b"IF")
    if rest is not None:
        match, i = negations(rest)
        if i >= len(rest):
            raise RuleError("no address pattern")
        pattern = parse_cidr_pattern(text(rest[i:].rstrip(SPACE)), match)
        return Rule(number, pattern.test, None)
    rest = keyword(line, b"ENDIF")
    if rest is not None:
        if skip_space(rest) < len(rest):
            raise RuleError("garbage after ENDIF")
        if nesting == 0:
            raise RuleError("ENDIF without IF")
        return ENDIF
    match, i = negations(line)
    j = i
    while j < len(line) and line[j] not in SPACE:
        j += 1
    token = line[i:j]
    value = line[skip_space(line, j + 1):].rstrip(SPACE) if j < len(line) else b""
    if not token:
        raise RuleError("no address pattern")
    pattern = parse_cidr_pattern(text(token), match)
    if not value:
        raise RuleError("no lookup result")
    return Rule(number, pattern.test, lambda _key, r=value: r)


def compile_cidr(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a cidr: rule file; problems go to warn()."""
    program = compile_rules(data, "cidr", name, parse_line, warn)
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
        return rule.result(key)


class CidrTable(PatternFileTable):
    compile_rules = staticmethod(compile_cidr)
