"""The base class of tables served by another process, and of plugins.

Postfix's network tables (pgsql, mysql, ldap, sqlite, memcache, socketmap,
tcp) are DICT objects whose lookup waits for a server. `BackendTable` is
ours: its operations run in a lane of threads (proxymap/offload.py) while
the event loop goes on serving other clients, so it must be safe to call
from several threads at once, and opening it must not wait for the server
(connect lazily, in the first operation).

It is also the documented base class for table types written in Python and
installed as plugins: a distribution declares an entry point in the group
`pyproxymap.tables` whose name is the table type and whose value is the
class (`mytype = mypackage.module:MyTable`); then `proxy:mytype:NAME`
works for every Postfix client once it is listed in proxy_read_maps.

Contract (see docs/tables.md, "Table types in Python"):
- `__init__(type_name, name, flags, writable, params)`: parse NAME (a file,
  usually); raise TableOpenError(reason) when the table cannot be used.
- `lookup(key) -> bytes | None`, `update(key, value) -> bool`,
  `delete(key) -> bool`, `walk(position) -> (position, key, value) | None`
  (sequence: `walk(START)` gives the first record, `walk(pos)` the one
  after pos; positions are the table's own opaque values); keys and
  values are bytes without NUL; `self.flags` is the flags word of the
  request being served (thread-local), `self.fold(key)` applies FOLD_FIX.
- Raise TableError(reason) for a temporary failure (answered RETRY with a
  log line); any other exception is logged and answered RETRY as well, and
  never takes the worker down.
- Optional class attributes: `lane_size` (threads, i.e. concurrent
  operations; default proxymap_backend_threads), `timeout` (seconds before
  a request is answered RETRY; default proxymap_backend_timeout),
  `impl_flags` (FIXED or PATTERN).
- Optional attribute `cache_settings`: the table's own answer-cache
  settings (dbcommon.Parameters.cache_settings(): `ttl`, `negative_ttl`,
  `entries`), which override main.cf's for this table; the tables with a
  parameter file set it from that file.
- Optional method `connection_stats()`: one dict per connection pool the
  table uses (`size`, `open`, `in_use`, `waits`, as connpool.Pool.stats()
  gives them), shown by `status`; by default that of `self.pool` when the
  table keeps a connpool.Pool there.
"""

from __future__ import annotations

# socket's codec for host names (getaddrinfo("127.0.0.1") encodes with it),
# imported with the table types, while the interpreter's files can still be
# read: a worker may not read them once it runs as mail_owner, and a first
# TCP connect of an ldap, redis or tcp table then failed ("unknown
# encoding: idna", every lookup RETRY)
import encodings.idna  # noqa: F401
from contextlib import contextmanager

from proxymap.offload import RequestFlags
from proxymap.tables.base import Table


class BackendTable(Table):
    """A table whose operations may block; see the module docstring."""

    blocking = True
    lane_size = 0
    timeout = 0.0
    cache_settings: dict = {}

    def __init__(self, type_name: str, name: str, flags: int, writable: bool, params):
        self._request = RequestFlags()
        super().__init__(type_name, name, flags, writable, params)

    # The dispatcher sets `flags` in the loop thread for each request; a lane
    # thread sees the flags of the request it serves, whatever came since.
    @property
    def flags(self) -> int:
        value = self._request.value
        return self._flags if value is None else value

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = value

    @contextmanager
    def serving(self, flags: int):
        self._request.value = flags
        try:
            yield
        finally:
            self._request.value = None

    def connection_stats(self) -> list[dict]:
        """The connection pools' counters for `status` (see the module text)."""
        pool = getattr(self, "pool", None)
        return [pool.stats()] if pool is not None else []
