"""`static:value` and `static:{ value }`: every key maps to one value.

Mirrors Postfix 3.7's dict_static. The value is the name as written
(blanks kept), unless it starts with `{`: then the outer braces and the
blanks inside them are removed, and a missing `}` or text after it makes
the open fail ("bad static:name syntax: ..."). Only lookup is supported;
update and sequence answer CONFIG here where Postfix 3.7 aborts.
"""

from __future__ import annotations

from proxymap.tables.base import Table, TableOpenError
from proxymap.tables.inline import BraceError, strip_braces


class StaticTable(Table):
    """static:value -- the same answer for every key."""

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        try:
            self.value = strip_braces(name.encode("utf-8", "surrogateescape"))
        except BraceError as exc:
            raise TableOpenError(f"bad {type_name}:name syntax: {exc}") from None

    def lookup(self, key: bytes) -> bytes | None:
        return self.value
