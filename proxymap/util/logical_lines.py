"""Logical lines of a text file, Postfix's readllines().

Comments and blank lines are dropped (also inside a continued entry), a
line that starts with whitespace continues the previous one, and each
logical line keeps the number of its first physical line so errors can
name file:line. main.cf, master.cf, table source files and database
configuration files are all read through here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

#: the characters Postfix counts as blanks around names and values
BLANKS = " \t\r\n\v\f"
_BLANK_BYTES = BLANKS.encode()


def logical_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield (first line number, logical line) from raw lines (with or
    without their newlines). A continuation with nothing to continue is
    yielded on its own with leading whitespace kept, for the caller to warn."""
    current: bytearray | None = None
    start = 0
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n")
        stripped = line.lstrip(_BLANK_BYTES)
        if not stripped or stripped.startswith(b"#"):
            continue
        if line[:1] in (b" ", b"\t") and current is not None:
            current += line
            continue
        if current is not None:
            yield start, bytes(current)
        current, start = bytearray(line), number
    if current is not None:
        yield start, bytes(current)


def read_logical_lines(data: bytes, path: str,
                       warn: Callable[[str], None]) -> list[tuple[int, str]]:
    """(first physical line number, text) of each logical line; a leading
    continuation with nothing to continue is warned about and skipped."""
    result = []
    for number, raw in logical_lines(data.splitlines()):
        text = raw.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t"):
            snippet = text.strip(BLANKS)[:30]
            warn(f"{path}: logical line must not start with whitespace: \"{snippet}\"")
            continue
        result.append((number, text))
    return result
