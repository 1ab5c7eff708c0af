"""`memcache:/etc/postfix/file.cf`: a client of a memcached server.

Mirrors Postfix's dict_memcache (memcache_table(5), built into Postfix
3.7): the parameter file (dbcommon.py's reader) names one server,
`memcache = inet:host:port` or `unix:/path` (default
inet:localhost:11211), and `key_format` (default `%s`, with db_common's
`%s %u %d %1-%9` expansions; a key the format cannot use, an empty key
and a key whose expansion holds white space are skipped: not found, and
an update says so with Postfix's warning), `domain`, `ttl` (3600) and
`flags` (0) of stored items, `timeout` (2 s per read or write),
`max_try` (2) with `retry_pause` (1 s) between tries, `line_size_limit`
(1024) and `data_size_limit` (10240). Lookups are `get`, updates `set`,
deletes `delete` in memcached's text protocol; only the second and later
failed tries log a warning, in Postfix's words, and when every try
failed the operation is a temporary error (RETRY). An optional `backup`
table (any type, opened with the same access mode) is the persistent
store: a lookup not found (or failed) in memcache is looked up there and,
when found, stored in memcache; updates and deletes go to memcache first,
then to the backup, whose result is the answer; sequence walks the backup
(without one it finds nothing, with Postfix's warning). The table is
FIXED (whatever key_format uses, as db_common_dict_partial() says),
MULTI_WRITER, and refused for security-sensitive (NO_UNAUTH) use.

The client speaks the text protocol itself over netclient.py's pooled
streams rather than through pymemcache: Postfix's behaviour lives in the
details such a library hides (the reply line bound, the data size checked
before the data is read, max_try/retry_pause, keys sent as they are).
Not here: `key_digest` (Postfix 3.11).
"""

from __future__ import annotations

import threading
import time

from proxymap.conventions import maillog
from proxymap import dictflags as F
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError
from proxymap.tables.connpool import Pool
from proxymap.tables.dbcommon import Templates, read_parameters
from proxymap.tables.failover import HostFailed
from proxymap.tables.netclient import Closed, endpoint_pool

DEFAULT_SERVER = "inet:localhost:11211"

#: memcache_table(5) parameters, for main.cf-prefixed table names
PARAMETER_NAMES = ("memcache", "backup", "key_format", "ttl", "timeout", "flags", "max_try",
                   "line_size_limit", "data_size_limit", "retry_pause", "domain")


class ReplyError(Exception):
    """The server's reply was not what the command expects."""


def read_line(stream, bound: int) -> bytes:
    """memcache_get(): one reply line without its CRLF (or bare LF); a line
    that does not end within `bound` bytes is an error."""
    while True:
        end = stream.buf.find(b"\n")
        if end >= 0:
            if end > bound:
                raise ReplyError("input too long")
            line = bytes(stream.buf[:end])
            del stream.buf[:end + 1]
            return line[:-1] if line.endswith(b"\r") else line
        if len(stream.buf) > bound:
            raise ReplyError("input too long")
        stream.read_more()


def read_data(stream, size: int) -> bytes:
    """memcache_fread(): `size` bytes followed by CRLF."""
    while len(stream.buf) < size + 2:
        stream.read_more()
    if stream.buf[size:size + 2] != b"\r\n":
        raise ReplyError("data block not followed by CRLF")
    data = bytes(stream.buf[:size])
    del stream.buf[:size + 2]
    return data


def value_size(line: bytes) -> int | None:
    """The byte count of a `VALUE key flags bytes` line, or None."""
    words = line.split()
    if len(words) < 4 or words[0] != b"VALUE":
        return None
    try:
        return int(words[3])
    except ValueError:
        return None


def has_space(key: bytes) -> bool:
    """isascii && isspace: memcached keys cannot hold ASCII white space."""
    return any(c in b" \t\n\v\f\r" for c in key)


class MemcacheTable(BackendTable):
    impl_flags = F.FIXED | F.MULTI_WRITER

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if flags & F.NO_UNAUTH:
            raise TableOpenError(f"{type_name}:{name} map is not allowed for"
                                 f" security-sensitive data")
        cf = read_parameters(name, params, PARAMETER_NAMES)
        self.cache_settings = cf.cache_settings()
        self.key_format = cf.get_str("key_format", "%s")
        self.io_timeout = cf.get_int("timeout", 2)
        self.ttl = cf.get_int("ttl", 3600)
        self.mc_flags = cf.get_int("flags", 0)
        self.retry_pause = cf.get_int("retry_pause", 1, minimum=1)
        self.max_try = cf.get_int("max_try", 2, minimum=1)
        self.max_line = cf.get_int("line_size_limit", 1024, minimum=1)
        self.max_data = cf.get_int("data_size_limit", 10240, minimum=1)
        self.server = cf.get_str("memcache", DEFAULT_SERVER)
        self.templates = Templates.parse(name, self.key_format, "%s", cf.get_str("domain", ""))
        if not self.server.startswith(("inet:", "unix:")):
            raise TableOpenError(f"{type_name}:{name}: need service transport:endpoint"
                                 f' instead of "{self.server}"')
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        try:
            self.pool: Pool = endpoint_pool(f"memcache {self.server}", self.server, size,
                                            io_timeout=float(self.io_timeout or 2))
        except (ValueError, OSError) as exc:
            raise TableOpenError(f"{type_name}:{name}: {exc}") from None
        self.backup = None
        self._backup_lock = threading.Lock()   # a file table serves one thread at a time
        backup = cf.get_str("backup", None)
        if backup is not None:
            from proxymap.tables import open_table   # the registry imports this module
            self.backup = open_table(backup, flags, writable, params)
            # sequence is the backup's, NEXT before FIRST included
            self.next_before_first_starts = self.backup.next_before_first_starts
        if name.startswith(("/", ".")):
            self.remember_file(name)

    # -- keys ------------------------------------------------------------------------

    def memcache_key(self, key: bytes, operation: str, noisy: bool) -> bytes | None:
        """dict_memcache_valid_key(): the server's key for `key`, or None
        when the operation is skipped (logged for updates)."""
        text = key.decode("utf-8", "surrogateescape")
        if not key:
            return self._skip(text, operation, "empty lookup key", noisy)
        if not self.templates.domain_allows(text):
            return self._skip(text, operation, "domain mismatch", noisy)
        if self.flags & F.FOLD_FIX:
            text = F.fold_ascii(key).decode("utf-8", "surrogateescape")
        if self.key_format != "%s":
            text = self.templates.expand_query(text, lambda s: s) or ""
        out = text.encode("utf-8", "surrogateescape")
        if not out:
            return self._skip(key.decode("utf-8", "surrogateescape"), operation,
                              "empty lookup key expansion", noisy)
        if has_space(out):
            return self._skip(key.decode("utf-8", "surrogateescape"), operation,
                              "name contains space", noisy)
        return out

    def _skip(self, name: str, operation: str, why: str, noisy: bool) -> None:
        if noisy:
            maillog.warning(f'{self.name}: skipping {operation} for name "{name}": {why}')
        return None

    # -- the protocol ------------------------------------------------------------------

    def _tries(self, command: bytes, read_reply, what: str):
        """Send command on a pooled stream; read_reply(stream) gives (answer,
        whether the stream is spoiled); up to max_try times with retry_pause between; a failure logs from the
        second try on; all failed: TableError (RETRY)."""
        for count in range(self.max_try):
            if count:
                time.sleep(self.retry_pause)
            try:
                stream = self.pool.get(float(self.io_timeout or 2))
            except HostFailed as exc:
                raise TableError(f"database {self.spec}: {exc}") from None
            except OSError as exc:
                endpoint = self.server.partition(":")[2]
                maillog.warning(f"connect to {endpoint}: {exc.strerror or exc}")
                break
            broken = True
            try:
                stream.sock.sendall(command)
                reply, broken = read_reply(stream)
                return reply
            except (OSError, Closed) as exc:
                if count:
                    err = getattr(exc, "strerror", None) or (str(exc) if isinstance(exc, OSError)
                                                             else "")
                    maillog.warning(f"database {self.spec}: I/O error"
                                    f"{': ' + err if err else ''}")
            except ReplyError as exc:
                if count:
                    maillog.warning(f"database {self.spec}: {what} failed: {exc}")
            finally:
                self.pool.put(stream, broken)
        raise TableError(f"database {self.spec}: {what} failed after {self.max_try}"
                         f" tries -- answering RETRY")

    def mc_get(self, key: bytes) -> bytes | None:
        def reply(stream):
            line = read_line(stream, self.max_line)
            if line == b"END":
                return None, False
            size = value_size(line)
            if size is None or size < 0 or size > self.max_data:
                raise ReplyError(f"unexpected memcache server reply: {_shown(line, 30)}")
            data = read_data(stream, size)
            try:
                # the value is good; a stream without the END after it is
                # not (Postfix drops it too)
                return data, read_line(stream, self.max_line) != b"END"
            except ReplyError:
                return data, True
        return self._tries(b"get " + key + b"\r\n", reply, "lookup")

    def mc_set(self, key: bytes, value: bytes) -> bool:
        if len(value) > self.max_data:
            maillog.warning(f"database {self.spec}: data for key {_shown(key, 200)} is too"
                            f" long (data_size_limit={self.max_data}) -- not stored")
            return False

        def reply(stream):
            line = read_line(stream, self.max_line)
            if line != b"STORED":
                raise ReplyError(f"update failed: {_shown(line, 100)}")
            return True, False
        command = (b"set " + key + f" {self.mc_flags} {self.ttl} {len(value)}\r\n".encode()
                   + value + b"\r\n")
        return self._tries(command, reply, "update")

    def mc_delete(self, key: bytes) -> bool:
        def reply(stream):
            line = read_line(stream, self.max_line)
            if line == b"DELETED":
                return True, False
            if line == b"NOT_FOUND":
                return False, False
            raise ReplyError(f"delete failed: {_shown(line, 30)}")
        return self._tries(b"delete " + key + b"\r\n", reply, "delete")

    # -- the table -----------------------------------------------------------------------

    def _backup_call(self, operation, *args):
        with self._backup_lock:
            backup = self.backup
            # the request bits, as the dispatcher passes them to any table
            backup.flags = (backup.flags & ~F.RQST_MASK) | (self.flags & F.RQST_MASK)
            return operation(backup, *args)

    def lookup(self, key: bytes) -> bytes | None:
        mkey = self.memcache_key(key, "lookup", noisy=False)
        if mkey is None:
            return None
        if self.backup is None:
            return self.mc_get(mkey)
        try:
            value = self.mc_get(mkey)
        except TableError:
            value = None     # the backup answers instead
        if value is None:
            value = self._backup_call(type(self.backup).lookup, key)
            if value is not None:
                try:
                    self.mc_set(mkey, value)
                except TableError:
                    pass
        return value

    def update(self, key: bytes, value: bytes) -> bool:
        if not self.writable:
            return super().update(key, value)
        mkey = self.memcache_key(key, "update", noisy=True)
        if mkey is None:
            return False
        if self.backup is None:
            return self.mc_set(mkey, value)
        try:
            self.mc_set(mkey, value)
        except TableError:
            pass
        return self._backup_call(type(self.backup).update, key, value)

    def delete(self, key: bytes) -> bool:
        if not self.writable:
            return super().delete(key)
        mkey = self.memcache_key(key, "delete", noisy=False)
        if mkey is None:
            return False
        if self.backup is None:
            return self.mc_delete(mkey)
        try:
            self.mc_delete(mkey)
        except TableError:
            pass
        return self._backup_call(type(self.backup).delete, key)

    def walk(self, position):
        if self.backup is None:
            maillog.warning(f"database {self.spec}: first/next support requires"
                            f" backup database")
            return None
        return self._backup_call(type(self.backup).walk, position)

    def changed(self) -> bool:
        return super().changed() or (self.backup is not None and self.backup.changed())

    def close(self) -> None:
        self.pool.close()
        if self.backup is not None:
            self.backup.close()


def _shown(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", "replace")
