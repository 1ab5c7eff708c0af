"""The proxymap worker: one process serving many client connections.

This is the counterpart of Postfix's proxymap(8) under the multi-server
skeleton: a single-threaded event loop (epoll) reads requests from
every connected client, answers them in order through a `Dispatcher`, and
never lets a slow, silent or hostile client hold up the others. Clients
arrive either by accepting on a listening socket (`--listen`, for
development and tests) or as descriptors passed by our master over a
control channel (`--master-fd`, see proxymap/handoff.py).

The service name decides the role: `proxymap` is read-only, `proxywrite`
is read-write (and runs in its own session, so a signal to the process
group cannot interrupt an update).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

from proxymap import add_version_option
from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.main_cf import default_config_dir
from proxymap.conventions.mainconfig import ParamView
from proxymap.conventions.service_sockets import service_socket_path
from proxymap.dispatch import READ_SERVICE, WRITE_SERVICE, Dispatcher
from proxymap.filewatch import FileWatcher
from proxymap.offload import Offloader
from proxymap import protocol
from proxymap.protocol import GREETING, HOTPATH, Decoder, ProtocolError, is_bad_reply
from proxymap.tables import filelock, strip_proxy
from proxymap.util import fdlimit
from proxymap.util.logical_lines import logical_lines
from proxymap.util.unix_listener import bind_unix_listener

READ_CHUNK = 65536
#: seconds between checks for expired connections (and on_tick calls)
TICK = 1.0
TICK_NS = int(TICK * 1e9)
#: when stopping, a connection idle this long since our last reply is closed
STOP_IDLE = 1.0
#: a connection that had a request or reply in this many seconds counts as
#: active (the master adds workers for active connections, not idle ones)
ACTIVE_WINDOW = 1.0
#: seconds between attempts at a request whose table lock another process
#: holds (for at most filelock.LOCK_WAIT_LIMIT, then RETRY)
LOCK_RETRY = 0.01
#: bad-request warnings logged per connection; the rest are counted and
#: summed up in the line that closes the connection
BAD_LOGGED = 3


class Connection:
    """One client: its socket, request decoder, unsent reply bytes and walks.
    `waiting` holds, in request order, replies not yet known (an
    offload.DeferredReply: a lane's or a commit group's) and the replies
    that came after them."""

    __slots__ = ("sock", "fd", "decoder", "out", "_peer", "since", "events", "replied",
                 "queue", "bad", "wait_until", "answered_at", "waiting", "held", "walks",
                 "fresh")

    def __init__(self, sock: socket.socket, decoder: Decoder, peer: str = ""):
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = decoder
        self.out = bytearray(GREETING)
        # how log lines name the client: asked of the kernel only when a
        # line needs it (a system call per connection otherwise)
        self._peer = peer
        # monotonic time since which the client owes us request bytes or we
        # owe it reply bytes; None when the connection is idle between requests
        self.since: float | None = None
        self.events = 0
        # monotonic time our last reply (or the greeting) was fully sent
        self.replied = time.monotonic()
        # decoded requests not answered yet (at most max_pipeline)
        self.queue: deque = deque()
        # BAD replies sent on this connection
        self.bad = 0
        # monotonic time of our last answer (0: none yet; the greeting is none)
        self.answered_at = 0.0
        # while the first queued request waits for a table lock: when to
        # give up on it and answer RETRY
        self.wait_until: float | None = None
        self.waiting: deque = deque()
        # bytes of the encoded replies in `waiting` (behind a Pending)
        self.held = 0
        # this client's sequence positions, per table instance
        self.walks: dict = {}
        # bytes read in this loop pass and not decoded yet: the hot path
        # may answer them whole (Worker._answer_fresh)
        self.fresh: bytes | None = None

    @property
    def peer(self) -> str:
        if not self._peer:
            self._peer = peer_name(self.sock)
        return self._peer

    def idle(self) -> bool:
        """Nothing owed either way: no request bytes, no unsent reply."""
        return not self.out and not self.queue and not self.waiting \
            and not self.decoder.pending


class Worker:
    """The event loop of one worker process.

    Other code (the master hand-off) plugs in through add_client(),
    watch()/unwatch() for extra descriptors, the `on_change` callback and
    shutdown(). Counters: `clients` open now, `requests` answered,
    `accepted` connections taken in total.
    """

    def __init__(self, dispatcher: Dispatcher, *, ipc_timeout: float = 3600,
                 max_attrs: int = 32, max_message: int = 1 << 20,
                 max_pipeline: int = 16, max_unsent: int = 65536, max_bad: int = 10):
        self.dispatcher = dispatcher
        self.ipc_timeout = ipc_timeout
        self.max_attrs = max_attrs
        self.max_message = max_message
        # Bounded work per client: at most max_pipeline decoded requests
        # wait for an answer, replies are produced only while less than
        # max_unsent bytes of earlier replies are unsent, and a connection
        # is closed at its max_bad'th BAD reply (0: never).
        self.max_pipeline = max_pipeline
        self.max_unsent = max_unsent
        self.max_bad = max_bad
        # epoll directly rather than selectors: the loop runs once per request
        self._poll = select.epoll()
        self._handlers: dict[int, object] = {}   # fd -> Connection or (fileobj, callback)
        self.conns: dict[int, Connection] = {}
        self.lock_waiting: dict[int, Connection] = {}   # requests waiting for a lock
        self._accept_guard = None
        self.requests = 0
        self.accepted = 0
        self.refused = 0     # clients lost at the descriptor limit
        self.stopping = False
        self.on_change = None   # called when clients or requests change
        self.on_tick = None     # called at least once a second
        self.idle_since = time.monotonic()
        # retiring (proxymap/handoff.py): no new clients come, and a
        # connection idle this long since our last reply is closed (None:
        # not retiring); the others are served until their clients leave
        self.drain_idle: float | None = None
        self._ticked = 0       # monotonic_ns of the last tick
        # connections that read requests in this loop pass: answered after
        # the pass's change notifications are counted (Dispatcher.refresh)
        self._readers: list[Connection] = []
        # reads that may be one hot lookup are answered without decoding
        # (Dispatcher.hot_reply), when the decoder's limits let them through
        self._hot_lane = max_attrs >= 4 and not getattr(dispatcher, "writable", True)
        self._hot_spellings = getattr(dispatcher, "hot_spellings", None)
        self._hot_max = max_message + 1
        # the compiled loop (proxymap/_hotpath.c: read_pass, answer_pass),
        # which does what the loop below does; None: the Python loop
        self._compiled = HOTPATH if HOTPATH is not None and (not self._hot_lane or getattr(
            getattr(dispatcher, "hot_reply", None), "func", None) is HOTPATH.hot_reply) else None
        self.offload = getattr(dispatcher, "offload", None)
        if self.offload is not None:
            self.watch(self.offload, self._offload_done)

    @property
    def clients(self) -> int:
        return len(self.conns)

    def active_clients(self) -> int:
        """Connections with a request or reply in progress, or one finished
        less than ACTIVE_WINDOW seconds ago: the load that more workers
        would help with. A client that keeps its connection open between
        rare requests (as Postfix daemons do) is not counted."""
        since = time.monotonic() - ACTIVE_WINDOW
        return sum(1 for c in self.conns.values()
                   if c.since is not None or c.queue or c.waiting or c.answered_at > since)

    def close(self) -> None:
        """Release the event loop's descriptors (a worker that never ran)."""
        self._poll.close()
        if self.offload is not None:
            self.offload.close()
        if getattr(self.dispatcher, "watcher", None) is not None:
            self.dispatcher.watcher.close()

    # -- plugging in -----------------------------------------------------------

    def watch(self, fileobj, callback) -> None:
        """Call callback(fileobj) whenever fileobj (an object with fileno()
        or a descriptor number) is readable."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self._poll.register(fd, select.EPOLLIN)
        self._handlers[fd] = (fileobj, callback)

    def unwatch(self, fileobj) -> None:
        try:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        except (OSError, ValueError):
            return
        if self._handlers.pop(fd, None) is not None:
            try:
                self._poll.unregister(fd)
            except (OSError, ValueError):
                pass

    def add_client(self, sock: socket.socket, peer: str = "") -> None:
        """Start serving a connected client: greet it and read its requests."""
        if self.stopping:
            sock.close()
            return
        sock.setblocking(False)
        conn = Connection(sock, Decoder(self.max_attrs, self.max_message), peer)
        self.conns[conn.fd] = conn
        self.accepted += 1
        self._poll.register(conn.fd, select.EPOLLIN)
        self._handlers[conn.fd] = conn
        conn.events = select.EPOLLIN
        self._changed()
        self._pump(conn)

    def listen_on(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.watch(listener, self._accept)

    def _accept(self, listener: socket.socket) -> None:
        if self._accept_guard is None:
            self._accept_guard = fdlimit.AcceptGuard("accept", maillog.warning)
        for _ in range(64):
            try:
                sock = self._accept_guard.accept(listener)
            except OSError as exc:
                if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
                    maillog.warning(f"accept: {exc.strerror}")
                    return
                raise
            if sock is None:
                return
            self.add_client(socket.socket(listener.family, listener.type, 0, fileno=sock))

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown() has been called and every client is gone."""
        handlers = self._handlers
        out_events = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
        in_events = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
        hangup = select.EPOLLERR | select.EPOLLHUP
        # the loop never sleeps on a lock: a busy one defers the request
        filelock.wait_limit = 0
        dispatcher = self.dispatcher
        # proxywrite: one sync per table and pass (nothing to do for proxymap)
        batches = getattr(dispatcher, "writable", True)
        compiled = self._compiled
        spellings = self._hot_spellings if self._hot_lane else None
        while not (self.stopping and not self.conns):
            waiting = self.lock_waiting
            if batches:
                dispatcher.begin_batch()
            ready = self._poll.poll(LOCK_RETRY if waiting else TICK)
            # the start of every request's latency (proxymap/metrics.py)
            woke = dispatcher.woke_at = time.monotonic_ns()
            if compiled is not None:    # the loop below, in C
                others = compiled.read_pass(self, ready, handlers, self.conns, self._readers,
                                            Connection, spellings, self._hot_max, READ_CHUNK)
                ready = ()
            else:
                others = None
            for fd, events in ready:
                handler = handlers.get(fd)
                if handler is None:
                    continue
                if type(handler) is Connection:
                    if handler.wait_until is not None or handler.waiting and not handler.out:
                        if events & hangup:      # gone while its request waited
                            self._close(handler)
                        continue
                    if events & out_events and handler.out:
                        self._pump(handler)
                    if events & in_events and not handler.out and fd in self.conns:
                        self._read(handler)
                elif others is None:
                    others = [(fd, handler)]
                else:
                    others.append((fd, handler))
            if self._readers:
                readers, self._readers = self._readers, []
                # every request read above was sent before this drain: a
                # change completed before it was sent is counted now
                self.dispatcher.refresh()
                if compiled is not None:    # the loop below, in C
                    compiled.answer_pass(self, readers, self.conns, dispatcher, Connection)
                    readers = ()
                for conn in readers:
                    if self.conns.get(conn.fd) is conn:
                        if conn.fresh is not None:
                            self._answer_fresh(conn)
                        else:
                            self._pump(conn)
            # the rest (offloaded replies, the master, signals, new clients)
            # after the requests read in this pass, in the order a reading
            # connection saw them before: requests first, then completions
            if others is not None:
                for fd, handler in others:
                    if handlers.get(fd) is handler:     # not unwatched meanwhile
                        handler[1](handler[0])
            if waiting:
                for conn in list(waiting.values()):
                    if conn.fd in self.conns:
                        self._pump(conn)
            # changes of the pass are durable now: answer them (which may
            # answer requests queued behind them, in a group of their own)
            ended = dispatcher.end_batch() if batches else None
            while ended:
                dispatcher.begin_batch()
                self._deliver(ended)
                ended = dispatcher.end_batch()
            if woke - self._ticked >= TICK_NS:
                self._ticked = woke
                if self.offload is not None:
                    self._deliver(self.offload.expire(woke * 1e-9))
                self._expire()
                if self.on_tick is not None:
                    self.on_tick(self)
        if dispatcher.groups_committed:
            maillog.info(f"commit groups: {dispatcher.grouped_changes} changes"
                         f" in {dispatcher.groups_committed} syncs")
        stats = self.dispatcher.cache_stats
        if stats.hits or stats.misses:
            maillog.info(f"answer cache: {stats.hits} hits, {stats.misses} misses,"
                         f" {stats.invalidations} invalidations, {stats.evictions} evictions")
        self.dispatcher.close_all()

    def shutdown(self) -> None:
        """Take no new clients; close each connection right after its next
        reply, or once it has been idle for STOP_IDLE seconds.

        Closing a connection at an arbitrary moment races with a client that
        is about to reuse it: Postfix clients check that a connection is
        still open before sending, but a close landing between that check
        and the write costs the client an EPIPE (SIGPIPE kills a postmap).
        Right after a reply the client has not checked yet, so it sees the
        close and reconnects quietly; a client idle that long is not about
        to send."""
        self.stopping = True
        self._close_idle(time.monotonic(), STOP_IDLE)

    def _close_idle(self, now: float, limit: float) -> None:
        """Close the connections that owe nothing either way and had our
        last reply `limit` seconds ago or more."""
        for conn in list(self.conns.values()):
            if conn.idle() and now - conn.replied >= limit:
                self._close(conn)

    # -- per-connection I/O ---------------------------------------------------------

    def _read(self, conn: Connection, data: bytes | None = None) -> None:
        """Read what the client sent (`data`: what the compiled loop read
        already, the end of input or more than the hot lane takes)."""
        if data is None:
            try:
                data = conn.sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(conn, f"read: {exc.strerror}")
                return
        if not data:
            if conn.decoder.pending:
                maillog.warning(f"premature end-of-input from {conn.peer}"
                                f" ({conn.decoder.pending} bytes of an unfinished request)")
                self.dispatcher.metrics.connection_error()
            self._close(conn)
            return
        if self._hot_lane and self._hot_spellings and not conn.decoder.buf \
                and not conn.queue and len(data) <= self._hot_max:
            conn.fresh = data       # answered after the drain, decoded then if need be
            self._readers.append(conn)
        elif self._decode(conn, data):
            self._readers.append(conn)

    def _decode(self, conn: Connection, data: bytes) -> bool:
        """Feed what was read to the connection's decoder: True when there
        are requests to answer (False: none complete, or closed)."""
        try:
            conn.queue.extend(conn.decoder.feed(data, self.max_pipeline))
        except ProtocolError as exc:
            maillog.warning(f"{exc} from {conn.peer}: closing the connection")
            self.dispatcher.metrics.connection_error()
            self._close(conn)
            return False
        if not conn.queue:
            # ipc_timeout counts from the first byte of an unfinished request,
            # so a client trickling one byte a second cannot keep it open
            if conn.since is None:
                conn.since = time.monotonic()
            return False
        return True

    def _answer_fresh(self, conn: Connection) -> None:
        """Answer the bytes read for an idle connection in this pass: when
        they are one lookup the hot path answers (or an open with a prepared
        reply, Dispatcher.open_reply), its reply is sent as
        _pump would send it, with the same bookkeeping; otherwise they are
        decoded and answered by _pump."""
        data, conn.fresh = conn.fresh, None
        reply = self.dispatcher.hot_reply(data)
        if reply is None:       # a client's first request: often an open
            reply = self.dispatcher.open_reply(data)
        if reply is None:
            if self._decode(conn, data):
                self._pump(conn)
            return
        self.requests += 1      # OK or NOKEY: never a BAD to count
        sent = self._send(conn, reply)
        if sent is None:
            return
        now = time.monotonic()
        conn.answered_at = now
        if sent == len(reply):
            conn.replied = now
            conn.since = None
            if self.stopping:
                self._close(conn)
                return
        else:
            # the rest when the client reads: back-pressure as in _pump
            conn.out += reply[sent:]
            self._poll.modify(conn.fd, select.EPOLLOUT)
            conn.events = select.EPOLLOUT
            conn.since = now
        if self.on_change is not None:      # self._changed(), inline
            self.on_change(self)

    def _send(self, conn: Connection, data) -> int | None:
        """Bytes of `data` the socket took (0 when it is full), or None when
        the connection failed and was closed (a vanished client silently)."""
        try:
            return conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._close(conn, None if exc.errno in (errno.EPIPE, errno.ECONNRESET)
                        else f"write: {exc.strerror}")
            return None

    def _pump(self, conn: Connection) -> None:
        """Answer the client's requests in order and send the replies.

        Replies are made only while less than max_unsent bytes of earlier
        ones wait to be sent, and at most max_pipeline decoded requests wait
        to be answered: replies are produced as the client drains them, so
        what one connection costs is bounded however much it pipelines.
        While anything is owed, nothing more is read from the client."""
        decoder, queue, dispatcher = conn.decoder, conn.queue, self.dispatcher
        max_unsent, max_pipeline = self.max_unsent, self.max_pipeline
        waiting = conn.waiting
        answered = 0
        try:
            while True:
                while queue and len(conn.out) + conn.held < max_unsent \
                        and len(waiting) < max_pipeline:
                    dispatcher.log_bad = conn.bad < BAD_LOGGED
                    may_wait = conn.wait_until is None or time.monotonic() < conn.wait_until
                    reply = dispatcher.handle(queue[0], conn.walks, may_wait, conn)
                    if reply is None:        # a table lock is busy: later
                        if conn.wait_until is None:
                            conn.wait_until = time.monotonic() + filelock.LOCK_WAIT_LIMIT
                            self.lock_waiting[conn.fd] = conn
                        break
                    queue.popleft()
                    if conn.wait_until is not None:
                        conn.wait_until = None
                        del self.lock_waiting[conn.fd]
                    answered += 1
                    if type(reply) is not bytes:    # offloaded: comes later
                        reply.owner = conn
                        waiting.append(reply)
                        continue
                    if waiting:                     # in order, behind one
                        waiting.append(reply)
                        conn.held += len(reply)
                    else:
                        conn.out += reply
                    if is_bad_reply(reply):
                        conn.bad += 1
                        if conn.bad == self.max_bad:
                            self._close_for_bad(conn)
                            return
                if not queue and decoder.more and len(conn.out) + conn.held < max_unsent \
                        and conn.wait_until is None and len(waiting) < max_pipeline:
                    queue.extend(decoder.feed(b"", self.max_pipeline))
                    continue
                if conn.out:
                    sent = self._send(conn, conn.out)
                    if sent is None:
                        return
                    del conn.out[:sent]
                    if not conn.out:
                        conn.replied = time.monotonic()
                        if (queue or decoder.more) and conn.wait_until is None \
                                and len(waiting) < max_pipeline:
                            continue     # all sent: answer the next ones
                break
        except ProtocolError as exc:
            maillog.warning(f"{exc} from {conn.peer}: closing the connection")
            self.dispatcher.metrics.connection_error()
            self._close(conn)
            return
        finally:
            self.requests += answered
        # Back-pressure: while a reply is unsent, read nothing more from this
        # client, so one that never reads cannot make us buffer without bound.
        # While a request waits for a lock or an offloaded reply, nothing is
        # read either (only a hang-up is reported).
        want = select.EPOLLOUT if conn.out else \
            0 if conn.wait_until is not None or waiting else select.EPOLLIN
        if want != conn.events:
            self._poll.modify(conn.fd, want)
            conn.events = want
        if answered:
            conn.answered_at = time.monotonic()
        if conn.out or queue or waiting or decoder.pending:
            if answered or conn.since is None:
                conn.since = time.monotonic()   # owed since this request
        else:
            conn.since = None
            if self.stopping:
                self._close(conn)
                return
        if answered:
            self._changed()

    def _close_for_bad(self, conn: Connection) -> None:
        """Postfix drops a client at its first malformed request; we answer
        a few BAD first (a client may be confused, not hostile), then send
        what is owed, best effort, and hang up with one summary line."""
        unlogged = conn.bad - BAD_LOGGED
        more = f" ({unlogged} more not logged)" if unlogged > 0 else ""
        maillog.warning(f"{conn.peer}: {conn.bad} bad requests{more}: closing the connection")
        self.dispatcher.metrics.connection_error()
        try:
            conn.sock.send(conn.out)
        except OSError:
            pass
        self._close(conn)

    # -- replies of offloaded operations ------------------------------------------

    def _offload_done(self, offload) -> None:
        self._deliver(offload.drain())

    def _deliver(self, answered) -> None:
        """Move the replies now known (offload.DeferredReply, offloaded or
        grouped) to their connections, in order."""
        touched = []
        count = self.dispatcher.count_delivered
        for pending in answered:
            count(pending)
            conn = pending.owner
            if conn is None or self.conns.get(conn.fd) is not conn:
                continue   # the client went away meanwhile
            moved = False
            while conn.waiting:
                head = conn.waiting[0]
                if type(head) is not bytes:
                    if head.reply is None:
                        break
                    head = head.reply
                else:
                    conn.held -= len(head)
                conn.out += head
                conn.waiting.popleft()
                moved = True
            if moved:
                touched.append(conn)
        for conn in touched:
            if self.conns.get(conn.fd) is conn:
                self._pump(conn)
        if touched:
            self._changed()

    def _expire(self) -> None:
        """Close connections that kept a request or a reply unfinished for
        longer than ipc_timeout."""
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.since is not None and now - conn.since > self.ipc_timeout:
                what = "reply unread" if conn.out else "request unfinished"
                self._close(conn, f"timeout ({what} after {self.ipc_timeout:g}s)")
        if self.stopping:
            self._close_idle(now, STOP_IDLE)
        elif self.drain_idle is not None:
            self._close_idle(now, self.drain_idle)

    def _close(self, conn: Connection, why: str | None = None) -> None:
        if why:
            maillog.warning(f"{conn.peer}: {why}: closing the connection")
            self.dispatcher.metrics.connection_error()
        self.conns.pop(conn.fd, None)
        self.lock_waiting.pop(conn.fd, None)
        self.dispatcher.client_gone(conn)
        if self._handlers.pop(conn.fd, None) is not None:
            try:
                self._poll.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        conn.sock.close()
        if not self.conns:
            self.idle_since = time.monotonic()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


def peer_name(sock: socket.socket) -> str:
    """How log lines name a client: its pid and uid from the kernel
    (SO_PEERCRED), the only identity a UNIX-socket peer has."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"client pid {pid} uid {uid}"
    except OSError:
        return f"client on fd {sock.fileno()}"


# -- building a worker from main.cf --------------------------------------------------

def service_role(config, service: str) -> str:
    """proxymap or proxywrite for the service `service`; ConfigError for a
    name that is neither."""
    role = role_of(service, config)
    if role is None:
        raise ConfigError(f"service name must be one of {READ_SERVICE} or {WRITE_SERVICE} "
                          f"(or $proxymap_service_name, $proxywrite_service_name), "
                          f"not {service!r}")
    return role


def allowed_tables(config, role: str) -> set[str]:
    """The `type:name` tables a worker of `role` may open (its allow-list)."""
    from proxymap.allowlist import proxy_allow_set
    param = "proxy_write_maps" if role == WRITE_SERVICE else "proxy_read_maps"
    if config.postfix_release() < (3, 11):
        return proxy_allow_set(config.get(param))
    # 3.11+ also authorises tables named inside /file/name values and,
    # for the read service, in the restriction classes
    allowed = proxy_allow_set(config.get(param), file_lines)
    if role == READ_SERVICE:
        for name in config.get_list("smtpd_restriction_classes"):
            allowed |= proxy_allow_set(config.get(name), file_lines)
    return allowed


def make_dispatcher(config, service: str) -> Dispatcher:
    """The dispatcher for `service` with its allow-list from main.cf."""
    role = service_role(config, service)
    allowed = allowed_tables(config, role)
    offload = Offloader(lane_size=config.get_int("proxymap_backend_threads"),
                        lane_queue=config.get_int("proxymap_backend_queue"),
                        timeout=config.get_time("proxymap_backend_timeout"))
    return Dispatcher(role, allowed, ParamView(config),
                      smtputf8=config.get_bool("smtputf8_enable"), offload=offload,
                      watcher=FileWatcher(),
                      cache_entries=config.get_int("proxymap_answer_cache_entries"),
                      cache_bytes=config.get_int("proxymap_answer_cache_bytes"),
                      cache_exclude={strip_proxy(name) for name in
                                     config.get_list("proxymap_answer_cache_exclude")},
                      remote_ttl=config.get_time("proxymap_remote_cache_ttl"),
                      remote_negative_ttl=config.get_time("proxymap_remote_cache_negative_ttl"))


def file_lines(path: str) -> list[str]:
    """The logical lines of a /file/name an allow-list refers to; a file
    that cannot be read is logged and authorises nothing, as in Postfix."""
    try:
        with open(path, "rb") as f:
            return [line.decode("utf-8", "surrogateescape") for _, line in logical_lines(f)]
    except OSError as exc:
        maillog.warning(f"open {path}: {exc.strerror}")
        return []


def make_worker(config, service: str) -> Worker:
    return Worker(make_dispatcher(config, service),
                  ipc_timeout=config.get_time("ipc_timeout"),
                  max_attrs=config.get_int("proxymap_max_attributes"),
                  max_message=config.get_int("proxymap_max_request_size"),
                  max_pipeline=config.get_int("proxymap_max_pipelined_requests"),
                  max_unsent=config.get_int("proxymap_max_unsent_reply_bytes"),
                  max_bad=config.get_int("proxymap_max_bad_requests"))


def role_of(service: str, config) -> str | None:
    """proxywrite or proxymap: what a service of that name serves (its own
    name or the one main.cf gives it); None for any other name."""
    if service in (WRITE_SERVICE, config.get("proxywrite_service_name")):
        return WRITE_SERVICE
    if service in (READ_SERVICE, config.get("proxymap_service_name")):
        return READ_SERVICE
    return None


def standalone_command(config_dir: str, service: str, path: str) -> list[str]:
    """The command that runs this program as a worker of its own, accepting
    on `path` and logging to stderr, without a master (the worker tests and
    the benchmarks start it so)."""
    return [sys.executable, "-m", "proxymap.server", "-c", config_dir, "-n", service,
            "--listen", path, "--stderr"]


@functools.cache
def argument_parser() -> argparse.ArgumentParser:
    """The worker's command line, built once per process: our master builds
    it before it forks (warm_worker_start), so that a worker started after
    a max_use retirement does not build it again (argparse compiles its
    patterns and formats its help each time)."""
    p = argparse.ArgumentParser(prog="proxymap", description=
                                "Postfix-compatible proxymap/proxywrite worker")
    p.add_argument("-c", dest="config_dir", default=None,
                   help="configuration directory (default $MAIL_CONFIG or /etc/postfix)")
    p.add_argument("-n", dest="service", default=None, help="service name: proxymap or proxywrite")
    p.add_argument("-o", dest="overrides", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("-v", dest="verbose", action="count", default=0)
    p.add_argument("--listen", nargs="?", const="", default=None, metavar="PATH",
                   help="accept on PATH (default $queue_directory/private/SERVICE)")
    p.add_argument("--master-fd", type=int, default=None,
                   help="control channel to our master (descriptor number)")
    p.add_argument("--stderr", action="store_true", help="log to stderr")
    add_version_option(p, "proxymap")
    # Flags a Postfix master passes to its children; accepted and ignored.
    for flag in ("-t",):
        p.add_argument(flag, dest="transport", default=None)
    for flag in ("-u", "-l", "-z", "-d", "-s", "-S"):
        p.add_argument(flag, action="store_true", dest="ignored_" + flag[1])
    return p


def parse_args(argv):
    args = argument_parser().parse_args(argv)
    if args.config_dir is None:
        args.config_dir = default_config_dir()
    return args


def main(argv=None) -> int:
    from proxymap.conventions.main_cf import load_main_cf
    args = parse_args(sys.argv[1:] if argv is None else argv)
    service = args.service or "proxymap"
    overrides = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"proxymap: fatal: bad -o option {item!r}: need name=value", file=sys.stderr)
            return 1
        overrides[name.strip()] = value.strip()
    try:
        config = load_main_cf(os.path.abspath(args.config_dir), overrides)
    except ConfigError as exc:
        print(f"proxymap: fatal: {exc}", file=sys.stderr)
        return 1
    def open_log() -> None:
        """Raises maillog.LogFileError for an unusable maillog_file."""
        maillog.set_hostname(config.get("myhostname"))
        maillog.setup(f"{config.get('syslog_name')}/{service}", config.get("maillog_file"),
                      stderr=args.stderr, verbose=args.verbose,
                      prefixes=config.get("maillog_file_prefixes"))
    try:
        open_log()
    except maillog.LogFileError as exc:
        maillog.fatal(str(exc))     # to the sink in use: syslog or stderr
    role = role_of(service, config)
    if role is None:
        maillog.fatal(f"service name must be one of {READ_SERVICE} or {WRITE_SERVICE}, not {service!r}")
    fdlimit.raise_open_limit()     # as Postfix's event loop does
    if role == WRITE_SERVICE:
        try:
            os.setsid()
        except OSError:
            pass  # already a session leader
    try:
        worker = make_worker(config, service)
    except ConfigError as exc:
        maillog.fatal(str(exc))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def on_signal(_fd):
        try:
            data = os.read(wake_r, 64)
        except BlockingIOError:
            return
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
            worker.shutdown()
        elif signal.SIGHUP in data:
            try:
                open_log()      # let go of a rotated log file
            except maillog.LogFileError as exc:
                maillog.error(f"{exc}: the log file already open stays in use")
            except OSError as exc:
                maillog.warning(f"reopen {config.get('maillog_file')}: {exc.strerror}")

    worker.watch(wake_r, on_signal)
    from proxymap import multiserver
    channel = None
    if args.master_fd is not None:
        from proxymap.handoff import attach_worker
        channel = attach_worker(worker, args.master_fd,
                                config.get_int("proxymap_worker_busy_clients"),
                                config.get_time("max_idle"))
    elif args.listen is None and multiserver.started_by_postfix(args.transport):
        multiserver.attach(worker, config, unprivileged=args.ignored_u)
    else:
        path = args.listen or service_socket_path(config.get("queue_directory"), service)
        try:
            listener = bind_unix_listener(path)
        except OSError as exc:
            maillog.fatal(exc.strerror)
        worker.listen_on(listener)
        maillog.info(f"listening on {path} (hot path {protocol.IMPLEMENTATION})")
    worker.run()
    if channel is not None:
        channel.final_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
