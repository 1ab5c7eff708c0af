"""Failover across a SQL table's `hosts`, the way Postfix's clients do it.

dict_pgsql and dict_mysql share one strategy: UNIX-socket hosts are tried
before TCP ones (and, for pgsql, before URIs), in random order within each
group; a host whose connection or query fails is left alone for
retry_interval seconds while the next is tried; a single host is listed
twice, so a failure is retried once; when no host answers the lookup is a
temporary error. `ServerSet.run()` is that loop; what a "host" is and how
to query it is the table's business.

Ours on top: a query that failed because the server dropped the
connection (a restarted database) is retried once on a fresh connection
before the host is marked down.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Generic, TypeVar

from proxymap.tables.base import TableError

H = TypeVar("H")


class HostFailed(Exception):
    """This host did not answer: mark it down, try the next one."""


class Dropped(Exception):
    """The connection was lost: try once more on a fresh connection."""


class ServerSet(Generic[H]):
    """hosts: (group, key, host) triples; group orders the tries (lower
    first), key names the server (entries with the same key share their
    down time)."""

    def __init__(self, spec: str, hosts: list[tuple[int, str, H]], retry_interval: int):
        self.spec = spec
        self.hosts = hosts
        self.retry_interval = retry_interval
        self.down_until: dict[str, float] = {}

    def candidates(self) -> list[tuple[str, H]]:
        now = time.monotonic()
        order: list[tuple[str, H]] = []
        for group in sorted({g for g, _, _ in self.hosts}):
            members = [(k, h) for g, k, h in self.hosts
                       if g == group and self.down_until.get(k, 0.0) <= now]
            random.shuffle(members)
            order += members
        return order

    def run(self, query: Callable[[H], object], what: str):
        for key, host in self.candidates():
            for attempt in (1, 2):
                try:
                    return query(host)
                except Dropped:
                    if attempt == 2:
                        break
                except HostFailed:
                    break
            self.down_until[key] = time.monotonic() + self.retry_interval
        raise TableError(f"{self.spec}: no {what} server answered")
