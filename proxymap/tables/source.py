"""Readers for the text sources of lookup tables.

Entries are read by logical lines (proxymap/util/logical_lines.py,
Postfix's readllines()). `parse_entry` splits a postmap(1)/texthash line
into key and value, keeping quotes and backslashes in the key as Postfix
does; `read_entries` names file:line in the warning for a bad line.
"""

from __future__ import annotations

from typing import Iterator

from proxymap.util.logical_lines import BLANKS, logical_lines

_BLANKS = BLANKS.encode()


class EntryError(ValueError):
    """A source line that cannot be turned into key and value."""


def parse_entry(line: bytes) -> tuple[bytes, bytes]:
    """Split `key value` the way postmap does: the key ends at the first
    whitespace outside double quotes, `\\` escapes one byte, quotes and
    backslashes stay in the key; the value is the rest, trimmed."""
    if line[:1] in (b" ", b"\t"):
        raise EntryError("logical line must not start with whitespace")
    in_quote = False
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c == 0x5C:  # backslash
            i += 2
            continue
        if c == 0x22:  # double quote
            in_quote = not in_quote
        elif not in_quote and c in _BLANKS:
            break
        i += 1
    if in_quote:
        raise EntryError("unbalanced quotes")
    key = line[:min(i, n)]
    value = line[i:].strip(_BLANKS)
    if not key:
        raise EntryError("no key")
    if not value:
        raise EntryError("expected format: key whitespace value")
    return key, value


def alias_format_warning(path: str, number: int) -> str:
    """Postfix's warning for a key that ends in `:`, as the lines of an
    aliases(5) file given to postmap do."""
    return f'{path}, line {number}: record is in "key: value" format; is this an alias file?'


def read_entries(path: str, warn) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) from a postmap-format file; bad lines are passed
    to warn(message) with file:line and skipped. Raises OSError."""
    with open(path, "rb") as f:
        for number, line in logical_lines(f):
            try:
                key, value = parse_entry(line)
            except EntryError as exc:
                warn(f"{path}, line {number}: {exc}: skipping this entry")
                continue
            if key.endswith(b":"):
                warn(alias_format_warning(path, number))
            yield key, value
