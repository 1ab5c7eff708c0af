"""Answering proxymap requests: access control, shared tables, statuses.

This is the request logic of Postfix's proxymap(8) without any I/O: one
`Dispatcher` per worker process keeps every table it opened in a registry
keyed by name and instance flags, shared by all clients and never closed by
a client. It checks the service's allow-list (proxy_read_maps or
proxy_write_maps), refuses writes on the read service, turns open failures
into a surrogate that answers RETRY (and is retried later instead of being
remembered forever), reopens a table whose file changed on disk, and
answers sanely where Postfix 3.7 aborts (unsupported operations -> CONFIG).

Requests in the 3.11 layout get 3.11's answers: the instance is chosen by
`instance_flags`, the request's `flags` word is used as given, every reply
carries the flags word the operation left (0 when no table was found), an
`open` reports the flags of a freshly opened instance whatever earlier
requests did to it, and cdb tables can be listed. Requests in the 3.6-3.10
layout keep 3.7's answers. Sequence walks are kept per connection (the
`walks` mapping the server passes), so that reopening a table, for
freshness or after a write, never restarts or disturbs a walk in progress.

Operations of tables that may block (database clients, plugins) are handed
to the worker's Offloader and answered later (see proxymap/offload.py).

Every answered request is counted in `metrics` (proxymap/metrics.py) under
its table, type and status, with its latency: from `woke_at`
(time.monotonic_ns() when the worker woke up to read it, set by the
worker's loop) to the reply; one clock read per request, plain integer
increments. Offloaded requests are counted when their reply is delivered
(`count_delivered`).
"""

from __future__ import annotations

import time
from time import monotonic_ns

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.metrics import (LATENCY_BUCKET, NO_TABLE, REPLY_STATUS_OFFSET, REQUEST_BASE,
                              WorkerMetrics)
from proxymap.protocol import (BAD, CONFIG, DENY, NOKEY, OK, RETRY, SEQ_FIRST, SEQ_NEXT,
                               BadRequest, Request, encode_reply, parse_request)
from proxymap.tables import Table, TableError, TableOpenError, open_table, strip_proxy
from proxymap.tables.base import END, START, Unsupported
from proxymap.tables.filelock import LockBusy
from proxymap.utf8 import is_utf8, utf8_key

#: seconds before a table that failed to open is tried again
OPEN_RETRY_INTERVAL = 1.0

READ_SERVICE, WRITE_SERVICE = "proxymap", "proxywrite"

#: bits the server adds to the flags of a write, as Postfix does
WRITE_FLAGS = {"update": F.SYNC_UPDATE | F.DUP_REPLACE, "delete": F.SYNC_UPDATE}

#: the instance bits that tell shared instances apart. Postfix keys on all
#: of INST_MASK, but real clients only ever send 0 or OPEN_LOCK there; the
#: other bits (unused ones included) would let one client make us open a
#: listed table once per value, until we run out of descriptors.
INSTANCE_KEY_BITS = F.TRY0NULL | F.TRY1NULL | F.OPEN_LOCK
#: 3.11 clients send their complete open-time flags as `instance_flags`
#: (3.11 shares an instance only between identical words) and the table is
#: opened with them: these further bits change what such an open gives (the
#: server's UTF-8 layer, folding of keys loaded from a source file).
INSTANCE_KEY_BITS_311 = INSTANCE_KEY_BITS | F.UTF8_REQUEST | F.FOLD_FIX | F.FOLD_MUL


def fresh_flags(table: Table, instance_flags: int) -> int:
    """The flags word of an instance freshly opened with `instance_flags`,
    as Postfix 3.11 reports it on `open`: the bits the table's own open
    changed (implementation bits, NUL conventions, UTF8_ACTIVE) as they came
    out of the open of the shared instance, every other bit as requested."""
    changed = table.open_flags ^ table.fresh_flags
    return (instance_flags & ~changed) | (table.fresh_flags & changed)


class SurrogateTable(Table):
    """Stands in for a table that could not be opened: every operation
    answers RETRY with the reason, as Postfix's surrogate dictionary does."""

    impl_flags = F.PATTERN

    def __init__(self, spec: str, flags: int, reason: str):
        type_name, _, name = spec.partition(":")
        super().__init__(type_name, name, flags, False, {})
        self.reason = reason
        self.failed_at = time.monotonic()

    def _fail(self, *args):
        raise TableError(f"{self.spec} is unavailable. {self.reason}")

    lookup = update = delete = _fail

    def walk(self, position):
        self._fail()


class Dispatcher:
    """Turns decoded requests into encoded replies for one service role."""

    def __init__(self, service: str, allowed: set[str], params, *, smtputf8: bool = True,
                 opener=open_table, offload=None):
        self.service = service
        self.writable = service == WRITE_SERVICE
        self.allowed = allowed
        self.params = params
        self.smtputf8 = smtputf8
        self.opener = opener
        #: runs blocking tables' operations off the loop; None: inline
        self.offload = offload
        self.tables: dict[tuple[str, int], Table] = {}
        self.param_name = "proxy_write_maps" if self.writable else "proxy_read_maps"
        #: walk positions of callers that keep none of their own
        self.walks: dict = {}

        # the worker clears this for a connection that already had its
        # share of bad-request warnings (it counts and sums up the rest)
        self.log_bad = True
        self._client: object = None
        # proxywrite instances opened with OPEN_LOCK -> the clients that used
        # them: the lock is given back when the last of them has gone
        self.lock_users: dict[tuple[str, int], set] = {}
        #: request counters by table (see the module text)
        self.metrics = WorkerMetrics()
        #: time.monotonic_ns() when the worker woke up to read the requests
        #: it answers
        self.woke_at = monotonic_ns()
        # the counters of the request in progress: its table's (each table
        # instance has its `counters`), else those of NO_TABLE
        self._no_table = self.metrics.table(NO_TABLE)
        self._counters = self._no_table

    # -- the request entry point ------------------------------------------------

    def handle(self, attrs: list[tuple[bytes, bytes]], walks: dict | None = None,
               may_wait: bool = False, client: object = None):
        """One decoded attribute list in, one encoded reply out, or an
        offload.Pending whose reply comes later. Never raises. `walks` holds
        the sequence positions of the client's connection.

        With `may_wait`, a table lock that another process holds gives None
        instead (ask again later); without, RETRY. `client` names the
        connection, for instances that hold a lock while someone uses them."""
        try:
            req = parse_request(attrs)
        except BadRequest as exc:
            if self.log_bad:
                maillog.warning(f"{self.service}: bad request: {exc.reason}")
            reply = encode_reply(exc.name, BAD, exc.layout)
            self._count(self._no_table, REQUEST_BASE.get(exc.name, REQUEST_BASE["unknown"]),
                        reply, self.woke_at)
            return reply
        self._client = client
        self._counters = self._no_table
        try:
            reply = self._answer(req, self.walks if walks is None else walks)
        except LockBusy as exc:
            if may_wait:
                return None     # asked again later: counted then
            maillog.warning(exc.reason)
            self._count_under_table(req)
            reply = encode_reply(req.name, RETRY, req.layout)
        except Exception as exc:  # a bug must not cost the client its answer
            maillog.error(f"{req.name} {req.table}: unexpected {type(exc).__name__}: {exc}")
            self._count_under_table(req).errors += 1
            reply = encode_reply(req.name, RETRY, req.layout)
        counters = self._counters
        if counters is not None:     # None: offloaded, counted when the reply is there
            # inline, in as few steps as can be: this runs for every request
            # (reply[7] is the status digit: REPLY_STATUS_OFFSET)
            elapsed = monotonic_ns() - self.woke_at
            counters.requests[REQUEST_BASE[req.name] + reply[7]] += 1
            counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
            counters.latency_ns += elapsed
        return reply

    def _count_under_table(self, req: Request):
        """The counters of the request's table when it is on the
        allow-list (for answers that did not get as far as the table)."""
        spec = strip_proxy(req.table)
        if spec in self.allowed:
            self._counters = self.metrics.table(spec)
        return self._counters

    @staticmethod
    def _count(counters, base: int, reply: bytes, since: int) -> None:
        """One answered request (REQUEST_BASE `base`) and its latency since
        `since` (monotonic_ns) -- the slow path; handle() does it inline."""
        elapsed = monotonic_ns() - since
        counters.requests[base + reply[REPLY_STATUS_OFFSET]] += 1
        counters.latency[LATENCY_BUCKET[elapsed.bit_length()]] += 1
        counters.latency_ns += elapsed

    def count_delivered(self, pending) -> None:
        """Count an offloaded request whose reply is now known."""
        counted = pending.counted
        if counted is not None:
            pending.counted = None
            self._count(counted[0], counted[1], pending.reply, counted[2])

    def _answer(self, req: Request, walks: dict) -> bytes:
        name = req.name
        if name == "sequence" and req.function not in (SEQ_FIRST, SEQ_NEXT):
            maillog.warning(f"{strip_proxy(req.table)}: unknown sequence function {req.function}")
            return encode_reply(name, BAD, req.layout)
        if name in ("update", "delete") and not self.writable:
            maillog.warning(f"refusing {req.table} {name} request on non-{WRITE_SERVICE} service")
            self._count_under_table(req)
            return encode_reply(name, DENY, req.layout)
        spec = strip_proxy(req.table)
        if ":" not in spec or spec.startswith(":"):
            maillog.warning(f"malformed table name {req.table!r}: need type:name")
            return encode_reply(name, BAD, req.layout)
        if spec not in self.allowed:
            maillog.warning(f'request for unapproved table: "{spec}"')
            maillog.warning(f"to approve this table for {'read-write' if self.writable else 'read-only'}"
                            f" access, list proxy:{spec} in {self.param_name}")
            return encode_reply(name, DENY, req.layout)
        table = self.find_table(spec, req)
        self._counters = table.counters
        if req.layout == 311:
            if name == "open":
                return encode_reply(name, OK, 311, flags=fresh_flags(table, req.instance_flags))
            # 3.11 uses the request's word as it is
            flags = req.flags | WRITE_FLAGS.get(name, 0)
        elif name == "open":
            return encode_reply(name, OK, 37, flags=table.flags)
        else:
            flags = ((table.flags & ~F.RQST_MASK) | (req.flags & F.RQST_MASK)
                     | WRITE_FLAGS.get(name, 0))
            table.flags = flags
        if table.blocking and self.offload is not None:
            reply = self.offload.submit(table, flags, lambda: self._operate(table, req, walks),
                                        encode_reply(name, RETRY, req.layout))
            if type(reply) is not bytes:     # a Pending: counted on delivery
                reply.counted = (self._counters, REQUEST_BASE[name], self.woke_at)
                self._counters = None
            return reply
        if req.layout == 37:
            return self._operate(table, req, walks)
        # a 3.11 request's word serves that request only: the instance's own
        # word is left as it was, so no request changes what another sees
        saved = table.flags
        table.flags = flags
        try:
            return self._operate(table, req, walks)
        finally:
            table.flags = saved

    def _operate(self, table: Table, req: Request, walks: dict) -> bytes:
        name, layout = req.name, req.layout
        utf8 = self.smtputf8 and getattr(table, "utf8_layer", False)
        key = req.key
        try:
            if utf8 and name != "sequence":
                key = utf8_key(key, bool(table.flags & F.FOLD_FIX and table.flags & F.FIXED))
                if key is None:  # Postfix's UTF-8 layer: not found / not done
                    return encode_reply(name, NOKEY if name == "lookup" else OK, layout,
                                        flags=table.flags)
            if name == "lookup":
                value = table.lookup(key)
                if value is None:
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                if utf8 and not is_utf8(value):
                    return encode_reply(name, CONFIG, layout, flags=table.flags)
                return encode_reply(name, OK, layout, flags=table.flags, value=value)
            if name == "update":
                done = table.update(key, req.value)
            elif name == "delete":
                done = table.delete(key)
            else:
                record = self._step(table, req, walks)
                if record is None:
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                return encode_reply(name, OK, layout, flags=table.flags,
                                    key=record[0], value=record[1])
            return encode_reply(name, OK if done else NOKEY, layout, flags=table.flags)
        except LockBusy:
            raise
        except TableError as exc:
            maillog.warning(exc.reason)
            return encode_reply(name, exc.status, layout, flags=table.flags)

    @staticmethod
    def _step(table: Table, req: Request, walks: dict) -> tuple[bytes, bytes] | None:
        """One FIRST/NEXT of the caller's walk over `table`."""
        if req.layout == 37 and table.sequence_since_311:
            raise Unsupported(table.spec, "sequence")
        if req.function == SEQ_FIRST:
            position = START
        else:
            position = walks.get(table.regkey,
                                 START if table.next_before_first_starts else END)
        record = table.walk(position)
        if record is None:
            walks[table.regkey] = END
            return None
        walks[table.regkey] = record[0]
        return record[1], record[2]

    # -- the shared table registry ----------------------------------------------

    def find_table(self, spec: str, req: Request) -> Table:
        """The shared instance for (spec, instance flags, layout), opened on
        first use, reopened when its file changed or when a failed open may
        now work."""
        if req.layout == 311:
            inst = req.instance_flags & INSTANCE_KEY_BITS_311
        else:
            inst = req.flags & F.INST_MASK & INSTANCE_KEY_BITS
        regkey = (spec, inst, req.layout)
        table = self.tables.get(regkey)
        if table is not None:
            if isinstance(table, SurrogateTable):
                if time.monotonic() - table.failed_at < OPEN_RETRY_INTERVAL:
                    return table
            elif not table.changed():
                if inst & F.OPEN_LOCK and self.writable:
                    self._note_lock_user(regkey)
                return table
            elif table.modified():      # one line per change, not per unsettled reopen
                maillog.info(f"table {spec}: has changed -- reopening")
                self.metrics.table(spec).reopens += 1
            del self.tables[regkey]
            self._close(table)
        # 3.7 opens with the full flags of the first request, 3.11 with the
        # instance flags. OPEN_LOCK holds an exclusive lock for the life of
        # the instance: a reader has no business with it, and a client of the
        # read service could otherwise freeze every writer of a file for good.
        flags = req.instance_flags if req.layout == 311 else req.flags
        if not self.writable:
            flags &= ~F.OPEN_LOCK
        table = self._open(spec, flags, req.layout)
        table.regkey = regkey
        self.tables[regkey] = table
        if inst & F.OPEN_LOCK and self.writable:
            self._note_lock_user(regkey)
        return table

    def _note_lock_user(self, regkey) -> None:
        if self._client is not None:
            self.lock_users.setdefault(regkey, set()).add(self._client)

    def client_gone(self, client: object) -> None:
        """A connection has ended: an OPEN_LOCK instance that no remaining
        client has used is closed, which gives its lock back (Postfix keeps
        it for the life of the process: one client could lock every other
        user of the file out for good)."""
        for regkey, users in list(self.lock_users.items()):
            users.discard(client)
            if not users:
                del self.lock_users[regkey]
                table = self.tables.pop(regkey, None)
                if table is not None:
                    maillog.debug(f"table {regkey[0]}: last OPEN_LOCK user gone -- closing")
                    self._close(table)

    def _open(self, spec: str, flags: int, layout: int = 37) -> Table:
        try:
            table = self.opener(spec, flags, self.writable, self.params)
        except LockBusy:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, TableOpenError) else f"{type(exc).__name__}: {exc}"
            maillog.error(f"open table {spec}: {reason}")
            self.metrics.table(spec).errors += 1
            table = SurrogateTable(spec, flags, str(exc))
            if layout == 311:   # what 3.11's surrogate reports
                table.flags |= F.SURROGATE_311
        # Postfix puts its UTF-8 layer on every instance opened so, surrogates too
        table.utf8_layer = bool(flags & F.UTF8_REQUEST)
        if table.utf8_layer and self.smtputf8:
            table.flags |= F.UTF8_ACTIVE
        table.open_flags, table.fresh_flags = flags, table.flags
        table.counters = self.metrics.table(spec)
        return table

    def _close(self, table: Table) -> None:
        if table.blocking and self.offload is not None:
            self.offload.retire(table)   # after the operations it still has
            return
        try:
            table.close()
        except Exception as exc:
            maillog.warning(f"close table {table.spec}: {exc}")

    def close_all(self) -> None:
        for table in self.tables.values():
            self._close(table)
        self.tables.clear()
        if self.offload is not None:
            self.offload.close()

