"""`fail:name`: a table that fails every request with a temporary error.

Mirrors Postfix 3.7's dict_fail (a PATTERN table): lookup, update, delete
and sequence all report RETRY, which is useful to test how clients handle
an unavailable table. Opening never fails, also for writing.
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.protocol import RETRY
from proxymap.tables.base import Table, TableError


class FailTable(Table):
    """fail:name -- always RETRY."""

    impl_flags = F.PATTERN

    def _fail(self, operation: str):
        raise TableError(f"table {self.spec}: {operation} failed: fail: table always fails", RETRY)

    def lookup(self, key: bytes):
        self._fail("lookup")

    def update(self, key: bytes, value: bytes):
        self._fail("update")

    def delete(self, key: bytes):
        self._fail("delete")

    def walk(self, position):
        self._fail("sequence")
