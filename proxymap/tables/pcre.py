"""The pcre: table: PCRE-style regular expressions, first matching rule wins.

Mirrors Postfix's dict_pcre (PCRE2, caseless + dotall by default, flags
i m s x A E U X) on top of Python `re`: each pattern is translated by
`patterns.pcre_to_python`, which refuses constructs Python cannot express.
"""

from __future__ import annotations

from proxymap.tables.patterns import (PatternFileTable, PatternSpec, Program,
                                      compile_pcre_pattern, compile_regex_rules)


def _compile_pattern(spec: PatternSpec, say):
    return compile_pcre_pattern(spec.regex, spec.flags, say)


def compile_pcre(data: bytes, name: str = "-", flags: int = 0, warn=None) -> Program:
    """Compile the content of a pcre: rule file; problems go to warn()."""
    return compile_regex_rules(data, "pcre", name, flags, warn, _compile_pattern)


class PcreTable(PatternFileTable):
    compile_rules = staticmethod(compile_pcre)
