"""The regexp: table: POSIX regular expressions, first matching rule wins.

Mirrors Postfix's dict_regexp (glibc regcomp, extended + ignore-case by
default) on top of Python `re`: each pattern is translated by
`patterns.posix_to_python`. See docs/tables-patterns.md for what differs.
"""

from __future__ import annotations

from proxymap.tables.patterns import (PatternFileTable, PatternSpec, Program,
                                      compile_posix, compile_regex_rules)


class _Posix:
    def __init__(self, spec: PatternSpec):
        compiled = compile_posix(spec.regex, spec.flags)
        self.find = compiled.search
        self.groups = compiled.groups


def _compile_pattern(spec: PatternSpec, say) -> _Posix:
    return _Posix(spec)


def compile_regexp(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a regexp: rule file; problems go to warn()."""
    return compile_regex_rules(data, "regexp", name, flags, warn, _compile_pattern)


class RegexpTable(PatternFileTable):
    compile_rules = staticmethod(compile_regexp)
