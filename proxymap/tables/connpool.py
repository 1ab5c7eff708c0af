"""A bounded pool of connections to one server, for drivers without one.

psycopg has psycopg_pool; PyMySQL and the directory and cache clients have
nothing comparable that is well kept and small, so this is the one pool
they share: at most `size` connections exist at once (a lane thread that
wants one more waits up to its timeout, then the host counts as failed),
idle connections are reused newest first and closed once idle longer than
`idle` seconds (Postfix's idle_interval), and a connection returned as
broken is closed rather than reused. Counters for `status`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, TypeVar

from proxymap.tables.failover import HostFailed

C = TypeVar("C")


class Pool(Generic[C]):
    def __init__(self, name: str, connect: Callable[[], C], close: Callable[[C], None],
                 size: int, idle: float):
        self.name = name
        self._connect = connect
        self._close = close
        self.size = size
        self.idle = idle
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[tuple[C, float]] = []
        self.opened = 0
        self.in_use = 0
        self.waits = 0

    def get(self, timeout: float) -> C:
        if not self._slots.acquire(blocking=False):
            self.waits += 1
            if not self._slots.acquire(timeout=timeout):
                raise HostFailed(f"{self.name}: all {self.size} connections busy")
        try:
            conn = self._reuse()
            if conn is None:
                conn = self._connect()
                with self._lock:
                    self.opened += 1
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self.in_use += 1
        return conn

    def _reuse(self) -> C | None:
        now = time.monotonic()
        stale = []
        conn = None
        with self._lock:
            while self._idle:
                candidate, since = self._idle.pop()
                if now - since > self.idle:
                    stale.append(candidate)
                else:
                    conn = candidate
                    break
            # whatever is left is older still
            stale += [c for c, since in self._idle if now - since > self.idle]
            self._idle = [(c, s) for c, s in self._idle if now - s <= self.idle]
        for old in stale:
            self._quietly_close(old)
        return conn

    def put(self, conn: C, broken: bool = False) -> None:
        with self._lock:
            self.in_use -= 1
            if not broken:
                self._idle.append((conn, time.monotonic()))
        if broken:
            self._quietly_close(conn)
        self._slots.release()

    def _quietly_close(self, conn: C) -> None:
        with self._lock:
            self.opened -= 1
        try:
            self._close(conn)
        except Exception:  # noqa: BLE001 - a connection that cannot close is gone anyway
            pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._quietly_close(conn)

    def stats(self) -> dict:
        with self._lock:
            return {"pool": self.name, "size": self.size, "open": self.opened,
                    "in_use": self.in_use, "idle": len(self._idle), "waits": self.waits}
