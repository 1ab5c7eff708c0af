"""The control channel between our master and one worker process.

Postfix's master never touches client connections: its children accept on
an inherited listening socket and report TAKEN/AVAILABLE over a status
pipe. Our master accepts itself and hands each connection to the
least-loaded worker, so the channel carries descriptors one way and load
reports the other way. It is one SOCK_SEQPACKET socketpair per worker (one
record per message, never merged or split):

    master -> worker   b"C" + count, descriptors (SCM_RIGHTS) serve these clients (1 to
                                                              MAX_FDS, one message per batch)
                       b"R"                                   retire: take no client, serve the ones
                                                              left until they close (or idle
                                                              max_idle), then exit
                       b"T"                                   stop: close idle clients, exit soon
                       b"P"                                   ping: report now
                       b"L" + one descriptor (SCM_RIGHTS)   log to this maillog_file
                                                              from now on (reload)
    worker -> master   b"S" + STATUS_FORMAT                   load report
                       b"M" + one table's counters            request metrics (proxymap/metrics.py),
                                                              after a report, for each table
                                                              counted since the last one (at
                                                              most every REPORT_INTERVAL, and
                                                              in the worker's last report)

As with Postfix's status pipe, end-of-file on the channel means "the master
is gone": the worker stops taking clients, finishes the ones it has within
a few seconds and exits.

The master accepts every connection waiting on a listener before it hands
any over, and passes a worker's share in one message (`send_clients()`):
one wake-up of the worker per batch instead of one per connection. The
worker greets each new client at once, in the same loop pass. A worker
reports its load once a few clients have arrived or left (report_batch()),
not at every one: the master counts the connections it handed that the
worker has not reported yet (WorkerSlot.in_transit), so a report per
connection would only wake the master twice more per connection.

`attach_worker()` is the worker half (called by proxymap/server.py);
`send_clients()`, `send_command()` and `read_messages()` are used by both.
"""

from __future__ import annotations

import array
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass

from proxymap import metrics
from proxymap.conventions import maillog
from proxymap.util import fdlimit

CLIENT, RETIRE, STOP, PING, STATUS, LOG_FILE, METRICS = \
    b"C", b"R", b"T", b"P", b"S", b"L", b"M"

#: busy connections, open connections, connections accepted, requests answered,
#: answer-cache hits, misses and invalidations (proxymap/answercache.py)
STATUS_FORMAT = "!IIQQQQQ"
STATUS_SIZE = struct.calcsize(STATUS_FORMAT)

_truncated_logged = False

#: at most this many descriptors travel in one message (extras are closed)
MAX_FDS = 16
#: the longest record a worker receives (commands)
MAX_RECORD = 64
#: the longest record the master receives (a metrics record names its
#: table: a path)
MAX_REPORT_RECORD = 65536

#: set by the master in a worker's environment: the account (mail_owner)
#: to switch to once the worker has read its configuration
OWNER_ENV = "PROXYMAP_MAIL_OWNER"

#: per-request deadline imposed on the remaining clients of a worker whose
#: master went away or which was told to retire
DRAIN_TIMEOUT = 2.0
#: seconds between load reports that only carry new request counts
REPORT_INTERVAL = 0.5


@dataclass(frozen=True)
class Status:
    """One load report from a worker."""
    busy: int = 0       # active connections (Worker.active_clients())
    clients: int = 0    # connections open
    accepted: int = 0   # connections received in total
    requests: int = 0   # requests answered in total
    cache_hits: int = 0           # answers from the answer cache
    cache_misses: int = 0         # cacheable lookups that read the table
    cache_invalidations: int = 0  # caches emptied by a change or a write


def encode_status(status: Status) -> bytes:
    return STATUS + struct.pack(STATUS_FORMAT, status.busy, status.clients,
                                status.accepted, status.requests, status.cache_hits,
                                status.cache_misses, status.cache_invalidations)


def encode_metrics(spec: str, counters) -> bytes:
    return METRICS + metrics.encode_record(spec, counters)


def decode_metrics(record: bytes):
    """(table, TableCounters) of a b"M" record; ValueError when malformed."""
    if record[:1] != METRICS:
        raise ValueError(f"bad metrics record ({len(record)} bytes)")
    return metrics.decode_record(record[1:])


def decode_status(record: bytes) -> Status:
    """Parse a b"S" record; ValueError when it has the wrong size or kind."""
    if record[:1] != STATUS or len(record) != 1 + STATUS_SIZE:
        raise ValueError(f"bad status record ({len(record)} bytes)")
    return Status(*struct.unpack(STATUS_FORMAT, record[1:]))


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end); both close-on-exec, the master end non-blocking."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master_end.setblocking(False)
    return master_end, worker_end


def send_clients(chan: socket.socket, clients: list[int]) -> None:
    """Pass `clients` (1 to MAX_FDS descriptors) over `chan` in one message.
    The caller closes its own copies afterwards. Raises BlockingIOError when
    the channel is full, OSError when it is dead; either way none was passed."""
    if not 0 < len(clients) <= MAX_FDS:
        raise ValueError(f"{len(clients)} clients in one message (1 to {MAX_FDS})")
    chan.sendmsg([CLIENT + bytes([len(clients)])],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", clients).tobytes())])


def clients_in_record(data: bytes) -> int:
    """How many clients a b"C" record was sent with (its descriptors may
    have been lost on the way at the receiver's descriptor limit)."""
    return data[1] if len(data) > 1 else 1


def send_descriptor(chan: socket.socket, kind: bytes, fd: int) -> None:
    """A record `kind` carrying descriptor `fd` (SCM_RIGHTS)."""
    fds = array.array("i", [fd])
    chan.sendmsg([kind], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def report_batch(busy_clients: int) -> int:
    """How many arrivals, or departures, a worker lets pass before it
    reports: an eighth of proxymap_worker_busy_clients (4 of the default
    32), 1 when that is lower. Until then the master's count of the
    worker's active load is off by fewer than that many connections, far
    from the threshold at which it starts another worker."""
    return max(1, busy_clients // 8)


def report_due(arrived: int, left: int, batch: int, now: float, last_sent: float) -> bool:
    """Whether a worker's change of load is worth a report now: `batch`
    clients have arrived or left since the last report (report_batch()),
    or REPORT_INTERVAL has passed."""
    return arrived >= batch or left >= batch or now - last_sent >= REPORT_INTERVAL


def send_command(chan: socket.socket, command: bytes) -> None:
    chan.send(command)


def _take_fds(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def read_messages(chan: socket.socket, max_record: int = MAX_RECORD,
                  max_records: int = 0):
    """Read every record waiting on non-blocking `chan` (records longer
    than `max_record` are cut short), or at most `max_records` of them
    when that is not 0: a caller whose event loop polls `chan` again soon
    saves the recvmsg() that would only say "nothing more".

    Returns (records, eof) where records is a list of (payload bytes,
    [fds]). Descriptors arrive close-on-exec; a truncated control message
    is reported (once) and comes without its descriptors, except a batch
    of clients, which keeps the ones the kernel could install.
    """
    records = []
    while True:
        try:
            data, ancdata, flags, _ = chan.recvmsg(
                max_record, socket.CMSG_SPACE(4 * MAX_FDS), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return records, False
        except (ConnectionResetError, BrokenPipeError):
            return records, True
        fds = _take_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            # At the descriptor limit the kernel drops the client's
            # descriptor (closing its connection: the client sees EOF at
            # once); said once, not once per client.
            global _truncated_logged
            if not _truncated_logged:
                _truncated_logged = True
                maillog.warning(f"control channel: descriptor message truncated (descriptor"
                                f" limit {fdlimit.open_limit()}?): clients beyond the limit"
                                f" are closed")
            if data[:1] != CLIENT:
                for fd in fds:
                    _close_fd(fd)
                fds = []
            # a batch of clients keeps those that arrived (the count in
            # the record tells how many did not)
            records.append((data, fds))
            continue
        if not data and not fds:
            return records, True
        records.append((data, fds))
        if len(records) == max_records:
            return records, False


def _close_fd(fd: int) -> None:
    try:
        socket.socket(fileno=fd).close()
    except OSError:
        pass


# -- the worker half ---------------------------------------------------------------

class WorkerChannel:
    """Connects a proxymap `Worker` to our master over descriptor `fd`."""

    def __init__(self, worker, fd: int, batch: int = 1, max_idle: float = 100.0):
        self.worker = worker
        #: arrivals or departures per report (report_batch())
        self.batch = batch
        #: once retiring, a client connection idle this long is closed
        self.max_idle = max_idle
        self.chan = socket.socket(fileno=fd)
        self.chan.setblocking(False)
        self.retiring = False
        self.closed = False
        self._last: Status | None = None
        self._last_sent = 0.0
        self._metrics_sent = 0.0
        #: clients now, as of the last on_change, and how many arrived and
        #: left since the last report
        self._clients = 0
        self._arrived = 0
        self._left = 0

    def start(self) -> None:
        self.worker.watch(self.chan, self._readable)
        previous = self.worker.on_change

        def on_change(worker):
            if previous is not None:
                previous(worker)
            clients = worker.clients
            if clients < self._clients:
                self._left += self._clients - clients
            elif clients > self._clients:
                self._arrived += clients - self._clients
            self._clients = clients
            # The master's choice of worker needs the number of clients,
            # but it counts the ones it handed itself: a report per batch of
            # arrivals or departures keeps its count close. Request counters
            # only show progress (daemon_timeout), so they travel at most
            # every REPORT_INTERVAL instead of costing a message per request.
            if report_due(self._arrived, self._left, self.batch, time.monotonic(),
                          self._last_sent):
                self.report()
            if self.retiring and clients == 0:
                worker.shutdown()
        self.worker.on_change = on_change
        self.worker.on_tick = lambda worker: self.report()
        self.report(force=True)     # "I am up": the master counts us as ready

    def status(self) -> Status:
        stats = getattr(getattr(self.worker, "dispatcher", None), "cache_stats", None)
        cache = (0, 0, 0) if stats is None else (stats.hits, stats.misses, stats.invalidations)
        return Status(self.worker.active_clients(), self.worker.clients, self.worker.accepted,
                      self.worker.requests, *cache)

    def report(self, force: bool = False) -> None:
        """The load report, then (at most every REPORT_INTERVAL, or when
        forced) the counters of the tables counted since the last one."""
        if self.closed:
            return
        now = time.monotonic()
        status = self.status()
        note_pools = getattr(self.worker.dispatcher, "note_pools", None)
        if note_pools is not None:      # the remote tables' pool figures, refreshed
            note_pools()
        counted = self.worker.dispatcher.metrics
        tables = counted.take_changed() \
            if force or now - self._metrics_sent >= REPORT_INTERVAL else []
        if status == self._last and not force and not tables:
            return
        try:
            self.chan.send(encode_status(status))
            self._last = status
            self._last_sent = now
            self._arrived = self._left = 0
            if tables:
                self._metrics_sent = now
            while tables:
                record = encode_metrics(*tables[0])
                if len(record) <= MAX_REPORT_RECORD:
                    self.chan.send(record)
                tables.pop(0)
        except (BlockingIOError, InterruptedError):
            # the master is slow; the next report carries the totals
            counted.mark_changed(tables)
        except OSError:
            self._master_gone()

    def final_report(self) -> None:
        """The last report, after the loop has ended: the table counters
        not sent yet, so the master has them before this worker's end."""
        self.report(force=True)

    def _readable(self, _chan) -> None:
        # one record per loop pass: the loop's poll says when another waits
        records, eof = read_messages(self.chan, max_records=1)
        for data, fds in records:
            kind = data[:1]
            if kind == CLIENT:
                self._take_clients(clients_in_record(data), fds)
            elif kind == LOG_FILE and fds:
                maillog.adopt_log_file(fds[0])
                for extra in fds[1:]:
                    _close_fd(extra)
            else:
                for fd in fds:
                    _close_fd(fd)
                if kind == RETIRE:
                    self.retire()
                elif kind == STOP:
                    self.stop()
                elif kind == PING:
                    self.report(force=True)
                else:
                    maillog.warning(f"control channel: unexpected record {data[:8]!r}")
        if eof:
            self._master_gone()

    def _take_clients(self, sent: int, fds: list[int]) -> None:
        """Serve the clients of one b"C" record: each is greeted at once.
        Descriptors lost at our descriptor limit (their connections are
        closed) are counted as taken, so the master does not wait for them."""
        for extra in fds[sent:]:
            _close_fd(extra)
        for fd in fds[:sent]:
            self.worker.add_client(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0,
                                                 fileno=fd))
        lost = sent - min(sent, len(fds))
        if lost:
            self.worker.accepted += lost
            self.worker.refused += lost
            self.report()

    def retire(self) -> None:
        """Exit once the current clients have left (at once if there are
        none). Until then every request on their connections is answered,
        as by a Postfix multi-server past its use limit; the only
        connections this worker closes itself are those idle for max_idle
        seconds since its last reply (Postfix's own clients let go of an
        idle connection after ipc_idle, 5 s, long before) and, as always,
        those that leave a request or a reply unfinished for ipc_timeout."""
        self.retiring = True
        self.worker.drain_idle = self.max_idle
        if self.worker.clients == 0:
            self.worker.shutdown()

    def stop(self) -> None:
        """Stop now: idle clients are closed, busy ones after their reply, and
        an unfinished request gets DRAIN_TIMEOUT seconds."""
        self.retiring = True
        self.worker.ipc_timeout = min(self.worker.ipc_timeout, DRAIN_TIMEOUT)
        self.worker.shutdown()

    def _master_gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.worker.unwatch(self.chan)
        self.chan.close()
        self.stop()


def preload_table_modules(worker) -> None:
    """Import the table types the worker's allow-list names while the
    interpreter's files are still readable (the interpreter may live where
    mail_owner cannot go); the others are never loaded (tables.preload)."""
    from proxymap.tables import preload
    preload(worker.dispatcher.allowed)


def drop_privileges(user: str) -> None:
    """setgid, initgroups, setuid to `user` (Postfix's chroot_uid step for
    unprivileged services). Raises OSError/KeyError on failure."""
    pw = pwd.getpwnam(user)
    os.setgid(pw.pw_gid)
    os.initgroups(user, pw.pw_gid)
    os.setuid(pw.pw_uid)


def attach_worker(worker, fd: int, busy_clients: int = 1,
                  max_idle: float = 100.0) -> WorkerChannel:
    """Serve the clients our master passes over descriptor `fd`; report load
    back; retire on request (idle clients let go after `max_idle`); stop
    when the master goes away. When the
    master asks for it ($PROXYMAP_MAIL_OWNER) and we run as root, switch to
    that account first."""
    user = os.environ.pop(OWNER_ENV, "")
    if user and os.geteuid() == 0:
        preload_table_modules(worker)
        try:
            drop_privileges(user)
        except (OSError, KeyError) as exc:
            maillog.fatal(f"cannot switch to user {user}: {exc}")
    channel = WorkerChannel(worker, fd, report_batch(busy_clients), max_idle)
    channel.start()
    return channel
