"""The registry of lookup-table types: one module per type in this package.

`open_table("hash:/etc/postfix/aliases", flags, writable, params)` splits the
name, imports the module that implements the type and returns an open Table.
It mirrors Postfix's dict_open(): unknown types and open failures raise
TableOpenError, which the dispatcher turns into a surrogate (RETRY).
Types not built in are looked up among the installed plugins: entry points
in the group `pyproxymap.tables` (see tables/backend.py).

A type's module is imported when the type is first used, never before:
the remote tables' client libraries (ldap3, redis, psycopg, pymysql...)
are most of a worker's memory, and a site that names no such table must
not pay for them (Postfix, likewise, loads a dynamicmaps.cf plugin only
when a table of its type is opened). `preload(specs)` imports what a
configuration names: the master calls it before it forks workers, so that
they share those pages and have them before they drop privileges.
"""

from __future__ import annotations

import importlib
from typing import Iterable

from proxymap.tables.base import Table, TableError, TableOpenError, Unsupported

# type name -> "module:class"; modules are imported on first use.
TABLE_TYPES = {
    "hash": "proxymap.tables.berkeleydb:HashTable",
    "btree": "proxymap.tables.berkeleydb:BtreeTable",
    "lmdb": "proxymap.tables.lmdb:LmdbTable",
    "cdb": "proxymap.tables.cdb:CdbTable",
    "texthash": "proxymap.tables.texthash:TexthashTable",
    "inline": "proxymap.tables.inline:InlineTable",
    "static": "proxymap.tables.static:StaticTable",
    "fail": "proxymap.tables.fail:FailTable",
    "environ": "proxymap.tables.environ:EnvironTable",
    "unix": "proxymap.tables.unix:UnixTable",
    "cidr": "proxymap.tables.cidr:CidrTable",
    "regexp": "proxymap.tables.regexp:RegexpTable",
    "pcre": "proxymap.tables.pcre:PcreTable",
    "unionmap": "proxymap.tables.composite:UnionTable",
    "pipemap": "proxymap.tables.composite:PipeTable",
    "sqlite": "proxymap.tables.sqlite:SqliteTable",
    "pgsql": "proxymap.tables.pgsql:PgsqlTable",
    "mysql": "proxymap.tables.mysql:MysqlTable",
    "socketmap": "proxymap.tables.socketmap:SocketmapTable",
    "tcp": "proxymap.tables.tcp:TcpTable",
    "memcache": "proxymap.tables.memcache:MemcacheTable",
    "redis": "proxymap.tables.redis:RedisTable",
    "ldap": "proxymap.tables.ldap:LdapTable",
}

#: entry-point group of plugin table types (base class: tables/backend.py)
PLUGIN_GROUP = "pyproxymap.tables"


def split_spec(spec: str) -> tuple[str, str]:
    """'type:name' -> (type, name); raises ValueError without a colon."""
    type_name, sep, name = spec.partition(":")
    if not sep or not type_name or not name:
        raise ValueError(f'open dictionary: expecting "type:name" form instead of "{spec}"')
    return type_name, name


def strip_proxy(table: str) -> str:
    """Drop any number of leading `proxy:` prefixes, as both the client and
    the server of the proxy do."""
    while table.startswith("proxy:"):
        table = table[len("proxy:"):]
    return table


_plugins: dict[str, str] | None = None


def plugin_types() -> dict[str, str]:
    """Installed plugin table types: type name -> "module:class"; a plugin
    never shadows a built-in type. Read once per process, and only when a
    type is not built in (the master's preload() reads it, before workers
    drop privileges, when the configuration names such a type)."""
    global _plugins
    if _plugins is None:
        from importlib import metadata  # several MB of modules: only when asked
        found: dict[str, str] = {}
        for ep in metadata.entry_points(group=PLUGIN_GROUP):
            if ep.name not in TABLE_TYPES:
                found.setdefault(ep.name, ep.value)
        _plugins = found
    return _plugins


def table_class(type_name: str) -> type[Table]:
    target = TABLE_TYPES.get(type_name) or plugin_types().get(type_name)
    if target is None:
        raise TableOpenError(f"unsupported dictionary type: {type_name}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TableOpenError(f"dictionary type {type_name} is not available: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Table)):
        raise TableOpenError(f"dictionary type {type_name}: {target} is not a Table class")
    return cls


def preload(specs: Iterable[str]) -> set[str]:
    """Import the modules of the table types that opening every `type:name`
    of `specs` takes (a composite's members included); the set of those
    types that could be loaded. A type that cannot be loaded is left out
    here: opening the table reports it."""
    loaded: set[str] = set()
    pending = list(specs)
    while pending:
        type_name, sep, name = pending.pop().partition(":")
        try:
            cls = table_class(type_name)
        except TableOpenError:
            continue
        loaded.add(type_name)
        if sep:
            pending.extend(cls.member_specs(name))
    return loaded


def open_table(spec: str, flags: int, writable: bool, params) -> Table:
    """Open `type:name`. `params` maps main.cf parameter names to values
    (strings; e.g. lmdb_map_size) and may be a plain dict."""
    try:
        type_name, name = split_spec(spec)
    except ValueError as exc:
        raise TableOpenError(str(exc)) from None
    cls = table_class(type_name)
    return cls(type_name, name, flags, writable, params)


__all__ = ["Table", "TableError", "TableOpenError", "Unsupported", "TABLE_TYPES", "PLUGIN_GROUP",
           "open_table", "plugin_types", "preload", "split_spec", "strip_proxy", "table_class"]
