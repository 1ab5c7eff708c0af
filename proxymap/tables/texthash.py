"""`texthash:/path`: a postmap(1)-format text file held in memory.

Mirrors Postfix 3.7's dict_thash: the whole file is read at open with the
common line reader (comments, continuation lines, quoted keys kept as
written) and never written to. Keys are folded at load time only when the
open flags carry FOLD_FIX, so an instance created by a proxymap `open`
(flags 0) keeps upper-case keys that a folding client can never reach
(Postfix 3.7 shares one instance per table and instance bits, created
with the flags of the first request: docs/protocol.md, "Flags"); with UTF8_REQUEST and smtputf8_enable=yes, lines that
are not UTF-8 are skipped and folding is Unicode case folding, as in
Postfix. Duplicates: DUP_IGNORE keeps the first silently, DUP_REPLACE keeps
the last, otherwise the first wins with a warning (Postfix would abort
without DUP_WARN). A file changed while it was read is read again.

Improvement over Postfix: the file is remembered, so the dispatcher reloads
the table when the file changes instead of serving stale data forever.
Opening for writing fails, like Postfix's "requires O_RDONLY access mode".

`MemoryTable` is the in-memory dict with lookup and first/next shared
with inline:.
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.tables.base import (Table, TableOpenError, file_stamp, require_read_only,
                                  snapshot_walk)
from proxymap.tables.source import EntryError, alias_format_warning, parse_entry
from proxymap.utf8 import is_utf8, utf8_key
from proxymap.util.logical_lines import logical_lines

#: how often a file that keeps changing during the load is read again
MAX_LOAD_ATTEMPTS = 3


def utf8_enabled(flags: int, params) -> bool:
    """True when Postfix would run this table in UTF-8 mode: the opener
    asked for it (UTF8_REQUEST) and smtputf8_enable is not `no`."""
    if not flags & F.UTF8_REQUEST:
        return False
    value = (params or {}).get("smtputf8_enable", "yes")
    return str(value).strip().lower() not in ("no", "false", "0")


def fold_source_key(key: bytes, flags: int, utf8: bool) -> bytes:
    """Fold a key read from a table source as Postfix does at load time:
    not at all without FOLD_FIX, Unicode case folding in UTF-8 mode (for
    valid UTF-8), otherwise ASCII lower-casing."""
    if not flags & F.FOLD_FIX:
        return key
    folded = utf8_key(key, fold=True) if utf8 else None
    return F.fold_ascii(key) if folded is None else folded


def printable(text: bytes) -> str:
    """Text for a log line: bytes outside printable ASCII become `?`."""
    return "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in text)


def log_text(text: bytes) -> str:
    """Bytes shown as written (UTF-8; undecodable bytes replaced)."""
    return text.decode("utf-8", "replace")


def load_source(lines, path: str, flags: int, utf8: bool, warn) -> dict[bytes, bytes]:
    """Build the key -> value dict from the raw lines of a texthash file,
    reporting skipped lines and duplicates through warn(message)."""
    entries: dict[bytes, bytes] = {}
    for number, line in logical_lines(lines):
        if line[:1] in (b" ", b"\t"):
            warn(f'{path}: logical line must not start with whitespace: "{log_text(line)}"')
            continue
        if utf8 and not is_utf8(line):
            warn(f'{path}, line {number}: non-UTF-8 input "{printable(line)}"'
                 " -- ignoring this line")
            continue
        try:
            key, value = parse_entry(line)
        except EntryError as exc:
            if "quote" in str(exc):
                warn(f"{path}, line {number}: unbalanced '\"' in '{log_text(line)}'"
                     " -- ignoring this line")
            else:
                warn(f"{path}, line {number}: expected format: key whitespace value"
                     " -- ignoring this line")
            continue
        if key.endswith(b":"):
            warn(alias_format_warning(path, number))
        key = fold_source_key(key, flags, utf8)
        if key in entries:
            if flags & F.DUP_IGNORE:
                continue
            if flags & F.DUP_REPLACE:
                entries[key] = value
                continue
            warn(f'{path}, line {number}: duplicate entry: "{log_text(key)}"')
            continue
        entries[key] = value
    return entries


class MemoryTable(Table):
    """A fixed-string table whose records live in `self.entries`. Lookups
    fold the key with the current request flags; a walk lists the keys
    present at FIRST, in dict order, with their current values."""

    answers_cacheable = True

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        self.entries: dict[bytes, bytes] = {}

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(self.fold(key))

    def walk(self, position):
        return snapshot_walk(position, self.entries.keys, self.entries.get)


class TexthashTable(MemoryTable):
    """texthash:/path, loaded once at open."""

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        require_read_only(self.spec, writable)
        utf8 = utf8_enabled(flags, params)
        for _ in range(MAX_LOAD_ATTEMPTS):
            self.remember_file(name)  # stamp taken before reading
            try:
                with open(name, "rb") as f:
                    self.entries = load_source(f, name, flags, utf8, maillog.warning)
            except OSError as exc:
                raise TableOpenError(f"open database {name}: {exc.strerror}") from None
            if file_stamp(name) == self._stamp:
                break
