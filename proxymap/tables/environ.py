"""`environ:name`: look keys up in this server process's environment.

Mirrors Postfix 3.7's dict_environ for lookups: the key (lower-cased when
the request carries FOLD_FIX, so folding clients only find lower-case
variable names) is passed to getenv(); the name after `environ:` is not
used. The environment is the server's own, which master(8) has scrubbed
to import_environment. Update, delete and sequence answer CONFIG.
"""

from __future__ import annotations

import os

from proxymap.tables.base import Table


class EnvironTable(Table):
    """environ:x -- the value of an environment variable."""

    def lookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)
        if not key or b"=" in key:
            return None
        return os.environb.get(key)
