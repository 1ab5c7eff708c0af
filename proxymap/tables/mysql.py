"""`mysql:/etc/postfix/file.cf`: lookups in MySQL or MariaDB.

Mirrors Postfix's dict_mysql (mysql_table(5)): `hosts` (`unix:/path`,
`inet:host:port`, `host[:port]`; `localhost` means the default UNIX socket,
the MySQL way; default localhost), `user`, `password`, `dbname`
(required), `option_file`, `option_group`, `tls_key_file`,
`tls_cert_file`, `tls_CAfile`, `tls_CApath`, `tls_verify_cert`, `query`
(or the legacy table/select_field/where_field/additional_conditions),
`result_format`, `domain`, `expansion_limit`, `require_result_set`, with
the templates of dbcommon.py and the failover of failover.py. Every column
of every row is a result, NULL columns are skipped; a second result set
with data, or none at all while require_result_set = yes, is a failed
query. Keys are escaped as mysql_real_escape_string() does.

Uses PyMySQL (pure Python, well kept) with a bounded pool per server
(connpool.py) instead of Postfix's one connection per table and process.
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableOpenError
from proxymap.tables.connpool import Pool
from proxymap.tables.dbcommon import Templates, legacy_query, read_parameters, sql_lookup
from proxymap.tables.failover import Dropped, HostFailed, ServerSet

try:
    import pymysql
    from pymysql.constants import CLIENT, SERVER_STATUS
    from pymysql.converters import escape_string
except ImportError as exc:   # reported when a mysql: table is opened
    pymysql = None
    _IMPORT_ERROR = str(exc)

UNIX, INET = 0, 1
#: client error codes of a connection that is gone (CR_SERVER_GONE_ERROR, CR_SERVER_LOST)
GONE = {2006, 2013}


def parse_host(text: str) -> tuple[int, str | None, int]:
    """host_init(): (kind, host or socket path, port)."""
    if text.startswith("unix:"):
        kind, name = UNIX, text[5:]
    else:
        kind, name = INET, text[5:] if text.startswith("inet:") else text
    port = 0
    head, sep, tail = name.rpartition(":")
    if sep and kind == INET:
        name, port = head, int(tail) if tail.isdigit() else 0
    if name.lower() == "localhost":
        return UNIX, None, port
    return kind, name, port


class MysqlTable(BackendTable):
    impl_flags = F.FIXED

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        if pymysql is None:
            raise TableOpenError(f"dictionary type mysql needs PyMySQL: {_IMPORT_ERROR}")
        cf = read_parameters(name, params)
        self.cache_settings = cf.cache_settings()
        self.user = cf.get_str("user", "")
        self.password = cf.get_str("password", "")
        self.dbname = cf.get_str("dbname", "", min_len=1)
        self.option_file = cf.get_str("option_file", None)
        self.option_group = cf.get_str("option_group", "client")
        self.tls = {k: cf.get_str(k, None) for k in
                    ("tls_key_file", "tls_cert_file", "tls_CAfile", "tls_CApath", "tls_ciphers")}
        self.tls_verify = cf.get("tls_verify_cert")
        self.require_result_set = cf.get_bool("require_result_set", True)
        self.charset = cf.get_str("charset", "utf8mb4", min_len=1)   # ours
        self.expansion_limit = cf.get_int("expansion_limit", 0)
        self.idle_interval = cf.get_int("idle_interval", 60, minimum=1)
        self.connect_timeout = cf.get_int("connect_timeout", 2, minimum=1)
        query = cf.get_str("query", None)
        if query is None:
            query = legacy_query(cf)
        self.templates = Templates.parse(name, query, cf.get_str("result_format", "%s",
                                                                 min_len=1),
                                         cf.get_str("domain", ""))
        words = cf.get_str("hosts", "").replace(",", " ").split() or ["localhost"]
        if len(words) == 1:
            words.append(words[0])
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        self.pools: dict[str, Pool] = {}
        entries = []
        for word in words:
            kind, host, port = parse_host(word)
            if word not in self.pools:
                self.pools[word] = Pool(f"mysql {word}", self._connector(kind, host, port),
                                        lambda c: c.close(), size, float(self.idle_interval))
            entries.append((kind, word, word))
        self.servers = ServerSet(self.spec, entries, cf.get_int("retry_interval", 60,
                                                                minimum=1))
        if name.startswith(("/", ".")):
            self.remember_file(name)

    def _connector(self, kind, host, port):
        def connect():
            # utf8mb4 unless set (PyMySQL's default; Debian's C client also sends UTF-8)
            args = dict(user=self.user, password=self.password, database=self.dbname,
                        charset=self.charset,
                        connect_timeout=self.connect_timeout, use_unicode=False, conv={},
                        client_flag=CLIENT.MULTI_RESULTS, autocommit=True)
            if kind == UNIX:
                args["unix_socket"] = host or "/run/mysqld/mysqld.sock"
            else:
                args["host"], args["port"] = host, port or 3306
            if self.option_file:
                args["read_default_file"] = self.option_file
                args["read_default_group"] = self.option_group or "client"
            ssl = {"key": self.tls["tls_key_file"], "cert": self.tls["tls_cert_file"],
                   "ca": self.tls["tls_CAfile"], "capath": self.tls["tls_CApath"],
                   "cipher": self.tls["tls_ciphers"]}
            ssl = {k: v for k, v in ssl.items() if v}
            if ssl:
                args["ssl"] = ssl
                if self.tls_verify is not None:
                    args["ssl"]["check_hostname"] = self.tls_verify.lower() == "yes"
            return pymysql.connect(**args)
        return connect

    def lookup(self, key: bytes) -> bytes | None:
        return sql_lookup(self, key, lambda name: self.servers.run(
            lambda word: self._query_on(word, name), "MySQL"))

    def _query_on(self, word: str, name: str) -> list[str | None]:
        pool = self.pools[word]
        try:
            conn = pool.get(float(self.connect_timeout))
        except (pymysql.Error, HostFailed) as exc:
            maillog.warning(f"connect to mysql server {word}: {exc}")
            raise HostFailed() from None
        broken = False
        try:
            def quote(text: str) -> str:   # byte-wise, as mysql_real_escape_string()
                raw = text.encode("utf-8", "surrogateescape").decode("latin-1")
                if conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
                    escaped = raw.replace("'", "''")
                else:
                    escaped = escape_string(raw)
                return escaped.encode("latin-1").decode("utf-8", "surrogateescape")
            query = self.templates.expand_query(name, quote)
            with conn.cursor() as cur:
                cur.execute(query.encode("utf-8", "surrogateescape"))
                first = list(cur.fetchall()) if cur.description else None
                extra = False
                while cur.nextset():
                    extra = extra or bool(cur.description)
            if extra:
                maillog.warning(f"{self.spec}: query failed: multiple result sets"
                                f" returning data are not supported")
                raise HostFailed()
            if first is None and self.require_result_set:
                maillog.warning(f"{self.spec}: query failed: query returned no result set"
                                f"(require_result_set = yes)")
                raise HostFailed()
            return [None if v is None else v.decode("utf-8", "surrogateescape")
                    for row in first or [] for v in row]
        except pymysql.Error as exc:
            code = exc.args[0] if exc.args else 0
            broken = True
            if code in GONE or isinstance(exc, pymysql.err.InterfaceError):
                raise Dropped() from None
            maillog.warning(f"{self.spec}: query failed: {exc.args[-1] if exc.args else exc}")
            raise HostFailed() from None
        finally:
            pool.put(conn, broken)

    def connection_stats(self) -> list[dict]:
        return [pool.stats() for pool in list(self.pools.values())]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
