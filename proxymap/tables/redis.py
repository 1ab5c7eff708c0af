"""`redis:/etc/postfix/file.cf`: a table in Redis (ours; Postfix has none).

Postfix has no Redis client, so sites that share postscreen and verify
caches across MTAs write socketmap or tcp_table brokers by hand. This type
makes `postscreen_cache_map = proxy:redis:/etc/postfix/psc.cf` (and
`address_verify_map`) work for every stock Postfix client: lookup is GET,
update SET (with `EX ttl` when ttl > 0), delete DEL, and sequence walks
the keys with SCAN. The parameter file has the style of Postfix's other
remote tables (read by dbcommon.py; a name not starting with `/` or `.`
is a main.cf prefix):

    hosts = unix:/run/redis/redis.sock, inet:10.0.0.1:6379   (failover)
    sentinels = inet:10.0.0.2:26379, inet:10.0.0.3:26379     (or these,
    sentinel_master = mymaster                                 instead)
    db = 0
    username =            (Redis 6 ACL user; empty: the default user)
    password =
    key_format = psc:%s   (db_common's %s %u %d %1-%9 expansions)
    domain =              (as in the SQL tables)
    ttl = 0               (seconds an updated key lives; 0: no expiry)
    timeout = 2           (seconds per command)
    connect_timeout = 2
    retry_interval = 60   (a failed host is left alone this long)
    tls = no              (and tls_CAfile, tls_CApath, tls_cert_file,
                           tls_key_file, tls_verify_cert = yes)

Keys are folded with FOLD_FIX like every FIXED table; an empty key, one
outside `domain` and one key_format cannot use are not looked up (an
update of one is skipped with a warning, as memcache does). Hosts are
tried in the order listed (every MTA then agrees on the first one): a
host that does not answer, or answers READONLY (a replica), is left alone
for retry_interval seconds and the next one is tried; none answering is
a temporary error (RETRY). With sentinels, redis-py asks them for the
current master. A walk needs a key_format of the form PREFIX%sSUFFIX (it
SCANs for `PREFIX*SUFFIX` and gives back the middle); each connection's
walk keeps its own SCAN cursor and never returns a key twice.

Uses redis-py (the well-kept client): its connection pool per host, at
most proxymap_backend_threads connections per table and worker, with one
reconnect when a pooled connection turns out to be dead (a restarted
server).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from proxymap.conventions import maillog
from proxymap import dictflags as F
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import END, START, TableError, TableOpenError, Unsupported
from proxymap.tables.dbcommon import Templates, read_parameters
from proxymap.tables.failover import HostFailed, ServerSet

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel
    # redis-py imports these on first use, when a worker that dropped its
    # privileges may no longer read the interpreter's files (preload)
    import email.parser  # noqa: F401
    import secrets  # noqa: F401
except ImportError as exc:   # reported when a redis: table is opened
    redis = None
    _IMPORT_ERROR = str(exc)

#: this table's parameters, for main.cf-prefixed table names
PARAMETER_NAMES = ("hosts", "sentinels", "sentinel_master", "db", "username", "password",
                   "key_format", "domain", "ttl", "timeout", "connect_timeout",
                   "retry_interval", "tls", "tls_CAfile", "tls_CApath", "tls_cert_file",
                   "tls_key_file", "tls_verify_cert")
DEFAULT_PORT = 6379
SCAN_COUNT = 100


def parse_host(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, str | None, int]:
    """`unix:/path`, `inet:host:port`, `host:port` or `host` (IPv6 in
    brackets) -> (kind, host or path, port)."""
    if text.startswith("unix:"):
        return "unix", text[5:], 0
    name = text[5:] if text.startswith("inet:") else text
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif name.count(":") == 1:
        host, _, port = name.partition(":")
    else:
        host, port = name, ""
    if not host:
        raise ValueError(f"bad host {text!r}")
    if port and not port.isdigit():
        raise ValueError(f"bad port in {text!r}")
    return "inet", host, int(port) if port else default_port


def scan_pattern(key_format: str) -> tuple[str, str] | None:
    """(prefix, suffix) when key_format is PREFIX%sSUFFIX with no other
    expansion (%% allowed), else None: then the table cannot be walked."""
    text = key_format.replace("%%", "\0")
    if text.count("%") != 1 or "%s" not in text:
        return None
    prefix, _, suffix = text.partition("%s")
    return prefix.replace("\0", "%"), suffix.replace("\0", "%")


def glob_escape(text: str) -> str:
    """Quote SCAN MATCH's glob characters."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass
class ScanPosition:
    """A walk: the host it runs on, SCAN's cursor, keys fetched but not
    yet given, and every key given so far (SCAN may return one twice).
    Each step advances the position it is given and returns it."""

    host: str
    cursor: int
    pending: list = field(default_factory=list)
    seen: set = field(default_factory=set)


class RedisTable(BackendTable):
    impl_flags = F.FIXED | F.MULTI_WRITER

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if redis is None:
            raise TableOpenError(f"dictionary type redis needs redis-py: {_IMPORT_ERROR}")
        cf = read_parameters(name, params, PARAMETER_NAMES)
        self.cache_settings = cf.cache_settings()
        self.key_format = cf.get_str("key_format", "%s", min_len=1)
        self.templates = Templates.parse(name, self.key_format, "%s", cf.get_str("domain", ""))
        self.scan = scan_pattern(self.key_format)
        self.ttl = cf.get_int("ttl", 0)
        self.io_timeout = cf.get_int("timeout", 2, minimum=1)
        self.connect_timeout = cf.get_int("connect_timeout", 2, minimum=1)
        self.retry_interval = cf.get_int("retry_interval", 60, minimum=1)
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        options = dict(db=cf.get_int("db", 0), username=cf.get_str("username", None),
                       password=cf.get_str("password", None),
                       socket_timeout=float(self.io_timeout),
                       socket_connect_timeout=float(self.connect_timeout),
                       retry=Retry(NoBackoff(), 1), decode_responses=False)
        tls = cf.get_bool("tls", False)
        if tls:
            options.update(ssl_ca_certs=cf.get_str("tls_CAfile", None),
                           ssl_ca_path=cf.get_str("tls_CApath", None),
                           ssl_certfile=cf.get_str("tls_cert_file", None),
                           ssl_keyfile=cf.get_str("tls_key_file", None),
                           ssl_cert_reqs="required" if cf.get_bool("tls_verify_cert", True)
                           else "none")
            if not cf.get_bool("tls_verify_cert", True):
                options["ssl_check_hostname"] = False
        sentinels = cf.get_str("sentinels", "").replace(",", " ").split()
        hosts = cf.get_str("hosts", "").replace(",", " ").split()
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()
        try:
            if sentinels and hosts:
                raise ValueError("set hosts or sentinels, not both")
            if sentinels:
                master = cf.get_str("sentinel_master", None)
                if master is None:
                    raise ValueError("sentinels need sentinel_master")
                addresses = []
                for text in sentinels:
                    kind, host, port = parse_host(text, 26379)
                    if kind != "inet":
                        raise ValueError(f"sentinel {text!r}: need inet:host:port")
                    addresses.append((host, port))
                keep = {k: v for k, v in options.items() if k not in ("db", "retry")}
                watcher = Sentinel(addresses, sentinel_kwargs={
                    k: v for k, v in keep.items() if k.startswith(("socket_", "ssl"))})
                written = f"sentinel {master}"
                self._clients[written] = watcher.master_for(
                    master, db=options["db"], max_connections=size, **keep)
                entries = [(0, written, written)]
            else:
                words = hosts or ["inet:localhost:6379"]
                entries = []
                for order, text in enumerate(words):
                    self._clients[text] = self._client(text, options, tls, size)
                    entries.append((order, text, text))
                if len(entries) == 1:
                    entries.append(entries[0])   # a single host is tried twice
        except ValueError as exc:
            raise TableOpenError(f"{type_name}:{name}: {exc}") from None
        self.servers = ServerSet(self.spec, entries, self.retry_interval)
        if name.startswith(("/", ".")):
            self.remember_file(name)

    def _client(self, text: str, options: dict, tls: bool, size: int):
        kind, host, port = parse_host(text)
        if kind == "unix":
            pool = redis.BlockingConnectionPool(
                max_connections=size, timeout=float(self.connect_timeout),
                connection_class=redis.UnixDomainSocketConnection, path=host,
                **{k: v for k, v in options.items() if not k.startswith("ssl")})
        else:
            pool = redis.BlockingConnectionPool(
                max_connections=size, timeout=float(self.connect_timeout),
                connection_class=redis.SSLConnection if tls else redis.Connection,
                host=host, port=port, **options)
        return redis.Redis(connection_pool=pool)

    # -- keys and servers -----------------------------------------------------------

    def redis_key(self, key: bytes, operation: str) -> bytes | None:
        """The server's key for key, or None when the operation is skipped."""
        name = key.decode("utf-8", "surrogateescape")
        why = text = None
        if not key:
            why = "empty lookup key"
        elif not self.templates.domain_allows(name):
            why = "domain mismatch"
        else:
            text = name
            if self.flags & F.FOLD_FIX:
                text = F.fold_ascii(key).decode("utf-8", "surrogateescape")
            if self.key_format != "%s":
                text = self.templates.expand_query(text, lambda s: s) or ""
            if not text:
                why = "empty lookup key expansion"
        if why is not None:
            if operation == "update":
                maillog.warning(f'{self.name}: skipping update for name "{name}": {why}')
            return None
        return text.encode("utf-8", "surrogateescape")

    def _run(self, operation, what: str):
        """operation(client, host) on the first host that answers."""
        def on(host):
            try:
                return operation(self._clients[host], host)
            except redis.exceptions.ReadOnlyError:
                maillog.warning(f"redis server {host}: read-only (a replica) -- trying"
                                f" the next host")
                raise HostFailed() from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                maillog.warning(f"connect to redis server {host}: {exc}")
                raise HostFailed() from None
            except redis.exceptions.ResponseError as exc:
                raise TableError(f"{self.spec}: {what} failed: {exc}") from None
        return self.servers.run(on, "Redis")

    # -- the table ----------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        rkey = self.redis_key(key, "lookup")
        if rkey is None:
            return None
        value = self._run(lambda client, _: client.get(rkey), "lookup")
        return None if value is None else value.split(b"\0", 1)[0]

    def update(self, key: bytes, value: bytes) -> bool:
        if not self.writable:
            return super().update(key, value)
        rkey = self.redis_key(key, "update")
        if rkey is None:
            return False
        ttl = self.ttl if self.ttl > 0 else None
        return bool(self._run(lambda client, _: client.set(rkey, value, ex=ttl), "update"))

    def delete(self, key: bytes) -> bool:
        if not self.writable:
            return super().delete(key)
        rkey = self.redis_key(key, "delete")
        if rkey is None:
            return False
        return self._run(lambda client, _: client.delete(rkey), "delete") > 0

    def walk(self, position):
        if self.scan is None:
            raise Unsupported(self.spec, "sequence (key_format is not PREFIX%sSUFFIX)")
        if position is END:
            return None
        prefix, suffix = (s.encode("utf-8", "surrogateescape") for s in self.scan)
        match = glob_escape(self.scan[0]) + "*" + glob_escape(self.scan[1])
        if position is START:
            position = None
        while True:
            if position is not None:
                while position.pending:
                    rkey, value = position.pending.pop(0)
                    if rkey in position.seen or value is None or b"\0" in rkey:
                        continue
                    position.seen.add(rkey)
                    key = rkey[len(prefix):len(rkey) - len(suffix)]
                    return position, key, value.split(b"\0", 1)[0]
                if position.cursor == 0:
                    return None
            position = self._run(lambda client, host: self._scan_step(
                client, host, position, match.encode("utf-8", "surrogateescape")), "sequence")

    def _scan_step(self, client, host: str, position: ScanPosition | None,
                   match: bytes) -> ScanPosition:
        if position is not None and position.host != host:
            raise TableError(f"{self.spec}: walk interrupted: {position.host} failed over"
                             f" to {host}")
        cursor, keys = client.scan(cursor=0 if position is None else position.cursor,
                                   match=match, count=SCAN_COUNT)
        values = client.mget(keys) if keys else []
        if position is None:
            position = ScanPosition(host, 0)
        position.cursor = int(cursor)
        position.pending = list(zip(keys, values))
        return position

    def close(self) -> None:
        for client in self._clients.values():
            try:
                client.close()
                client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001 - closing a pool that is gone anyway
                pass
