"""Which tables proxymap and proxywrite may open: proxy_read_maps/proxy_write_maps.

As Postfix's proxymap(8): a table is served only when the allow-list
parameter names it with a `proxy:` prefix, directly, inside an unquoted
unionmap:/pipemap: composite, or as the first word of a `{...}` group;
from Postfix 3.11 on, a `/file/name` in the list stands for the tables
named in that file.
"""

from __future__ import annotations

from typing import Callable, Iterable

from proxymap.conventions.expansion import MAX_NESTING
from proxymap.conventions.values import parse_table_list, strip_group


_COMPOSITE_PREFIXES = ("unionmap:{", "pipemap:{")


def proxy_allow_set(value: str, read_lines: Callable[[str], Iterable[str]] | None = None,
                    _depth: int = 0) -> set[str]:
    """Canonical `type:name` strings that an expanded proxy_read_maps or
    proxy_write_maps value authorises: tokens starting with `proxy:` (all such
    prefixes removed), including members of unquoted unionmap:/pipemap:
    composites and the first word of `{...}` groups. With `read_lines`
    (Postfix 3.11+), a `/file/name` token stands for the file's logical
    lines, read by read_lines(path), each searched the same way."""
    allowed: set[str] = set()
    for token in parse_table_list(value):
        if token.startswith("{"):
            words = strip_group(token).split()
            if not words:
                continue
            token = words[0]
        if token.startswith("/") and read_lines is not None:
            if _depth < MAX_NESTING:
                for line in read_lines(token):
                    allowed |= proxy_allow_set(line, read_lines, _depth + 1)
            continue
        if token.startswith(_COMPOSITE_PREFIXES) and token.endswith("}"):
            inner = token[token.index("{"):]
            allowed |= proxy_allow_set(strip_group(inner), read_lines, _depth)
            continue
        if not token.startswith("proxy:"):
            continue
        while token.startswith("proxy:"):
            token = token[len("proxy:"):]
        if ":" in token:
            allowed.add(token)
    return allowed
