"""`sqlite:/etc/postfix/file.cf`: lookups in an SQLite database.

Mirrors Postfix's dict_sqlite (sqlite_table(5)): the parameter file names
the database (`dbpath`), the `query` (or the legacy table/select_field/
where_field/additional_conditions), `result_format`, `domain` and
`expansion_limit`, with the templates of dbcommon.py; the key is quoted
like sqlite3_mprintf("%q") (single quotes doubled), only the first
statement of the query runs, and the first column of every row is a
result. The database is opened read-only; opening the table for writing
fails with Postfix's "requires O_RDONLY access mode".

Uses the standard library's sqlite3 module (the same SQLite engine as
Postfix's C client). Each lane thread keeps its own read-only connection.
Differences: a query SQLite cannot prepare is a logged error and RETRY
(Postfix's proxymap exits on it); a changed parameter file reopens the
table.
"""

from __future__ import annotations

import sqlite3
import threading
import urllib.parse

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError
from proxymap.tables.dbcommon import (Templates, legacy_query, read_parameters, sql_lookup,
                                      unquoted_expansions)


def quote(text: str) -> str:
    """sqlite3_mprintf("%q"): single quotes doubled."""
    return text.replace("'", "''")


def first_statement(query: str) -> str:
    """The text sqlite3_prepare_v2() compiles: up to the end of the first
    complete statement; the rest is ignored, as in Postfix."""
    for i, c in enumerate(query):
        if c == ";" and sqlite3.complete_statement(query[:i + 1]):
            return query[:i + 1]
    return query


class SqliteTable(BackendTable):
    impl_flags = F.FIXED
    lane_size = 2

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        cf = read_parameters(name, params)
        self.cache_settings = cf.cache_settings()
        self.dbpath = cf.get_str("dbpath", "", min_len=1)
        query = cf.get_str("query", None)
        if query is None:
            query = legacy_query(cf)
        for expansion in unquoted_expansions(query):
            maillog.warning(f"{type_name}:{name}: query >{query}< contains >{expansion}<"
                            f" without the recommended '' quotes")
        self.query = first_statement(query)
        self.expansion_limit = cf.get_int("expansion_limit", 0)
        self.templates = Templates.parse(name, self.query, cf.get_str("result_format", "%s",
                                                                      min_len=1),
                                         cf.get_str("domain", ""))
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._connect()   # a local file: fails now, like Postfix's open, if it cannot be read
        if name.startswith(("/", ".")):
            self.remember_file(name)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        uri = "file:" + urllib.parse.quote(self.dbpath) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.text_factory = bytes
            conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            raise TableOpenError(f"{self.spec}: open database {self.dbpath}: {exc}") from None
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def lookup(self, key: bytes) -> bytes | None:
        return sql_lookup(self, key, self._fetch)

    def _fetch(self, name: str) -> list[str | None]:
        query = self.templates.expand_query(name, quote)
        try:
            conn = self._connect()
        except TableOpenError as exc:
            raise TableError(str(exc)) from None
        try:
            return [as_text(conn, row[0]) for row in conn.execute(query)]
        except sqlite3.Error as exc:
            raise TableError(f"{self.spec}: SQL step failed for query '{query}': {exc}") from None

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


def as_text(conn: sqlite3.Connection, value) -> str | None:
    """sqlite3_column_text(): the column as SQLite renders it in text."""
    if value is None:
        return None
    if isinstance(value, bytes):   # text or blob; C reads up to a NUL
        return value.partition(b"\0")[0].decode("utf-8", "surrogateescape")
    if isinstance(value, int):
        return str(value)
    text = conn.execute("SELECT CAST(? AS TEXT)", (value,)).fetchone()[0]
    return text.decode("utf-8", "surrogateescape")
