"""Running under Postfix's own master(8): the multi-server child contract.

A site can keep Postfix's master and change only the command column of its
proxymap/proxywrite lines to our `proxymap` program. Postfix's master then
starts it as it starts its own proxymap (master/master_spawn.c,
global/mail_server.h, multi_server.c):

* argv `proxymap [-l] [-n proxywrite] -t unix [-u] ...`, MAIL_CONFIG and
  GENERATION (octal) in the environment;
* descriptor 6 is the service's listening socket, shared by every child
  of the service: each child accepts for itself (EAGAIN means another won);
* descriptor 5 is the service's status channel: 12-byte records
  `int pid, unsigned generation, int avail` in native byte order, TAKEN (0)
  and AVAILABLE (1). The master assumes AVAILABLE at fork and forks another
  child when a connection waits and no child is AVAILABLE;
* end-of-file on descriptor 5 means the master went away or reloaded: the
  child stops taking clients and exits; a failed status write likewise;
* with `-u`, the child switches to mail_owner once it has read its
  configuration; it exits (status 0) after `max_use` closed connections
  once no client is left, or after `max_idle` seconds without a client.

Where this child differs from Postfix's: one process multiplexes many
clients, so it reports TAKEN only while it counts as busy (as many open
connections as proxymap_worker_busy_clients), not around every request;
the master then adds a process only when the ones it has are loaded
(when it accepts its first client it reports TAKEN and AVAILABLE once, so
that the master counts a use and a later abnormal exit is not taken for a
bad startup: reported at the accept, before any reply, it has reached the
master whatever happens to the child after its first client has its
answer). On
end-of-file it finishes the requests in progress (ours close each
connection right after a reply) instead of dropping clients at once.
The daemon_timeout watchdog is an alarm(2) set again on every tick of the
event loop (once a second): a child whose loop is stuck for daemon_timeout
(in a table, say) dies of SIGALRM, which the master logs as `killed by
signal 14` (Postfix's own watchdog exits with `fatal: watchdog timeout`).
chroot (`-c`) is not supported (Postfix's `-c` is our
configuration-directory option).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time

from proxymap.conventions import maillog

#: descriptors Postfix's master gives a child (global/mail_server.h)
STATUS_FD = 5
LISTEN_FD = 6
#: the status record (master/master_proto.h), native byte order
STATUS_RECORD = "=iIi"
TAKEN, AVAILABLE = 0, 1


def started_by_postfix(transport: str | None) -> bool:
    """Whether this process looks started by Postfix's master: a `-t`
    option, a socket on the status descriptor and a listening socket on
    the listen descriptor."""
    if transport is None:
        return False
    try:
        if not stat.S_ISSOCK(os.fstat(STATUS_FD).st_mode):
            return False
        if not stat.S_ISSOCK(os.fstat(LISTEN_FD).st_mode):
            return False
        probe = socket.socket(fileno=os.dup(LISTEN_FD))
        try:
            return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        finally:
            probe.close()
    except OSError:
        return False


def generation(environ=os.environ) -> int:
    """GENERATION from the environment (octal digits), 0 when absent."""
    text = environ.get("GENERATION", "0")
    if not text.isdigit():
        maillog.fatal(f"bad generation: {text}")
    return int(text, 8)


def encode_status(pid: int, gen: int, avail: int) -> bytes:
    return struct.pack(STATUS_RECORD, pid, gen & 0xFFFFFFFF, avail)


class PostfixChild:
    """Serves a proxymap Worker on Postfix's descriptors and keeps the
    master informed; ends the worker on the master's terms."""

    def __init__(self, worker, max_use: int, max_idle: float, busy_clients: int,
                 gen: int, daemon_timeout: int = 18000):
        self.worker = worker
        self.max_use = max_use
        self.max_idle = max_idle
        self.daemon_timeout = daemon_timeout
        self.busy_clients = busy_clients
        self.gen = gen
        self.pid = os.getpid()
        os.set_inheritable(STATUS_FD, False)
        self.listener = socket.socket(fileno=LISTEN_FD)
        self.listener.set_inheritable(False)
        self.reported = AVAILABLE          # what the master assumes at fork
        # Postfix's master counts a use at each TAKEN -> AVAILABLE change and
        # throttles the service when a child with no use dies abnormally
        # ("bad command startup"): at the first accepted client, one such
        # change is sent even if the child never becomes busy
        self.proven = False
        self.idle_since = time.monotonic()
        self.done = False

    def start(self) -> None:
        self.worker.listen_on(self.listener)
        self.worker.watch(STATUS_FD, self._master_readable)
        previous = self.worker.on_change

        def on_change(worker):
            if previous is not None:
                previous(worker)
            self.changed()
        self.worker.on_change = on_change
        self.worker.on_tick = lambda worker: self.tick(time.monotonic())
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        self.feed_watchdog()

    def feed_watchdog(self) -> None:
        """The loop is alive: daemon_timeout seconds from now before SIGALRM."""
        signal.alarm(self.daemon_timeout)

    @property
    def used(self) -> int:
        """Closed client connections (Postfix's use_count)."""
        return self.worker.accepted - self.worker.clients

    def changed(self) -> None:
        clients = self.worker.clients
        if clients == 0:
            self.idle_since = time.monotonic()
            if self.used >= self.max_use:
                self.finish("max_use reached")
                return
        if not self.proven and self.worker.accepted:
            self.proven = True
            self.report(TAKEN)
        self.report(TAKEN if clients >= self.busy_clients else AVAILABLE)

    def tick(self, now: float) -> None:
        self.feed_watchdog()
        if self.worker.clients == 0 and now - self.idle_since >= self.max_idle:
            self.finish("idle timeout")

    def report(self, avail: int) -> None:
        if avail == self.reported or self.done:
            return
        try:
            os.write(STATUS_FD, encode_status(self.pid, self.gen, avail))
            self.reported = avail
        except OSError:
            self.finish("master status channel closed")

    def _master_readable(self, _status) -> None:
        try:
            data = os.read(STATUS_FD, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.finish("master disconnect")

    def finish(self, why: str) -> None:
        """Take no more clients, let the worker end (its loop ends once the
        clients it has are gone)."""
        if self.done:
            return
        self.done = True
        maillog.debug(f"{why} -- exiting")
        self.worker.unwatch(self.listener)
        self.worker.unwatch(STATUS_FD)
        self.listener.close()
        self.worker.shutdown()


def attach(worker, config, unprivileged: bool) -> PostfixChild:
    """Run `worker` as a child of Postfix's master (see the module text)."""
    if unprivileged and os.geteuid() == 0:
        from proxymap.handoff import drop_privileges, preload_table_modules
        preload_table_modules(worker)
        user = config.get("mail_owner")
        try:
            drop_privileges(user)
        except (OSError, KeyError) as exc:
            maillog.fatal(f"cannot switch to user {user}: {exc}")
    child = PostfixChild(worker, config.get_int("max_use"), config.get_time("max_idle"),
                         config.get_int("proxymap_worker_busy_clients"), generation(),
                         config.get_time("daemon_timeout"))
    child.start()
    return child
