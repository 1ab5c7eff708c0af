"""`pgsql:/etc/postfix/file.cf`: lookups in PostgreSQL.

Mirrors Postfix's dict_pgsql (pgsql_table(5)): `hosts` (`unix:/dir`,
`inet:host:port`, a bare host or `host:port`, or a `postgresql://` URI;
default localhost; a single host is listed twice, so it is retried once),
`user`, `password`, `dbname` (required unless every host is a URI),
`query` (or `select_function`, or the legacy table/select_field/
where_field/additional_conditions), `result_format`, `domain`,
`expansion_limit`, `retry_interval`, `idle_interval`, with the templates of
dbcommon.py. Every column of every row is a result, a NULL column is an
empty result (skipped with Postfix's warning), and the key is escaped by
the server connection (PQescapeStringConn). Hosts are tried in random
order, UNIX sockets first; a host whose connection or query fails is left
alone for retry_interval seconds and the next one is tried; when none
answers, the lookup is a temporary error (RETRY).

Ours on top: one bounded pool of connections per server and worker
(psycopg_pool, shared by every table of that server; at most
`proxymap_backend_threads` connections, idle ones closed after
idle_interval), so 64 clients of a worker hold at most that many database
connections; a connection the server dropped is replaced once before the
host is marked down; `encoding` (client encoding) defaults to UTF8 as in
current Postfix (3.7 used LATIN1; set `encoding = LATIN1` for its
behaviour with non-ASCII keys).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError
from proxymap.tables.dbcommon import Templates, legacy_query, read_parameters, sql_lookup
from proxymap.tables.failover import Dropped, HostFailed, ServerSet

try:
    import psycopg
    import psycopg_pool
    from psycopg import pq
except ImportError as exc:   # reported when a pgsql: table is opened
    psycopg = None
    _IMPORT_ERROR = str(exc)

UNIX, INET, URI = 0, 1, 2


@dataclass
class Host:
    """One entry of `hosts`, as Postfix's host_init() reads it."""

    written: str
    kind: int
    host: str
    port: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Host":
        if "://" in text:
            return cls(text, URI, text)
        name = text[5:] if text.startswith(("unix:", "inet:")) else text
        if name and not name.startswith("/"):
            host, sep, port = name.rpartition(":")
            return cls(text, INET, host if sep else name, port if sep else None)
        return cls(text, UNIX, name)

    def conninfo(self, dbname: str, user: str, password: str, encoding: str) -> str:
        if self.kind == URI:
            return psycopg.conninfo.make_conninfo(self.host, client_encoding=encoding)
        parts = {"host": self.host, "port": self.port, "dbname": dbname, "user": user,
                 "password": password}
        return psycopg.conninfo.make_conninfo(
            **{k: v for k, v in parts.items() if v}, client_encoding=encoding)


class PoolRegistry:
    """One connection pool per server (conninfo) in this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pools: dict[str, list] = {}    # conninfo -> [pool, users]

    def acquire(self, conninfo: str, size: int, idle: float):
        with self._lock:
            entry = self._pools.get(conninfo)
            if entry is None:
                pool = psycopg_pool.ConnectionPool(
                    conninfo, min_size=0, max_size=size, open=True, max_idle=idle,
                    kwargs={"autocommit": True}, name=conninfo, num_workers=1)
                entry = self._pools[conninfo] = [pool, 0]
            entry[1] += 1
            return entry[0]

    def release(self, conninfo: str) -> None:
        with self._lock:
            entry = self._pools.get(conninfo)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._pools[conninfo]
                entry[0].close(timeout=0)

    def stats(self, conninfo: str) -> dict | None:
        """The pool of conninfo in connpool.Pool.stats()'s form (psycopg_pool's
        own names: pool_max the bound, pool_size the connections open,
        pool_available the idle ones, requests_queued the requests that
        waited for one), None when there is none."""
        with self._lock:
            entry = self._pools.get(conninfo)
            if entry is None:
                return None
            raw = entry[0].get_stats()
        return {"size": raw.get("pool_max", 0),
                "open": raw.get("pool_size", 0),
                "in_use": raw.get("pool_size", 0) - raw.get("pool_available", 0),
                "idle": raw.get("pool_available", 0), "waits": raw.get("requests_queued", 0)}


POOLS = PoolRegistry()


class PgsqlTable(BackendTable):
    impl_flags = F.FIXED

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        if psycopg is None:
            raise TableOpenError(f"dictionary type pgsql needs psycopg: {_IMPORT_ERROR}")
        cf = read_parameters(name, params)
        self.cache_settings = cf.cache_settings()
        self.user = cf.get_str("user", "")
        self.password = cf.get_str("password", "")
        self.dbname = cf.get_str("dbname", "")
        self.encoding = cf.get_str("encoding", "UTF8", min_len=1)
        self.retry_interval = cf.get_int("retry_interval", 60, minimum=1)
        self.idle_interval = cf.get_int("idle_interval", 60, minimum=1)
        # ours: seconds to wait for a connection from the server's pool
        self.connect_timeout = cf.get_int("connect_timeout", 2, minimum=1)
        self.expansion_limit = cf.get_int("expansion_limit", 0)
        query = cf.get_str("query", None)
        if query is None:
            function = cf.get_str("select_function", None)
            query = f"SELECT {function}('%s')" if function else legacy_query(cf)
        self.templates = Templates.parse(name, query, cf.get_str("result_format", "%s",
                                                                 min_len=1),
                                         cf.get_str("domain", ""))
        words = cf.get_str("hosts", "").replace(",", " ").split() or ["localhost"]
        if len(words) == 1:
            words.append(words[0])   # "don't blacklist the load balancer"
        self.hosts = [Host.parse(w) for w in words]
        self.servers = ServerSet(self.spec, [(h.kind, h.written, h) for h in self.hosts],
                                 self.retry_interval)
        plain = [h.written for h in self.hosts if h.kind != URI]
        if plain and not self.dbname:
            raise TableOpenError(f"{type_name}:{name} host target '{plain[-1]}'"
                                 f" requires dbname setting")
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        self._infos = {}
        for h in self.hosts:
            if h.written not in self._infos:
                info = h.conninfo(self.dbname, self.user, self.password, self.encoding)
                self._infos[h.written] = info
        self._pools = {w: None for w in self._infos}
        self._pool_lock = threading.Lock()
        self._size = size
        if name.startswith(("/", ".")):
            self.remember_file(name)

    def _pool(self, host: Host):
        with self._pool_lock:
            pool = self._pools[host.written]
            if pool is None:
                pool = self._pools[host.written] = POOLS.acquire(
                    self._infos[host.written], self._size, float(self.idle_interval))
            return pool

    def lookup(self, key: bytes) -> bytes | None:
        return sql_lookup(self, key, lambda name: self.servers.run(
            lambda host: self._query_on(host, name), "PostgreSQL"))

    def _query_on(self, host: Host, name: str) -> list[str | None]:
        pool = self._pool(host)
        try:
            conn = pool.getconn(timeout=float(self.connect_timeout))
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            maillog.warning(f"connect to pgsql server {host.written}: {exc}")
            raise HostFailed() from None
        try:
            escaping = pq.Escaping(conn.pgconn)

            def quote(text: str) -> str:
                raw = text.encode("utf-8", "surrogateescape")
                return escaping.escape_string(raw).decode("utf-8", "surrogateescape")
            query = self.templates.expand_query(name, quote)
            res = conn.pgconn.exec_(query.encode("utf-8", "surrogateescape"))
            status = res.status
            if status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                return [_text(res.get_value(i, j)) for i in range(res.ntuples)
                        for j in range(res.nfields)]
            if conn.pgconn.status != pq.ConnStatus.OK:
                raise Dropped()
            message = (res.error_message or b"").decode("utf-8", "replace").strip()
            maillog.warning(f"pgsql query failed: fatal error from host {host.written}: {message}")
            raise HostFailed()
        except psycopg.Error as exc:
            if conn.pgconn.status != pq.ConnStatus.OK:
                raise Dropped() from None
            maillog.warning(f"pgsql query failed: fatal error from host {host.written}: {exc}")
            raise HostFailed() from None
        finally:
            pool.putconn(conn)   # the pool discards a broken connection

    def connection_stats(self) -> list[dict]:
        with self._pool_lock:
            used = [w for w, pool in self._pools.items() if pool is not None]
        stats = (POOLS.stats(self._infos[written]) for written in used)
        return [s for s in stats if s is not None]

    def close(self) -> None:
        with self._pool_lock:
            used = [w for w, pool in self._pools.items() if pool is not None]
            self._pools = {w: None for w in self._pools}
        for written in used:
            POOLS.release(self._infos[written])


def _text(value: bytes | None) -> str | None:
    """PQgetvalue(): NULL reads as an empty string."""
    return (value or b"").decode("utf-8", "surrogateescape")
