"""A raw-protocol load generator for proxymap services (and a null server
to calibrate it).

Speaks the proxymap protocol with the project's own codec
(`proxymap.protocol`: `GREETING`, `encode`, `Decoder`), the way Postfix's
dict_proxy client does: wait for the greeting, then one request at a time
per connection. To keep the generator from being the bottleneck, several
processes each drive many connections through a selector, requests are
encoded before the clock starts, and each process reports the CPU it used
so the report can show how busy the generator itself was.

Workloads (`Workload.kind`):
  lookup   persistent connections, `open` once, then lookups
  churn    per session: connect, greeting, open, one lookup, close
  write    proxywrite: update a new key, then delete it, alternately
  verify   proxywrite, verify(8)-like: 70% lookup, 20% update,
           5% delete, 5% sequence (first, then next until the end)
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import selectors
import socket
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

from proxymap import dictflags as F
from proxymap.protocol import GREETING, Decoder, encode

#: the flags word real `postmap -q` sends with a lookup (3.7, smtputf8 on)
LOOKUP_FLAGS = F.UTF8_REQUEST | F.LOCK | F.DUP_WARN
#: seconds to wait for outstanding replies after the measured window
DRAIN_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
PRE_ENCODED = 4096            # lookup requests encoded per connection up front
VERIFY_CYCLE = ("lookup",) * 14 + ("update",) * 4 + ("delete", "sequence")


@dataclass
class Workload:
    kind: str
    table: str                      # type:name, without proxy:
    keys: list = field(default_factory=list)
    flags: int = LOOKUP_FLAGS


@dataclass
class LoadResult:
    """Merged outcome of all generator processes."""

    requests: int = 0               # completed within the measured window
    total: int = 0                  # completed including the drain
    duration: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    statuses: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    client_cpu: float = 0.0
    procs: int = 0
    conns: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.duration if self.duration else 0.0


class _Conn:
    __slots__ = ("sock", "dec", "sent", "busy", "n", "reqs", "stage", "seq_first", "ident")

    def __init__(self, ident: int):
        self.ident = ident
        self.sock = None
        self.dec = Decoder()
        self.sent = 0.0
        self.busy = False
        self.n = 0
        self.reqs: list[bytes] = []
        self.stage = 0
        self.seq_first = True


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    sock.connect(path)
    return sock


def _read_greeting(sock: socket.socket) -> None:
    dec = Decoder()
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("server closed the connection before greeting")
        if dec.feed(data):
            return
    raise TimeoutError("no greeting")


class _Driver:
    """One generator process: its connections and the request logic."""

    def __init__(self, path: str, wl: Workload, nconns: int, ident: int):
        self.path = path
        self.wl = wl
        self.ident = ident
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn(ident * 1000 + i) for i in range(nconns)]
        self.lat = array("d")
        self.done_at = array("d")
        self.statuses: Counter = Counter()
        self.errors: list[str] = []
        self.open_req = encode([("request", "open"), ("table", wl.table), ("flags", 0)])
        self.keys = wl.keys or [b"nokey"]
        self.running = True

    # -- setup -------------------------------------------------------------------

    def prepare(self) -> None:
        nkeys = len(self.keys)
        for c in self.conns:
            if self.wl.kind in ("lookup", "churn"):
                start = (c.ident * 7919) % nkeys
                count = 1 if self.wl.kind == "churn" else min(PRE_ENCODED, nkeys)
                c.reqs = [self._lookup((start + j) % nkeys) for j in range(count)]
                c.n = start
            if self.wl.kind != "churn":
                c.sock = _connect(self.path)
                _read_greeting(c.sock)
                if self.wl.kind == "lookup":
                    c.sock.sendall(self.open_req)      # as a real client does, untimed
                    dec = Decoder()
                    while not dec.feed(c.sock.recv(4096)):
                        pass
                c.sock.setblocking(False)
                self.sel.register(c.sock, selectors.EVENT_READ, c)

    def _lookup(self, i: int) -> bytes:
        return encode([("request", "lookup"), ("table", self.wl.table),
                       ("flags", self.wl.flags), ("key", self.keys[i])])

    # -- requests ----------------------------------------------------------------

    def next_request(self, c: _Conn) -> bytes:
        kind = self.wl.kind
        c.n += 1
        if kind == "lookup":
            return c.reqs[c.n % len(c.reqs)]
        table, flags = self.wl.table, self.wl.flags
        if kind == "write":
            key = f"bench-{c.ident}-{(c.n - 1) // 2}".encode()   # n=1,2 -> key 0
            if c.n % 2:
                return encode([("request", "update"), ("table", table), ("flags", flags),
                               ("key", key), ("value", b"updated " + key)])
            return encode([("request", "delete"), ("table", table), ("flags", flags),
                           ("key", key)])
        # verify mix
        op = VERIFY_CYCLE[c.n % len(VERIFY_CYCLE)]
        if op == "lookup":
            key = self.keys[(c.ident * 7919 + c.n) % len(self.keys)] if c.n % 3 else \
                f"verify-{c.ident}-{(c.n // 7) % 500}".encode()
            return encode([("request", "lookup"), ("table", table), ("flags", flags),
                           ("key", key)])
        if op == "update":
            key = f"verify-{c.ident}-{(c.n // 5) % 500}".encode()
            return encode([("request", "update"), ("table", table), ("flags", flags),
                           ("key", key), ("value", f"{int(time.time())}:0:0:250 ok".encode())])
        if op == "delete":
            key = f"verify-{c.ident}-{(c.n // 3) % 500}".encode()
            return encode([("request", "delete"), ("table", table), ("flags", flags),
                           ("key", key)])
        function = 0 if c.seq_first else 1
        c.seq_first = False
        return encode([("request", "sequence"), ("table", table), ("flags", flags),
                       ("function", function)])

    def send(self, c: _Conn, data: bytes) -> None:
        c.sent = time.perf_counter()
        c.busy = True
        c.sock.sendall(data)

    def start_session(self, c: _Conn) -> None:
        """churn: a new connection; the clock runs from before connect()."""
        c.sent = time.perf_counter()
        c.busy = True
        c.stage = 0
        c.dec = Decoder()
        sock = _connect(self.path)
        sock.setblocking(False)
        c.sock = sock
        self.sel.register(sock, selectors.EVENT_READ, c)

    def kick(self, c: _Conn) -> None:
        if self.wl.kind == "churn":
            self.start_session(c)
        else:
            self.send(c, self.next_request(c))

    def on_reply(self, c: _Conn, attrs, now: float, t_end: float) -> None:
        if self.wl.kind == "churn":
            if c.stage == 0:                       # greeting
                c.stage = 1
                c.sock.sendall(self.open_req)
                return
            if c.stage == 1:                       # open reply
                c.stage = 2
                c.n += 1
                c.sock.sendall(self._lookup(c.n % len(self.keys)))
                return
            self._record(c, attrs, now)
            self.sel.unregister(c.sock)
            c.sock.close()
            c.sock = None
            if now < t_end and self.running:
                self.start_session(c)
            return
        self._record(c, attrs, now)
        if self.wl.kind == "verify" and attrs and attrs[0][1] != b"0" \
                and VERIFY_CYCLE[c.n % len(VERIFY_CYCLE)] == "sequence":
            c.seq_first = True                     # end of the table: start over
        if now < t_end and self.running:
            self.send(c, self.next_request(c))

    def _record(self, c: _Conn, attrs, now: float) -> None:
        c.busy = False
        self.lat.append(now - c.sent)
        self.done_at.append(now)
        self.statuses[attrs[0][1].decode() if attrs and attrs[0][0] == b"status" else "?"] += 1

    # -- the loop ----------------------------------------------------------------

    def run(self, t_start: float, duration: float) -> tuple[float, float]:
        t_end = t_start + duration
        for c in self.conns:
            self.kick(c)
        hard_end = t_end + DRAIN_TIMEOUT
        while True:
            now = time.perf_counter()
            if now >= hard_end:
                self.errors.append("replies still outstanding after the drain timeout")
                break
            if now >= t_end and not any(c.busy for c in self.conns):
                break
            for key, _ in self.sel.select(timeout=1.0):
                c = key.data
                try:
                    data = c.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    data = b""
                    self.errors.append(f"recv: {exc}")
                now = time.perf_counter()
                if not data:
                    self.errors.append("server closed a connection")
                    self.sel.unregister(c.sock)
                    c.sock.close()
                    c.busy = False
                    if self.wl.kind == "churn" and now < t_end:
                        self.start_session(c)
                    continue
                for attrs in c.dec.feed(data):
                    self.on_reply(c, attrs, now, t_end)
        return t_start, t_end


def _child(path, wl, nconns, ident, go, ready, conn_out, duration):
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent stops us by pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # not the parent's handler
    try:
        drv = _Driver(path, wl, nconns, ident)
        drv.prepare()
    except Exception as exc:      # noqa: BLE001 - reported to the parent
        ready.put(f"error: {type(exc).__name__}: {exc}")
        return
    ready.put("ready")
    if not go.wait(120):
        return
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = time.perf_counter()
    try:
        _, t_end = drv.run(t_start, duration)
    except Exception as exc:      # noqa: BLE001
        drv.errors.append(f"{type(exc).__name__}: {exc}")
        t_end = t_start + duration
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    in_window = sum(1 for t in drv.done_at if t <= t_end)
    conn_out.send({
        "requests": in_window, "total": len(drv.lat), "lat": drv.lat.tobytes(),
        "statuses": dict(drv.statuses), "errors": drv.errors[:20],
        "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
    })
    conn_out.close()
    for c in drv.conns:
        if c.sock is not None:
            c.sock.close()


def default_procs(conns: int) -> int:
    return max(1, min(conns, os.cpu_count() or 1, 8))


def run(path: str, wl: Workload, conns: int, duration: float,
        procs: int | None = None) -> LoadResult:
    """Drive `conns` connections to `path` for `duration` seconds."""
    ctx = multiprocessing.get_context("fork")
    procs = procs or default_procs(conns)
    procs = min(procs, conns)
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    go = ctx.Event()
    ready = ctx.Queue()
    children, pipes = [], []
    result = LoadResult(duration=duration, procs=procs, conns=conns)
    finished = False
    try:
        for i, n in enumerate(shares):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(path, wl, n, i, go, ready, w, duration),
                            daemon=True)
            p.start()
            w.close()
            children.append(p)
            pipes.append(r)
        for _ in children:
            msg = ready.get(timeout=120)
            if msg != "ready":
                result.errors.append(msg)
        if result.errors:
            return result
        go.set()
        for r in pipes:
            if not r.poll(duration + DRAIN_TIMEOUT + 60):
                result.errors.append("a generator process did not report")
                continue
            part = r.recv()
            result.requests += part["requests"]
            result.total += part["total"]
            lat = array("d")
            lat.frombytes(part["lat"])
            result.latencies.extend(lat)
            result.statuses.update(part["statuses"])
            result.errors.extend(part["errors"])
            result.client_cpu += part["cpu"]
        finished = True
        return result
    finally:
        for p in children:
            if not finished and p.is_alive():
                p.terminate()                   # interrupted: do not wait for the run
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# -- null server: the generator's ceiling ---------------------------------------

NULL_REPLY = b"status\x000\0value\0x\0\0"


def _null_serve(listener: socket.socket) -> None:
    """Answer every request with a fixed reply. Requests from this generator
    hold no empty values, so each one ends at its only double NUL."""
    import signal
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                sock.send(GREETING)
                sel.register(sock, selectors.EVENT_READ, sock)
                continue
            sock = key.data
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ConnectionError):
                continue
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            n = data.count(b"\0\0")
            if n:
                sock.send(NULL_REPLY * n)


class NullServer:
    """`procs` processes answering on one listening socket; stop() by pid."""

    def __init__(self, path: str, procs: int = 1):
        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(256)
        ctx = multiprocessing.get_context("fork")
        self.procs = [ctx.Process(target=_null_serve, args=(self.listener,), daemon=True)
                      for _ in range(procs)]
        for p in self.procs:
            p.start()
        self.listener.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
