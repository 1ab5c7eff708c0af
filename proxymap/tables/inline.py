"""`inline:{key=value, ...}`: a small table written inside its own name.

Mirrors Postfix 3.7's dict_inline. The name must be one `{...}` group;
inside, entries are separated by commas or whitespace, and an entry that
needs whitespace is itself wrapped in `{ ... }` (`inline:{a=b, {c = d e}}`).
An entry is `key=value`: the key ends at an unquoted blank or `=`, may use
`"..."` and `\\` quoting and keeps the quote characters; blanks around `=`
are skipped, the value runs to the end (trailing blanks dropped, may be
empty). Keys are folded at load time only when FOLD_FIX is among the open
flags (proxymap opens with flags 0, see the spec's folding caveat); a later
duplicate replaces an earlier one. No entries or any syntax error make the
open fail with Postfix's wording.

The brace helpers (`strip_braces`, `split_braced`) are Postfix's extpar()
and mystrtokq() behaviour and are shared with static: and the composites.
"""

from __future__ import annotations

from proxymap.tables.base import TableOpenError, require_read_only
from proxymap.tables.texthash import MemoryTable, fold_source_key, log_text, utf8_enabled

#: separators between entries (and between unionmap/pipemap members)
SEPARATORS = b", \t\r\n"
_BLANKS = b" \t\r\n"


class BraceError(ValueError):
    """A `{...}` group that is not closed or is followed by other text."""


def strip_braces(text: bytes) -> bytes:
    """`{ inner }` -> `inner` without surrounding blanks. The group must
    close at the very end (not even a blank may follow); text that does not
    start with `{` is returned unchanged."""
    if not text.startswith(b"{"):
        return text
    depth = 0
    for i, c in enumerate(text):
        if c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                if text[i + 1:]:
                    raise BraceError(f"syntax error after '}}' in \"{log_text(text)}\"")
                return text[1:i].strip(_BLANKS)
    raise BraceError(f"missing '}}' in \"{log_text(text)}\"")


def split_braced(text: bytes, separators: bytes = SEPARATORS) -> list[bytes]:
    """Split on separator bytes, but never inside `{...}` (nesting counted);
    empty tokens are dropped."""
    tokens: list[bytes] = []
    current = bytearray()
    depth = 0
    for c in text:
        if depth == 0 and c in separators:
            if current:
                tokens.append(bytes(current))
                current.clear()
            continue
        if c == 0x7B:
            depth += 1
        elif c == 0x7D and depth > 0:
            depth -= 1
        current.append(c)
    if current:
        tokens.append(bytes(current))
    return tokens


def split_name_value(entry: bytes) -> tuple[bytes, bytes]:
    """`key = value` -> (key, value) with the key's quoting kept; raises
    ValueError with Postfix's reason."""
    if not entry:
        raise ValueError("no key found; expected format: key = value")
    in_quote = False
    i, n = 0, len(entry)
    while i < n:
        c = entry[i]
        if c == 0x5C:  # backslash: the next byte is part of the key
            i += 2
            continue
        if c == 0x22:
            in_quote = not in_quote
        elif not in_quote and (c in _BLANKS or c == 0x3D):
            break
        i += 1
    if in_quote:
        raise ValueError("unbalanced '\"'")
    key = entry[:min(i, n)]
    rest = entry[min(i, n):].lstrip(_BLANKS)
    if not rest.startswith(b"="):
        raise ValueError("missing '=' after attribute name")
    return key, rest[1:].strip(_BLANKS)


def parse_inline(name: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of an inline: name, in order. Raises
    ValueError with the bare reason ("bad syntax", "empty table", ...)."""
    if len(name) <= 2 or not name.startswith(b"{") or not name.endswith(b"}"):
        raise ValueError("bad syntax")
    try:
        body = strip_braces(name)
    except BraceError:
        raise ValueError("bad syntax") from None
    entries = []
    for token in split_braced(body):
        if token.startswith(b"{"):
            try:
                token = strip_braces(token)
            except BraceError as exc:
                raise ValueError(str(exc)) from None
        entries.append(split_name_value(token))
    if not entries:
        raise ValueError("empty table")
    return entries


class InlineTable(MemoryTable):
    """An in-memory fixed-string table built from the table name."""

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        require_read_only(self.spec, writable)
        try:
            entries = parse_inline(name.encode("utf-8", "surrogateescape"))
        except ValueError as exc:
            raise TableOpenError(f'{exc}: "{self.spec}"; need "{type_name}:{{name=value...}}"') from None
        utf8 = utf8_enabled(flags, params)
        for key, value in entries:
            self.entries[fold_source_key(key, flags, utf8)] = value
